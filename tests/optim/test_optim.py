"""Tests of dptrain.optim against hand-written references of each paper's update rule."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dptrain.optim import Apollo, ApolloMini, Frugal, GaLoreAdamW, SGDSaI, Swan, optimizer_state_bytes

ALL = [Apollo, ApolloMini, GaLoreAdamW, Frugal, Swan, SGDSaI]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead, and on a loaded 2-core machine a lot of it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _grads(shape, steps, seed=0, growth=0.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) * (1.0 + growth * t) for t in range(steps)]


def _canon(g):
    """The documented side rule: work on (m, n) with m <= n, i.e. transpose tall matrices."""
    return g.t() if g.shape[0] > g.shape[1] else g


def _adam(m, v, g, t, b1=0.9, b2=0.999, eps=1e-8):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    return m, v, (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)


def _run_alongside(opt, param, grads, reference_step):
    """Step ``opt`` with each gradient and compare ``param`` with the reference after every step."""
    expected = param.detach().clone()
    for t, g in enumerate(grads, start=1):
        param.grad = g.clone()
        opt.step()
        expected = reference_step(t, g, expected)
        torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- memory
@pytest.mark.parametrize("cls, bound", [(ApolloMini, 0.02), (Swan, 0.01), (Apollo, 0.60), (GaLoreAdamW, 0.60),
                                        (Frugal, 0.60), (SGDSaI, 0.51)])
def test_state_bytes_vs_adamw_on_512x2048(cls, bound):
    w = torch.nn.Parameter(torch.zeros(512, 2048))
    grad = torch.randn(512, 2048, generator=torch.Generator().manual_seed(0))
    adamw = torch.optim.AdamW([w], lr=1e-3)
    w.grad = grad.clone()
    adamw.step()
    opt = cls([w], lr=1e-3)
    opt.step()
    ratio = optimizer_state_bytes(opt) / optimizer_state_bytes(adamw)
    assert optimizer_state_bytes(adamw) >= 2 * 512 * 2048 * 4
    assert 0 <= ratio <= bound, f"{cls.__name__}: {ratio:.4f} of AdamW's state"


def test_apollo_keeps_seed_not_projection():
    w = torch.nn.Parameter(torch.zeros(6, 10))
    opt = Apollo([w], lr=1e-3, rank=3)
    w.grad = torch.ones(6, 10)
    opt.step()
    state = opt.state[w]
    assert isinstance(state["seed"], int)
    shapes = sorted(tuple(v.shape) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    assert shapes == [(3, 10), (3, 10)]  # the two moments only, no (3, 6) projection
    assert optimizer_state_bytes(opt) == 2 * 3 * 10 * 4 + 4 + 8 + 8  # moments, prev_norm, seed, step


# --------------------------------------------------------------------------- least squares
@pytest.mark.parametrize("cls, lr", [(Apollo, 1e-2), (ApolloMini, 3e-3), (GaLoreAdamW, 3e-2), (Frugal, 1e-2),
                                     (Swan, 1e-2), (SGDSaI, 3e-3)])
def test_least_squares_loss_halves_within_300_steps(cls, lr):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=gen)
    y = x @ torch.randn(12, 20, generator=gen).t()  # (64, 12)
    w = torch.nn.Parameter(torch.zeros(12, 20))
    b = torch.nn.Parameter(torch.zeros(12))
    opt = cls([w, b], lr=lr)
    start = None
    for _ in range(300):
        loss = ((x @ w.t() + b - y) ** 2).mean()
        start = loss.item() if start is None else start
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = ((x @ w.t() + b - y) ** 2).mean().item()
    assert final < 0.5 * start, f"{cls.__name__}: {start:.3f} -> {final:.3f}"


# --------------------------------------------------------------------------- references
@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
@pytest.mark.parametrize("mini", [False, True])
def test_apollo_matches_reference(shape, mini):
    lr, wd, gap = 0.01, 0.1, 2
    w = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    if mini:
        opt, rank, scale = ApolloMini([w], lr=lr, weight_decay=wd, update_proj_gap=gap), 1, 128.0
    else:
        opt, rank, scale = Apollo([w], lr=lr, weight_decay=wd, update_proj_gap=gap, rank=2), 2, 1.0
    m_dim, n_dim = min(shape), max(shape)
    ref = {"m": torch.zeros(rank, n_dim, dtype=torch.float64), "v": torch.zeros(rank, n_dim, dtype=torch.float64),
           "prev": None, "seeds": []}

    def step(t, g, p):
        seed = opt.state[w]["seed"]
        ref["seeds"].append(seed)
        proj = torch.randn(rank, m_dim, generator=torch.Generator().manual_seed(seed)) / math.sqrt(rank)
        gc = _canon(g)
        r = proj.double() @ gc  # (rank, n)
        ref["m"], ref["v"], r_adam = _adam(ref["m"], ref["v"], r, t, eps=1e-6)
        if mini:
            s = r_adam.norm() / (r.norm() + 1e-8)
            u = gc * s
        else:
            s = torch.stack([r_adam[:, j].norm() / (r[:, j].norm() + 1e-8) for j in range(n_dim)])
            u = gc * s[None, :]
        norm = u.norm()
        if ref["prev"] is not None and norm > 1.01 * ref["prev"]:
            u = u * (1.01 * ref["prev"] / norm)
        ref["prev"] = u.norm()
        u = u * math.sqrt(scale)
        u = u.t() if g.shape[0] > g.shape[1] else u
        return p * (1 - lr * wd) - lr * u

    _run_alongside(opt, w, _grads(shape, 5, growth=2.0), step)
    seeds = ref["seeds"]
    assert seeds[0] == seeds[1] and seeds[2] == seeds[3] and seeds[1] != seeds[2]  # refresh every `gap` steps


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_galore_matches_reference(shape):
    lr, rank, gap, scale = 0.01, 2, 2, 0.25
    w = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = GaLoreAdamW([w], lr=lr, rank=rank, update_proj_gap=gap, scale=scale)
    ref = {"m": 0.0, "v": 0.0, "P": None}

    def step(t, g, p):
        gc = _canon(g)
        if (t - 1) % gap == 0:
            ref["P"] = torch.linalg.svd(gc, full_matrices=False)[0][:, :rank]
        r = ref["P"].t() @ gc
        ref["m"], ref["v"], n = _adam(ref["m"], ref["v"], r, t)
        u = scale * (ref["P"] @ n)
        return p - lr * (u.t() if g.shape[0] > g.shape[1] else u)

    _run_alongside(opt, w, _grads(shape, 5), step)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_frugal_columns_matches_reference(shape):
    lr, gap, density = 0.01, 2, 0.3
    w = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = Frugal([w], lr=lr, density=density, update_proj_gap=gap)
    m_dim, n_dim = min(shape), max(shape)
    k = math.ceil(density * n_dim)
    ref = {}

    def step(t, g, p):
        gc = _canon(g)
        if (t - 1) % gap == 0:  # new subspace, Adam restarts
            ref.update(m=torch.zeros(m_dim, k, dtype=torch.float64), v=torch.zeros(m_dim, k, dtype=torch.float64), t=0)
        ref["t"] += 1
        idx = torch.randperm(n_dim, generator=torch.Generator().manual_seed(opt.state[w]["seed"]))[:k]
        u = torch.sign(gc)
        ref["m"], ref["v"], u[:, idx] = _adam(ref["m"], ref["v"], gc[:, idx], ref["t"])
        return p - lr * (u.t() if g.shape[0] > g.shape[1] else u)

    _run_alongside(opt, w, _grads(shape, 5), step)


def test_frugal_svd_matches_reference():
    lr, density = 0.01, 0.5
    w = torch.nn.Parameter(torch.zeros(4, 9, dtype=torch.float64))
    opt = Frugal([w], lr=lr, density=density, proj="svd", update_proj_gap=10)
    ref = {"m": 0.0, "v": 0.0}

    def step(t, g, p):
        if t == 1:
            ref["P"] = torch.linalg.svd(g, full_matrices=False)[0][:, :2]
        low = ref["P"].t() @ g
        ref["m"], ref["v"], n = _adam(ref["m"], ref["v"], low, t)
        return p - lr * (ref["P"] @ n + torch.sign(g - ref["P"] @ low))

    _run_alongside(opt, w, _grads((4, 9), 3), step)


@pytest.mark.parametrize("shape", [(5, 12), (12, 5)])
def test_swan_matches_exact_whitening(shape):
    lr = 0.01
    w = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = Swan([w], lr=lr, ns_steps=40)

    def step(t, g, p):
        gc = _canon(g)
        normed = (gc - gc.mean(1, keepdim=True)) / (gc.std(1, keepdim=True, unbiased=False) + 1e-8)
        evals, evecs = torch.linalg.eigh(normed @ normed.t())
        white = evecs @ torch.diag(evals.rsqrt()) @ evecs.t() @ normed
        white = white * normed.norm() / white.norm()
        return p - lr * (white.t() if g.shape[0] > g.shape[1] else white)

    expected = w.detach().clone()
    for t, g in enumerate(_grads(shape, 3), start=1):
        w.grad = g.clone()
        opt.step()
        expected = step(t, g, expected)
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-6)  # float32 whitening
    assert len([v for v in opt.state[w].values() if isinstance(v, torch.Tensor)]) == 0  # stateless


def test_sgd_sai_matches_reference():
    lr, mu, wd, warm, eps = 0.01, 0.9, 0.1, 2, 1e-8
    w = torch.nn.Parameter(torch.ones(4, 7, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = SGDSaI([w, b], lr=lr, momentum=mu, weight_decay=wd, snr_warmup_steps=warm)
    grads_w, grads_b = _grads((4, 7), 5, seed=1), _grads((3,), 5, seed=2)
    ref = {id(w): [w.detach().clone(), 0.0, None], id(b): [b.detach().clone(), 0.0, None]}
    for t in range(1, 6):
        for p, g in ((w, grads_w[t - 1]), (b, grads_b[t - 1])):
            p.grad = g.clone()
            entry = ref[id(p)]
            entry[1] = entry[1] + (g - entry[1]) / t if t <= warm else mu * entry[1] + (1 - mu) * g
            if t <= warm:
                mean = entry[1].mean()
                std = ((entry[1] - mean) ** 2).mean().sqrt()
                entry[2] = entry[1].norm() / (std + eps)
            entry[0] = entry[0] * (1 - lr * wd) - lr * entry[2] * entry[1]
        opt.step()
        torch.testing.assert_close(w.detach(), ref[id(w)][0], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(b.detach(), ref[id(b)][0], rtol=1e-6, atol=1e-8)
    assert ref[id(w)][2] != _grads((4, 7), 1, seed=1)[0].norm()  # gsnr frozen after warm-up, not trivial


def test_non_matrix_params_get_adamw():
    b = torch.nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(3)))
    b_ref = torch.nn.Parameter(b.detach().clone())
    ours, theirs = Apollo([b], lr=0.01, weight_decay=0.1), torch.optim.AdamW([b_ref], lr=0.01, eps=1e-6, weight_decay=0.1)
    for g in _grads((5,), 4):
        b.grad, b_ref.grad = g.float().clone(), g.float().clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(b.detach(), b_ref.detach())


def test_conv_kernel_is_viewed_as_matrix():
    k = torch.nn.Parameter(torch.zeros(4, 3, 3, 3))  # viewed as (4, 27)
    opt = Apollo([k], lr=0.01, rank=2)
    k.grad = torch.randn(4, 3, 3, 3)
    opt.step()
    assert opt.state[k]["exp_avg"].shape == (2, 27)
    assert k.shape == (4, 3, 3, 3) and k.abs().sum() > 0


# --------------------------------------------------------------------------- DP-specific
def test_sgd_sai_warmup_snr_is_closer_to_clean_snr_under_noise():
    gen = torch.Generator().manual_seed(0)
    signal = 1.0 + 0.5 * torch.randn(400, generator=gen)  # (400,)
    clean = signal.norm() / signal.std(unbiased=False)
    errors = {}
    for warm in (1, 40):
        p = torch.nn.Parameter(torch.zeros(400))
        opt = SGDSaI([p], lr=1e-6, snr_warmup_steps=warm)
        for _ in range(40):
            p.grad = signal + 3.0 * torch.randn(400, generator=gen)  # privatised gradient: signal + DP noise
            opt.step()
        errors[warm] = abs(opt.state[p]["gsnr"].item() - clean.item()) / clean.item()
    assert errors[40] < 0.6 * errors[1], errors


@pytest.mark.parametrize("cls", ALL)
def test_update_reads_only_the_grad(cls):
    """The privatised .grad is all that is used: a model whose real gradient differs gets the same update."""
    torch.manual_seed(0)
    model_a = torch.nn.Linear(8, 5)
    model_b = copy.deepcopy(model_a)
    model_c = copy.deepcopy(model_a)
    opt_a, opt_b, opt_c = (cls(m.parameters(), lr=1e-2) for m in (model_a, model_b, model_c))
    x = torch.randn(16, 8)
    model_a(x).pow(2).mean().backward()  # a real gradient, then overwritten by the engine's noised one
    clean = [p.grad.clone() for p in model_a.parameters()]
    noised = [g + 0.5 * torch.randn_like(g) for g in clean]
    for p, g in zip(model_a.parameters(), noised):
        p.grad = g.clone()
    for p, g in zip(model_b.parameters(), noised):  # no forward/backward at all
        p.grad = g.clone()
    for p, g in zip(model_c.parameters(), clean):
        p.grad = g.clone()
    for opt in (opt_a, opt_b, opt_c):
        opt.step()
    for pa, pb, pc in zip(model_a.parameters(), model_b.parameters(), model_c.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert any(not torch.allclose(pa, pc) for pa, pc in zip(model_a.parameters(), model_c.parameters()))


# --------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("cls", ALL)
def test_state_dict_round_trip_reproduces_next_step(cls):
    kwargs = {"update_proj_gap": 2} if cls in (Apollo, ApolloMini, GaLoreAdamW, Frugal) else {}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Linear(9, 4))
    opt = cls(model.parameters(), lr=1e-2, weight_decay=0.01, **kwargs)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(5)]
    for gs in grads[:3]:
        for p, g in zip(model.parameters(), gs):
            p.grad = g.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    clone = copy.deepcopy(model)
    opt_clone = cls(clone.parameters(), lr=1e-2, weight_decay=0.01, **kwargs)
    opt_clone.load_state_dict(saved)
    for m, o in ((model, opt), (clone, opt_clone)):
        for gs in grads[3:]:  # steps 4 and 5; step 5 refreshes projections / seeds (gap 2)
            for p, g in zip(m.parameters(), gs):
                p.grad = g.clone()
            o.step()
    for p, q in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# --------------------------------------------------------------------------- bad input
def _matrix():
    return [torch.nn.Parameter(torch.zeros(6, 10))]


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("lr", [0.0, -1e-3])
def test_non_positive_lr_is_rejected(cls, lr):
    with pytest.raises(ValueError, match=rf"lr.*{lr}"):
        cls(_matrix(), lr=lr)


@pytest.mark.parametrize("cls", [Apollo, ApolloMini, GaLoreAdamW, Frugal, Swan])
@pytest.mark.parametrize("betas", [(1.0, 0.999), (0.9, -0.1), (0.9,)])
def test_bad_betas_are_rejected(cls, betas):
    with pytest.raises(ValueError, match="betas"):
        cls(_matrix(), lr=1e-3, betas=betas)


@pytest.mark.parametrize("cls", [Apollo, ApolloMini, GaLoreAdamW])
def test_bad_rank_is_rejected(cls):
    with pytest.raises(ValueError, match=r"rank=7.*shape 6x10"):
        cls(_matrix(), lr=1e-3, rank=7)
    with pytest.raises(ValueError, match="rank must be an integer >= 1, found 0"):
        cls(_matrix(), lr=1e-3, rank=0)
    with pytest.raises(ValueError, match=r"rank=7.*shape 10x6.*rank <= 6"):  # tall matrices: the smaller side
        cls([torch.nn.Parameter(torch.zeros(10, 6))], lr=1e-3, rank=7)
    with pytest.raises(ValueError, match=r"rank=3.*shape 2x4x5"):  # >2-D viewed as (2, 20)
        cls([torch.nn.Parameter(torch.zeros(2, 4, 5))], lr=1e-3, rank=3)


@pytest.mark.parametrize("cls", [Apollo, ApolloMini, GaLoreAdamW, Frugal])
@pytest.mark.parametrize("gap", [0, -5])
def test_non_positive_update_proj_gap_is_rejected(cls, gap):
    with pytest.raises(ValueError, match=rf"update_proj_gap must be an integer >= 1, found {gap}"):
        cls(_matrix(), lr=1e-3, update_proj_gap=gap)


def test_method_options_are_validated():
    with pytest.raises(ValueError, match="density must be a number in \\(0, 1\\], found 0"):
        Frugal(_matrix(), lr=1e-3, density=0)
    with pytest.raises(ValueError, match="proj must be one of"):
        Frugal(_matrix(), lr=1e-3, proj="rows")
    with pytest.raises(ValueError, match="momentum must be a number in \\[0, 1\\), found 1.0"):
        SGDSaI(_matrix(), lr=1e-3, momentum=1.0)
    with pytest.raises(ValueError, match="snr_warmup_steps must be an integer >= 1, found 0"):
        SGDSaI(_matrix(), lr=1e-3, snr_warmup_steps=0)
    with pytest.raises(ValueError, match="scale_type"):
        Apollo(_matrix(), lr=1e-3, scale_type="row")
    with pytest.raises(TypeError, match="rank must be an integer"):
        Apollo(_matrix(), lr=1e-3, rank=2.5)
    with pytest.raises(ValueError, match="rank=7"):  # per-group options are validated too
        Apollo([{"params": _matrix(), "rank": 7}], lr=1e-3)


def test_per_group_options():
    a, b = torch.nn.Parameter(torch.zeros(6, 10)), torch.nn.Parameter(torch.zeros(8, 12))
    opt = Apollo([{"params": [a], "rank": 1}, {"params": [b], "rank": 4}], lr=1e-3)
    a.grad, b.grad = torch.randn(6, 10), torch.randn(8, 12)
    opt.step()
    assert opt.state[a]["exp_avg"].shape == (1, 10) and opt.state[b]["exp_avg"].shape == (4, 12)


@pytest.mark.parametrize("cls", ALL + [torch.optim.AdamW])
def test_meta_dry_run_counts_the_same_state_as_a_real_step(cls):
    """Benchmarks count state on meta parameters; the count must equal a real step's."""
    counts = []
    for device in ("meta", "cpu"):
        params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in ((12, 40), (40, 12), (2, 3, 4), (7,))]
        opt = cls(params, lr=1e-3)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        counts.append(optimizer_state_bytes(opt))
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("cls", [Apollo, ApolloMini])
def test_apollo_limiter_is_not_frozen_by_a_zero_gradient(cls):
    w = torch.nn.Parameter(torch.zeros(6, 10))
    opt = cls([w], lr=1e-2)
    w.grad = torch.zeros(6, 10)
    opt.step()
    assert w.abs().sum() == 0
    w.grad = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    opt.step()
    assert w.abs().sum() > 0 and torch.isfinite(w).all()


def test_rejected_param_group_is_not_kept():
    opt = Apollo(_matrix(), lr=1e-3)
    with pytest.raises(ValueError, match="rank=9"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(8, 8))], "rank": 9})
    assert len(opt.param_groups) == 1
