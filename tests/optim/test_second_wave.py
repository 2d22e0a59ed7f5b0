"""MicroAdam, LDAdam and DCTAdamW against slow, literal re-implementations of each paper's update rule.

The references below are written from the papers' algorithms with plain loops and Python floats where that
is natural; they share no code with ``dptrain.optim``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dptrain.optim import DCTAdamW, LDAdam, MicroAdam, optimizer_state_bytes

NEW = [MicroAdam, LDAdam, DCTAdamW]
SHAPES = [(7, 13), (13, 7), (3, 4, 5), (30,)]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _grads(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


def _start(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _compare(cls, shape, reference, steps=7, **kwargs):
    """Run ``cls`` on a float64 parameter with random gradients; after every step it must equal ``reference``."""
    w = torch.nn.Parameter(_start(shape))
    opt = cls([w], **kwargs)
    grads = _grads(shape, steps)
    expected = reference(_start(shape), grads)
    for g, want in zip(grads, expected):
        w.grad = g.clone()
        opt.step()
        torch.testing.assert_close(w.detach(), want, rtol=1e-5, atol=1e-7)
        assert torch.equal(w.grad, g)  # the gradient is only read
    return opt, w


def _adamw(p, grads, lr, wd, b1, b2, eps):
    """Textbook AdamW, one entry at a time."""
    p = p.flatten().tolist()
    m, v, out = [0.0] * len(p), [0.0] * len(p), []
    for t, g in enumerate(grads, start=1):
        g = g.flatten().tolist()
        for i in range(len(p)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            step = (m[i] / (1 - b1**t)) / (math.sqrt(v[i] / (1 - b2**t)) + eps)
            p[i] = p[i] * (1 - lr * wd) - lr * step
        out.append(torch.tensor(p, dtype=torch.float64).view(grads[0].shape))
    return out


def _as_wide(x):
    """A >= 2-D tensor as the (m, n), m <= n, matrix the low-rank papers work on."""
    mat = x.reshape(x.shape[0], -1)
    return (mat.t(), True) if mat.shape[0] > mat.shape[1] else (mat, False)


def _back(mat, transposed, shape):
    return (mat.t() if transposed else mat).reshape(shape)


# --------------------------------------------------------------------------- MicroAdam
def _bf16(x):
    return torch.tensor(x, dtype=torch.float64).to(torch.bfloat16).item()


def microadam_reference(p0, grads, *, lr, wd, m, density, topk_block, quant_block, b1=0.9, b2=0.999, eps=1e-8):
    """Algorithm 1 of the MicroAdam paper, entry by entry."""
    d = p0.numel()
    p = p0.flatten().tolist()
    deq = [0.0] * d  # Q^-1(e), the error is zero at first
    window = []  # the last m sparse gradients, oldest first: {flat index: bf16 value}
    block = min(topk_block, d)
    out = []
    for t, grad in enumerate(grads, start=1):
        a = [gi + ei for gi, ei in zip(grad.flatten().tolist(), deq)]
        sparse = {}
        for start in range(0, d, block):
            members = list(range(start, min(start + block, d)))
            k = math.ceil(density * len(members))
            for i in sorted(members, key=lambda i: -abs(a[i]))[:k]:
                sparse[i] = _bf16(a[i])
        for i in sparse:
            a[i] = 0.0
        window = (window + [sparse])[-m:]
        for start in range(0, d, quant_block):  # e = Q(a), then Q^-1(e) for the next step
            chunk = range(start, min(start + quant_block, d))
            lo, hi = min(a[i] for i in chunk), max(a[i] for i in chunk)
            unit = (hi - lo) / 15
            for i in chunk:
                code = math.floor((a[i] - lo) / unit + 0.5) if unit > 0 else 0
                deq[i] = lo + code * unit
        first, second = [0.0] * d, [0.0] * d
        for age, sparse_g in enumerate(reversed(window)):
            for i, value in sparse_g.items():
                first[i] += b1**age * value
                second[i] += b2**age * value * value
        for i in range(d):
            m_hat = (1 - b1) / (1 - b1**t) * first[i]
            v_hat = (1 - b2) / (1 - b2**t) * second[i]
            p[i] = p[i] * (1 - lr * wd) - lr * m_hat / (math.sqrt(v_hat) + eps)
        out.append(torch.tensor(p, dtype=torch.float64).view(p0.shape))
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_microadam_matches_reference(shape):
    options = dict(lr=0.01, weight_decay=0.1, m=3, density=0.1, topk_block_size=16, quant_block_size=24)
    reference = lambda p0, grads: microadam_reference(  # noqa: E731
        p0, grads, lr=0.01, wd=0.1, m=3, density=0.1, topk_block=16, quant_block=24)
    opt, w = _compare(MicroAdam, shape, reference, steps=7, **options)  # 7 steps: the ring of 3 wraps twice
    assert opt.state[w]["ring_values"].dtype == torch.bfloat16 and opt.state[w]["ring_indices"].dtype == torch.int16


def test_microadam_matches_reference_at_defaults():
    reference = lambda p0, grads: microadam_reference(  # noqa: E731
        p0, grads, lr=1e-3, wd=0.0, m=10, density=0.01, topk_block=16384, quant_block=100_000)
    _compare(MicroAdam, (20, 12), reference, steps=12)


def test_microadam_constant_error_block_decodes_exactly():
    w = torch.nn.Parameter(torch.zeros(8))
    opt = MicroAdam([w], lr=0.1, density=1.0)  # every entry is kept: the error is all zeros
    w.grad = torch.arange(8.0)
    opt.step()
    assert opt.state[w]["error"].eq(0).all() and opt.state[w]["error_max"].eq(0).all()


# --------------------------------------------------------------------------- LDAdam
def ldadam_reference(p0, grads, *, lr, wd, rank, rho=0.908, b1=0.908, b2=0.99, eps=1e-8, error_feedback=True):
    """Algorithm 1 of the LDAdam paper (left projection on the wide view)."""
    p, out = p0.clone(), []
    for t, grad in enumerate(grads, start=1):
        g, transposed = _as_wide(grad)
        rows, cols = g.shape
        r = min(rank, rows)
        if t == 1:
            err = torch.zeros(rows, cols, dtype=torch.float64)
            mom, sec = torch.zeros(r, cols, dtype=torch.float64), torch.zeros(r, cols, dtype=torch.float64)
            p_old = torch.zeros(rows, r, dtype=torch.float64)
        acc = g + err if error_feedback else g
        if t == 1:
            p_new = torch.linalg.svd(acc, full_matrices=False)[0][:, :r]
        else:
            target = rho * (p_old @ mom) / (1 - b1 ** (t - 1)) + (1 - rho) * acc
            p_new = torch.linalg.qr(target @ target.t() @ p_old)[0]
        low = p_new.t() @ acc
        rot = p_new.t() @ p_old
        mom_moved = rot @ mom
        err = acc - p_new @ low + b1 / (1 - b1) * (p_old @ mom - p_new @ mom_moved)
        if t > 1:
            c1, c2 = 1 - b1 ** (t - 1), 1 - b2 ** (t - 1)
            variance = sec / c2 - mom**2 / c1**2
            sec = (((rot**2) @ variance + mom_moved**2 / c1**2) * c2).abs()
        mom = b1 * mom_moved + (1 - b1) * low
        sec = b2 * sec + (1 - b2) * low**2
        update = p_new @ ((mom / (1 - b1**t)) / ((sec / (1 - b2**t)).sqrt() + eps))
        p = p * (1 - lr * wd) - lr * _back(update, transposed, grad.shape)
        p_old = p_new
        out.append(p.clone())
    return out


@pytest.mark.parametrize("shape", SHAPES[:3] + [(6, 10)])
@pytest.mark.parametrize("error_feedback", [True, False])
def test_ldadam_matches_reference(shape, error_feedback):
    rank = 2
    reference = lambda p0, grads: ldadam_reference(p0, grads, lr=0.01, wd=0.1, rank=rank,  # noqa: E731
                                                   error_feedback=error_feedback)
    opt, w = _compare(LDAdam, shape, reference, lr=0.01, weight_decay=0.1, rank=rank, error_feedback=error_feedback)
    assert ("error" in opt.state[w]) == error_feedback


def test_ldadam_default_rank_is_clamped_and_vectors_get_adamw():
    rank_16 = lambda p0, grads: ldadam_reference(p0, grads, lr=1e-3, wd=0.0, rank=16)  # noqa: E731
    opt, w = _compare(LDAdam, (5, 9), rank_16, steps=4)  # rank 16 > 5: the whole (5, 9) space
    assert opt.state[w]["projector"].shape == (5, 5)
    adamw = lambda p0, grads: _adamw(p0, grads, 0.01, 0.1, 0.908, 0.99, 1e-8)  # noqa: E731
    _compare(LDAdam, (30,), adamw, steps=4, lr=0.01, weight_decay=0.1)



def _accumulating_run(opt, params, grads):
    """A training loop as backward runs it: zero_grad, then each gradient ADDED into .grad."""
    for gs in grads:
        opt.zero_grad()
        for p, g in zip(params, gs):
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        opt.step()


@pytest.mark.parametrize("shape", [(6, 10), (13, 7), (3, 4, 5)])
def test_ldadam_error_in_grad_matches_reference(shape):
    """error_storage="grad" (the authors' way): .grad holds E between steps, the next gradient is added to it."""
    grads = _grads(shape, 7)
    expected = ldadam_reference(_start(shape), grads, lr=0.01, wd=0.1, rank=2)
    w = torch.nn.Parameter(_start(shape))
    opt = LDAdam([w], lr=0.01, weight_decay=0.1, rank=2, error_storage="grad")
    for g, want in zip(grads, expected):
        _accumulating_run(opt, [w], [[g]])
        torch.testing.assert_close(w.detach(), want, rtol=1e-5, atol=1e-7)
    assert "error" not in opt.state[w] and opt.keeps_state_in_grad(w) and w.grad.norm() > 0


def test_ldadam_error_in_grad_resumes_exactly_and_refuses_a_cleared_grad():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Linear(9, 4)).double()
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(6)]
    opt = LDAdam(model.parameters(), lr=1e-2, rank=3, error_storage="grad")
    _accumulating_run(opt, list(model.parameters()), grads[:3])
    saved = copy.deepcopy(opt.state_dict())
    clone = copy.deepcopy(model)
    for q in clone.parameters():
        q.grad = None  # a fresh process: the buffer comes back from the state dict only
    opt_clone = LDAdam(clone.parameters(), lr=1e-2, rank=3, error_storage="grad")
    opt_clone.load_state_dict(saved)
    _accumulating_run(opt, list(model.parameters()), grads[3:])
    _accumulating_run(opt_clone, list(clone.parameters()), grads[3:])
    for p, q in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    model.zero_grad()  # clears the buffers LDAdam keeps in .grad
    with pytest.raises(RuntimeError, match="error-feedback buffer in .grad.*parameter 0 was cleared"):
        opt.step()


def test_ldadam_error_in_grad_under_dp_equals_the_error_kept_as_state():
    """The DP optimizer adds its privatised gradient into the buffer: the same run, bit for bit, as with the
    buffer kept as optimizer state, with no m x n optimizer state."""
    import dptrain
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 6, generator=gen), torch.randn(64, 3, generator=gen))
    finals, states = [], []
    for storage in ("state", "grad"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        dp_model, dp_opt, loader = dptrain.PrivacyEngine().make_private(
            module=model, optimizer=LDAdam(model.parameters(), lr=1e-2, rank=2, error_storage=storage),
            data_loader=DataLoader(data, batch_size=16), max_grad_norm=1.0, noise_multiplier=1.0,
            insecure_noise_seed=0, insecure_sampler_seed=0)
        for (x, y), _ in zip(loader, range(5)):
            dp_opt.zero_grad()
            if len(x):
                (dp_model(x) - y).pow(2).mean(1).mean().backward()
            dp_opt.step()
        finals.append([p.detach().clone() for p in model.parameters()])
        states.append(optimizer_state_bytes(dp_opt))
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert states[0] - states[1] == (6 * 8 + 8 * 3) * 4  # the two m x n buffers


# --------------------------------------------------------------------------- DCT-AdamW
def dct_reference(p0, grads, *, lr, wd, rank, gap, rotate, error_feedback, b1=0.9, b2=0.999, eps=1e-8):
    """DCT-AdamW (arXiv 2505.17967) with the dynamic column selection of its Algorithm 1, on the wide view."""
    p, out = p0.clone(), []
    for t, grad in enumerate(grads, start=1):
        g, transposed = _as_wide(grad)
        rows, cols = g.shape
        if t == 1:
            q = torch.tensor([[math.sqrt(2 / rows) * (math.sqrt(0.5) if i == 0 else 1.0)
                               * math.cos(math.pi * i * (2 * j + 1) / (2 * rows)) for j in range(rows)]
                              for i in range(rows)], dtype=torch.float64)
            err = torch.zeros(rows, cols, dtype=torch.float64)
            mom, sec = torch.zeros(rank, cols, dtype=torch.float64), torch.zeros(rank, cols, dtype=torch.float64)
            chosen = None
        acc = g + err if error_feedback else g
        if t == 1 or t % gap == 0:
            sim = q.t() @ acc
            norms = [sum(abs(x) for x in sim[i].tolist()) for i in range(rows)]
            new = sorted(range(rows), key=lambda i: -norms[i])[:rank]
            if rotate and chosen is not None:
                rot = q[:, new].t() @ q[:, chosen]
                mom, sec = rot @ mom, (rot @ sec).abs()
            chosen = new
        low = q[:, chosen].t() @ acc
        if error_feedback:
            err = acc - q[:, chosen] @ low
        mom = b1 * mom + (1 - b1) * low
        sec = b2 * sec + (1 - b2) * low**2
        update = q[:, chosen] @ ((mom / (1 - b1**t)) / ((sec / (1 - b2**t)).sqrt() + eps))
        p = p * (1 - lr * wd) - lr * _back(update, transposed, grad.shape)
        out.append(p.clone())
    return out


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("rotate, error_feedback", [(False, False), (True, False), (False, True), (True, True)])
def test_dct_adamw_matches_reference(shape, rank, rotate, error_feedback):
    kwargs = dict(lr=0.01, weight_decay=0.1, rank=rank, update_proj_gap=2)  # new columns at steps 1, 2, 4, 6
    reference = lambda p0, grads: dct_reference(p0, grads, lr=0.01, wd=0.1, rank=rank, gap=2,  # noqa: E731
                                                rotate=rotate, error_feedback=error_feedback)
    opt, w = _compare(DCTAdamW, shape, reference, rotate_subspace=rotate, error_feedback=error_feedback, **kwargs)
    assert opt.state[w]["indices"].dtype == torch.int32 and opt.state[w]["indices"].shape == (rank,)


def test_dct_adamw_defaults_and_fallbacks():
    every_step = lambda p0, grads: dct_reference(p0, grads, lr=1e-3, wd=0.0, rank=2, gap=1,  # noqa: E731
                                                 rotate=False, error_feedback=False)
    _compare(DCTAdamW, (8, 12), every_step, steps=4)  # default rank ceil(8 / 4) = 2, new columns every step
    adamw = lambda p0, grads: _adamw(p0, grads, 0.01, 0.1, 0.9, 0.999, 1e-8)  # noqa: E731
    _compare(DCTAdamW, (30,), adamw, steps=3, lr=0.01, weight_decay=0.1)
    for shape in ((6, 12), (12, 6)):  # a side >= max_shape: full-rank AdamW, like embeddings and LM heads
        _compare(DCTAdamW, shape, adamw, steps=3, lr=0.01, weight_decay=0.1, max_shape=12)


# --------------------------------------------------------------------------- memory
def _gpt2_small_like_shapes():
    d, layers = 768, 12
    per_layer = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return [(50257, d), (1024, d)] + per_layer * layers + [(d,), (d,)]


def _meta_state_bytes(opt_cls, shapes, **kwargs):
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in shapes]
    opt = opt_cls(params, lr=1e-3, **kwargs)
    for p in params:
        p.grad = torch.empty_like(p)
    opt.step()
    return optimizer_state_bytes(opt), sum(p.numel() for p in params)


def test_microadam_state_is_under_1_1_bytes_per_parameter():
    state, numel = _meta_state_bytes(MicroAdam, _gpt2_small_like_shapes())
    assert state / numel <= 1.1, state / numel
    w = torch.nn.Parameter(torch.zeros(512, 2048))  # a real step: exact count
    opt = MicroAdam([w])
    w.grad = torch.randn(512, 2048, generator=torch.Generator().manual_seed(0))
    opt.step()
    d, k = 512 * 2048, 64 * math.ceil(0.01 * 16384)
    expected = 10 * k * (2 + 2) + d // 2 + 2 * math.ceil(d / 100_000) * 4 + 8  # ring, 4-bit error, min/max, step
    assert optimizer_state_bytes(opt) == expected and expected / d <= 1.1


@pytest.mark.parametrize("error_feedback", [False, True])
def test_ldadam_state_is_counted(error_feedback):
    m, n, r = 64, 256, 8
    w = torch.nn.Parameter(torch.zeros(n, m))  # tall: projected on its 64 side
    opt = LDAdam([w], rank=r, error_feedback=error_feedback)
    w.grad = torch.randn(n, m, generator=torch.Generator().manual_seed(0))
    opt.step()
    low_rank = (m * r + 2 * n * r) * 4 + 8
    assert low_rank <= 2 * r * (m + n) * 4 + 8
    assert optimizer_state_bytes(opt) == low_rank + (m * n * 4 if error_feedback else 0)


def test_dct_state_is_indices_moments_and_one_shared_basis():
    m, n, r = 64, 256, 8
    params = [torch.nn.Parameter(torch.zeros(m, n)) for _ in range(3)]
    opt = DCTAdamW(params, rank=r)
    for p in params:
        p.grad = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    opt.step()
    per_matrix = 2 * n * r * 4 + r * 4 + 8  # moments, int32 indices, step
    assert per_matrix <= 2 * r * (m + n) * 4 + 64
    assert opt.shared_state_bytes() == m * m * 4  # one basis for the three matrices
    assert optimizer_state_bytes(opt) == 3 * per_matrix + m * m * 4


# --------------------------------------------------------------------------- state_dict, DP engine, HF
@pytest.mark.parametrize("cls, kwargs", [(MicroAdam, dict(density=0.2, m=2)), (LDAdam, dict(rank=3)),
                                         (LDAdam, dict(rank=3, error_feedback=False)),
                                         (DCTAdamW, dict(rank=3, update_proj_gap=2, rotate_subspace=True,
                                                         error_feedback=True))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_dict_round_trip_resumes_identically(cls, kwargs, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Linear(9, 4)).to(dtype)
    opt = cls(model.parameters(), lr=1e-2, weight_decay=0.01, **kwargs)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(6)]
    for gs in grads[:3]:
        for p, g in zip(model.parameters(), gs):
            p.grad = g.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    clone = copy.deepcopy(model)
    opt_clone = cls(clone.parameters(), lr=1e-2, weight_decay=0.01, **kwargs)
    opt_clone.load_state_dict(saved)
    for p, q in zip(model.parameters(), clone.parameters()):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert opt_clone.state[q][key].dtype == value.dtype, key  # bf16 ring values stay bf16
    for mod, o in ((model, opt), (clone, opt_clone)):
        for gs in grads[3:]:
            for p, g in zip(mod.parameters(), gs):
                p.grad = g.clone()
            o.step()
    for p, q in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("cls", NEW)
def test_dp_engine_steps_equal_the_optimizer_on_the_privatised_gradients(cls):
    """Through make_private the optimizer sees only the engine's noised .grad, written anew each step; its
    error buffers live in its own state, so replaying the released gradients reproduces the run exactly."""
    import dptrain
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 6, generator=gen), torch.randn(64, 3, generator=gen))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    start = copy.deepcopy(model)
    engine = dptrain.PrivacyEngine()
    dp_model, dp_opt, loader = engine.make_private(
        module=model, optimizer=cls(model.parameters(), lr=1e-2), data_loader=DataLoader(data, batch_size=16),
        max_grad_norm=1.0, noise_multiplier=1.0, insecure_noise_seed=0, insecure_sampler_seed=0)
    released = []
    dp_opt.step_callbacks.append(lambda o, mech: released.append([p.grad.clone() for p in o.params]))
    for (x, y), _ in zip(loader, range(4)):
        dp_opt.zero_grad()
        if len(x):
            (dp_model(x) - y).pow(2).mean(1).mean().backward()
        dp_opt.step()
    assert len(released) == 4 and optimizer_state_bytes(dp_opt) > 0
    replay = cls(start.parameters(), lr=1e-2)
    for grads in released:
        for p, g in zip(start.parameters(), grads):
            p.grad = g.clone()
        replay.step()
    for p, q in zip(model.parameters(), start.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("cls", NEW)
def test_hf_dp_trainer_takes_the_optimizer(cls, tmp_path):
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from dptrain.finetune.loss import PadCollator, TokenizedTexts
    from dptrain.integrations.hf import DPTrainer
    from tests.finetune.helpers import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer(seed=1, n_embd=16)
    texts = [f"record {i}: dose {i % 5 + 1}00 mg" for i in range(24)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    opt = cls(model.parameters(), lr=1e-3)
    trainer = DPTrainer(model=model, args=args, train_dataset=TokenizedTexts(texts, tok, 32),
                        data_collator=PadCollator(tok.pad_token_id), optimizers=(opt, None), noise_multiplier=1.0,
                        insecure_noise_seed=0, insecure_sampler_seed=0)
    trainer.train()
    assert trainer.engine.optimizer.steps_taken == 2 and trainer.engine.optimizer.original_optimizer is opt
    assert all(s["step"] == 2 for s in opt.state.values())


# --------------------------------------------------------------------------- bad input
def test_options_are_validated():
    w = [torch.nn.Parameter(torch.zeros(6, 10))]
    with pytest.raises(ValueError, match="density must be a number in"):
        MicroAdam(w, density=0.0)
    with pytest.raises(ValueError, match="topk_block_size must be <= 32768"):
        MicroAdam(w, topk_block_size=40_000)
    with pytest.raises(ValueError, match="m must be an integer >= 1, found 0"):
        MicroAdam(w, m=0)
    with pytest.raises(ValueError, match=r"rho must be a number in \[0, 1\), found 1.0"):
        LDAdam(w, rho=1.0)
    with pytest.raises(TypeError, match="error_feedback must be a bool"):
        LDAdam(w, error_feedback="yes")
    with pytest.raises(ValueError, match="error_storage must be 'state' or 'grad', found 'gpu'"):
        LDAdam(w, error_storage="gpu")
    with pytest.raises(ValueError, match="rank must be an integer >= 1, found 0"):
        DCTAdamW(w, rank=0)
    with pytest.raises(ValueError, match="update_proj_gap must be an integer >= 1"):
        DCTAdamW(w, update_proj_gap=0)
    for cls in NEW:
        with pytest.raises(ValueError, match="lr"):
            cls(w, lr=0.0)
        with pytest.raises(ValueError, match="betas"):
            cls(w, betas=(1.0, 0.9))


@pytest.mark.parametrize("cls", NEW)
def test_meta_dry_run_counts_the_same_state_as_a_real_step(cls):
    counts = []
    for device in ("meta", "cpu"):
        params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in ((12, 40), (40, 12), (2, 3, 4), (7,))]
        opt = cls(params, lr=1e-3)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        counts.append(optimizer_state_bytes(opt))
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("cls", NEW)
def test_least_squares_loss_falls(cls):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=gen)
    y = x @ torch.randn(12, 20, generator=gen).t()  # (64, 12)
    w, b = torch.nn.Parameter(torch.zeros(12, 20)), torch.nn.Parameter(torch.zeros(12))
    options = {MicroAdam: {"density": 0.2}, DCTAdamW: {"rotate_subspace": True}}.get(cls, {})  # rank 3 of 12
    opt = cls([w, b], lr=1e-2, **options)
    losses = []
    for _ in range(200):
        loss = ((x @ w.t() + b - y) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0], f"{cls.__name__}: {losses[0]:.3f} -> {losses[-1]:.3f}"
