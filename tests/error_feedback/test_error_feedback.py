"""DiceSGD error feedback through the real engine: update vs a hand-written reference, noise std and ledger of the
worst-case bound against independent computations, calibration, resume, bad input, and the clipping-bias
removal on mean estimation with outliers (noise-free, and private where the bound lets DiceSGD win)."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain.accountants import calibrate_noise, compute_epsilon
from dptrain.error_feedback import ErrorFeedback, dice_noise_scale, sensitivity


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on the loaded 2-core machine
    yield
    torch.set_num_threads(previous)


def _data(n=16, d_in=3, d_out=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randn(n, d_out, generator=g)
    x[::5] *= 6.0  # a few large samples: clipped whenever C1 is small
    return x, y


def _model(seed=0, d_in=3, d_out=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 4), nn.Tanh(), nn.Linear(4, d_out))


def _per_sample_loss(model, x, y):
    return 0.5 * (model(x) - y).pow(2).sum(1)  # (B,)


def _private(model, x, y, *, batch_size, lr=0.2, **kwargs):
    engine = dptrain.PrivacyEngine()
    kwargs.setdefault("noise_multiplier", 0.0)
    kwargs.setdefault("poisson_sampling", False)
    model, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size), error_feedback=True, **kwargs,
    )
    return engine, model, optimizer


# ---------------------------------------------------------------------- the hand-written reference
def _reference_run(model, x, y, batches, *, groups, c1s, c2, lr):
    """DiceSGD in float64 from the formulas: per-sample grads by one backward each, group-wise clipping
    (factor min(1, C/(norm + 1e-6)) as the tracker), sum-scale buffer: V = clip_sum + clip(E, C2),
    E += full_sum - V, x -= lr * V / B."""
    params = [p.detach().double().clone() for p in model.parameters()]
    ref = _model()
    ref.double()
    error = [torch.zeros_like(p) for p in params]
    history, max_error_norm = [], 0.0
    for idx in batches:
        with torch.no_grad():
            for p, q in zip(ref.parameters(), params):
                p.copy_(q)
        clip_sum = [torch.zeros_like(p) for p in params]
        full_sum = [torch.zeros_like(p) for p in params]
        for i in idx:
            loss = _per_sample_loss(ref, x[i : i + 1].double(), y[i : i + 1].double()).sum()
            grads = torch.autograd.grad(loss, list(ref.parameters()))
            for members, c in zip(groups, c1s):
                norm = math.sqrt(sum(float(grads[k].pow(2).sum()) for k in members))
                factor = min(1.0, c / (norm + 1e-6))
                for k in members:
                    clip_sum[k] += factor * grads[k]
                    full_sum[k] += grads[k]
        b = len(idx)
        e_norm = math.sqrt(sum(float(e.pow(2).sum()) for e in error))
        max_error_norm = max(max_error_norm, e_norm)
        e_factor = 1.0 if e_norm <= c2 else c2 / e_norm
        for k in range(len(params)):
            v = clip_sum[k] + e_factor * error[k]
            error[k] = error[k] + full_sum[k] - v
            params[k] = params[k] - lr * v / b
        history.append(([p.clone() for p in params], [e.clone() for e in error]))
    return history, max_error_norm


@pytest.mark.parametrize(
    "clipping, c1, c2, clip_active, error_clip_active",
    [
        ("flat", 0.3, 0.45, True, True),  # per-sample and error clipping both active, C2 != C1
        ("flat", 1e4, 2e4, False, False),  # nothing clipped: plain SGD, E stays 0
        ("per_layer", 0.4, 200.0, True, False),  # per-layer thresholds, C2 above the buffer's norm
        ("flat", 0.5, None, True, True),  # default C2 = C1
    ],
)
def test_update_matches_hand_written_reference(clipping, c1, c2, clip_active, error_clip_active):
    x, y = _data()
    model = _model()
    engine, model, optimizer = _private(model, x, y, batch_size=4, clipping=clipping, max_grad_norm=c1,
                                        error_max_grad_norm=c2)
    groups = [[0, 1, 2, 3]] if clipping == "flat" else [[0, 1], [2, 3]]
    c1s = [g.max_norm for g in engine.tracker.groups]
    total_c1 = engine.tracker.total_max_norm
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [0, 5, 10, 15], [1, 2, 3, 4], [6, 7, 8, 9]]
    c2_used = total_c1 if c2 is None else c2
    assert engine.error_feedback.thresholds(optimizer) == (pytest.approx(total_c1), pytest.approx(c2_used))
    history, max_error_norm = _reference_run(model, x, y, batches, groups=groups, c1s=c1s, c2=c2_used, lr=0.2)
    ef = engine.error_feedback
    for step, idx in enumerate(batches):
        # gradient accumulation: two micro-batches of two rows make one logical step
        _per_sample_loss(model, x[idx[:2]], y[idx[:2]]).sum().backward()
        optimizer.accumulate()
        _per_sample_loss(model, x[idx[2:]], y[idx[2:]]).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        expected_params, expected_error = history[step]
        for p, q in zip(model.parameters(), expected_params):
            assert torch.allclose(p.double(), q, rtol=1e-4, atol=1e-5), f"step {step}"
        for p, e in zip(model.parameters(), expected_error):
            assert torch.allclose(ef.error[p].double(), e, rtol=1e-4, atol=1e-5), f"step {step}"
    final_error = ef.error_norm()
    assert (final_error > 1e-3) == clip_active  # the reference really exercised (or skipped) clipping
    assert (max_error_norm > c2_used) == error_clip_active


def test_parameter_without_gradient_keeps_zero_error_and_no_update():
    """A trainable head unused in this forward has no entry in the tracker's sums: treated as zero."""
    x, y = _data(n=8)
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, inp):
            return self.m["used"](inp)

    net = Net()
    before = model["unused"].weight.detach().clone()
    engine, net, optimizer = _private(net, x, y, batch_size=4, max_grad_norm=0.2, error_max_grad_norm=0.3)
    for idx in ([0, 1, 2, 3], [4, 5, 6, 7]):
        _per_sample_loss(net, x[idx], y[idx]).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    ef = engine.error_feedback
    assert torch.equal(model["unused"].weight.detach(), before)
    assert float(ef.error[model["unused"].weight].abs().max()) == 0.0
    assert float(ef.error[model["used"].weight].abs().max()) > 0.0


def test_empty_batch_feeds_back_the_clipped_error_only():
    x, y = _data(n=8)
    engine, model, optimizer = _private(_model(), x, y, batch_size=4, max_grad_norm=0.1, error_max_grad_norm=0.25)
    ef = engine.error_feedback
    _per_sample_loss(model, x[:4], y[:4]).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    e_before = {p: ef.error[p].clone() for p in model.parameters()}
    norm = ef.error_norm()
    assert norm > 0.25  # the feedback below is clipped
    params_before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()  # empty logical batch: no forward, no sums
    for p, p0 in zip(model.parameters(), params_before):
        fed = e_before[p] * (0.25 / norm)  # clip(E, C2) on the sum scale
        assert torch.allclose(p.detach(), p0 - 0.2 * fed / 4, atol=1e-6)
        assert torch.allclose(ef.error[p], e_before[p] - fed, atol=1e-6)


def test_sums_out_of_step_are_refused():
    x, y = _data(n=8)
    engine, model, optimizer = _private(_model(), x, y, batch_size=4, max_grad_norm=1.0)
    p = next(model.parameters())
    engine.tracker.clipped_sum[p] = torch.zeros(p.shape)
    with pytest.raises(RuntimeError, match="unclipped"):
        engine.error_feedback(optimizer, optimizer.plan_step())


# ---------------------------------------------------------------------- noise and accounting
def _gdp_epsilon(mu, delta):
    """Exact epsilon of mu-Gaussian DP at delta (Dong, Roth, Su 2019, Cor. 2.13), by root finding."""
    from scipy import optimize, stats

    def gap(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(gap, 0.0, 200.0, xtol=1e-10)


@pytest.mark.parametrize("poisson, factor_c1", [(True, 1.0), (False, 2.0)])
def test_noise_std_is_z_times_sensitivity_on_zero_gradient_data(poisson, factor_c1):
    """Empty first step: E = 0, the gradient is the noise alone; its std on the sum is z (C1 + 2 C2) with Poisson
    sampling (add/remove) and z (2 C1 + 2 C2) with fixed batches (replace-one)."""
    n, batch, z, c1, c2 = 64, 16, 0.8, 0.5, 1.5
    x, y = torch.zeros(n, 100), torch.zeros(n, 100)
    model = nn.Linear(100, 100)
    engine, model, optimizer = _private(model, x, y, batch_size=batch, noise_multiplier=z, max_grad_norm=c1,
                                        error_max_grad_norm=c2, insecure_noise_seed=1, poisson_sampling=poisson)
    expected_std = z * (factor_c1 * c1 + 2 * c2)
    assert optimizer.noise_std() == pytest.approx(expected_std)
    assert sensitivity(c1, c2, poisson_sampling=poisson) == pytest.approx(factor_c1 * c1 + 2 * c2)
    optimizer.step()  # no forward: the logical batch is empty
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]) * batch  # (10100,) on the sum scale
    # 10100 draws: the sample std is within 3% of the true one with probability > 1 - 1e-9
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.03)
    assert dice_noise_scale(1.0, 1.0) == pytest.approx(3.0)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_ledger_is_full_batch_gaussian_and_matches_independent_accounting(accountant):
    import dp_accounting
    from dp_accounting import rdp as dpa_rdp

    from dptrain.accountants.rdp import DEFAULT_ORDERS

    n, batch, z, steps, delta = 40, 8, 3.0, 12, 1e-5
    x, y = torch.zeros(n, 2), torch.zeros(n, 2)
    engine = dptrain.PrivacyEngine(accountant=accountant)
    model = nn.Linear(2, 2)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch), max_grad_norm=1.0, noise_multiplier=z,
        error_feedback=True, insecure_sampler_seed=0, insecure_noise_seed=0,
    )
    for _ in range(steps):
        optimizer.step()
    assert engine.accountant.history == [(z, 1.0, steps)]  # sample rate 1, not batch / n = 0.2
    eps = engine.get_epsilon(delta)
    # T full-batch Gaussian steps with multiplier z are sqrt(T)/z-Gaussian DP: the exact epsilon is a lower bound
    # for any accountant's certificate and PLD is tight up to its discretisation
    exact = _gdp_epsilon(math.sqrt(steps) / z, delta)
    if accountant == "rdp":
        reference = dpa_rdp.RdpAccountant(orders=list(DEFAULT_ORDERS))
        reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), steps))
        assert eps == pytest.approx(reference.get_epsilon(delta), rel=1e-6)
        assert exact < eps < 1.3 * exact
    else:
        assert exact <= eps * (1 + 1e-9) and eps == pytest.approx(exact, rel=1e-2)
    plain = compute_epsilon(sample_rate=batch / n, noise_multiplier=z, steps=steps, delta=delta,
                            accountant=accountant)
    assert eps > 2 * plain  # the bound pays for the missing amplification


def test_target_epsilon_calibrates_z_at_sample_rate_one():
    n, batch, epochs, target, delta = 50, 10, 2, 3.0, 1e-5
    x, y = torch.zeros(n, 2), torch.zeros(n, 2)
    engine = dptrain.PrivacyEngine()
    model = nn.Linear(2, 2)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch), max_grad_norm=0.5, target_epsilon=target,
        target_delta=delta, epochs=epochs, error_feedback=True, error_max_grad_norm=2.0, insecure_sampler_seed=0,
    )
    steps = epochs * math.ceil(n / batch)
    z = calibrate_noise(target_epsilon=target, sample_rate=1.0, steps=steps, delta=delta)
    assert optimizer.noise_multiplier == pytest.approx(z, rel=1e-12)
    assert optimizer.noise_multiplier > 2 * calibrate_noise(target_epsilon=target, sample_rate=batch / n,
                                                            steps=steps, delta=delta)
    assert optimizer.noise_std() == pytest.approx(z * (0.5 + 2 * 2.0))
    for _ in range(epochs):
        for _batch in loader:
            optimizer.step()
    assert engine.accountant.steps == steps
    assert engine.get_epsilon(delta) == pytest.approx(target, rel=1e-3)
    assert engine.get_epsilon(delta) <= target * (1 + 1e-6)


# ---------------------------------------------------------------------- resume
def _train(model, optimizer, x, y, batches):
    for idx in batches:
        _per_sample_loss(model, x[idx], y[idx]).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_state_dict_round_trip_resumes_exactly():
    x, y = _data()
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [0, 5, 10, 15], [1, 2, 3, 4]]
    settings = dict(batch_size=4, noise_multiplier=0.7, max_grad_norm=0.3, error_max_grad_norm=0.6, insecure_noise_seed=5)
    engine_a, model_a, opt_a = _private(_model(), x, y, **settings)
    _train(model_a, opt_a, x, y, batches)

    engine_b, model_b, opt_b = _private(_model(), x, y, **settings)
    _train(model_b, opt_b, x, y, batches[:3])
    saved = {"engine": engine_b.state_dict(), "model": {k: v.clone() for k, v in model_b.state_dict().items()},
             "optimizer": opt_b.state_dict()}
    assert engine_b.error_feedback.error_norm() > 0

    engine_c, model_c, opt_c = _private(_model(seed=9), x, y, **settings)
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["optimizer"])
    engine_c.load_state_dict(saved["engine"])
    _train(model_c, opt_c, x, y, batches[3:])
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(engine_a.error_feedback.error[p], engine_c.error_feedback.error[q])


def test_load_state_dict_refuses_mismatches():
    x, y = _data()
    engine, model, optimizer = _private(_model(), x, y, batch_size=4, max_grad_norm=0.3, error_max_grad_norm=0.6)
    ef = engine.error_feedback
    state = ef.state_dict()
    with pytest.raises(ValueError, match="3 parameters, this model 4"):
        ef.load_state_dict({**state, "error": state["error"][:3]})
    with pytest.raises(ValueError, match="shape"):
        ef.load_state_dict({**state, "error": [torch.zeros(1)] + state["error"][1:]})
    with pytest.raises(ValueError, match="error_max_grad_norm=0.9"):
        ef.load_state_dict({**state, "error_max_grad_norm": 0.9})


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("c2", [0.5, 0.0, -1.0, float("nan"), float("inf")])
def test_bad_error_max_grad_norm_is_refused(c2):
    x, y = _data()
    with pytest.raises(ValueError, match=r"error_max_grad_norm \(C2\)") as err:
        _private(_model(), x, y, batch_size=4, max_grad_norm=1.0, error_max_grad_norm=c2)
    assert repr(c2) in str(err.value)


def test_per_layer_c2_is_compared_with_the_total_threshold():
    x, y = _data()
    # two layers with 0.6 each: total C1 = 0.6 * sqrt(2) = 0.85 > 0.7
    with pytest.raises(ValueError, match="C1=0.84"):
        _private(_model(), x, y, batch_size=4, clipping="per_layer", max_grad_norm=[0.6, 0.6], error_max_grad_norm=0.7)
    engine, _, optimizer = _private(_model(), x, y, batch_size=4, clipping="per_layer", max_grad_norm=[0.6, 0.6],
                                    error_max_grad_norm=0.9)
    c1 = 0.6 * math.sqrt(2)
    mechanism = optimizer.plan_step()  # fixed batches: replace-one, every step a full-batch Gaussian
    assert mechanism.sensitivity == pytest.approx(2 * c1 + 2 * 0.9)
    assert mechanism.noise_std == pytest.approx(optimizer.noise_multiplier * (2 * c1 + 2 * 0.9))
    assert (mechanism.sampling, mechanism.sample_rate) == ("full", 1.0)


def test_thresholds_raised_above_c2_later_are_refused_at_the_step():
    x, y = _data()
    engine, model, optimizer = _private(_model(), x, y, batch_size=4, max_grad_norm=0.3, error_max_grad_norm=0.6)
    engine.tracker.set_max_norms([0.8])  # e.g. a controller's action
    _per_sample_loss(model, x[:4], y[:4]).sum().backward()
    with pytest.raises(ValueError, match="C2=0.6 < C1=0.8"):
        optimizer.step()


@pytest.mark.parametrize("name, message", [
    ("paper", r"must be one of \('worst_case',\), found 'paper'"),
    ("rdp", r"must be one of \('worst_case',\), found 'rdp'"),
    (None, "found None"),
])
def test_unknown_accounting_is_refused(name, message):
    x, y = _data()
    with pytest.raises(ValueError, match=message):
        _private(_model(), x, y, batch_size=4, max_grad_norm=1.0, error_feedback_accounting=name)


def test_accounting_without_error_feedback_and_controller_with_it_are_refused():
    x, y = _data()
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(ValueError, match="only used with error_feedback=True"):
        dptrain.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            max_grad_norm=1.0, noise_multiplier=1.0, error_feedback_accounting="other")
    with pytest.raises(ValueError, match="cannot be combined with a controller"):
        dptrain.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            max_grad_norm=1.0, target_epsilon=2.0, target_delta=1e-5, epochs=1, error_feedback=True,
            controller=object())


def test_checkpoint_of_the_mean_scale_buffer_is_refused():
    x, y = _data()
    engine, model, optimizer = _private(_model(), x, y, batch_size=4, max_grad_norm=0.3, error_max_grad_norm=0.6)
    state = engine.error_feedback.state_dict()
    old = {k: v for k, v in state.items() if k not in ("error_scale", "accounting", "poisson_sampling")}
    with pytest.raises(ValueError, match="'mean' scale"):
        engine.error_feedback.load_state_dict(old)
    with pytest.raises(ValueError, match="poisson_sampling=True, this run False"):
        engine.error_feedback.load_state_dict({**state, "poisson_sampling": True})


def test_error_feedback_needs_unclipped_sums():
    x, y = _data()
    model = _model()
    engine = dptrain.PrivacyEngine()
    model, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=4), max_grad_norm=1.0, noise_multiplier=0.0,
    )
    with pytest.raises(ValueError, match="track_unclipped"):
        ErrorFeedback(optimizer, error_max_grad_norm=2.0)


# ---------------------------------------------------------------------- clipping bias
def _mean_estimation_data(seed, n=400, d=2):
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, d, generator=g)  # inliers around 0
    x[: n // 20] += torch.tensor([25.0] + [0.0] * (d - 1))  # 5% far away: clipping strongly active
    return x


def _mean_estimation_distance(x, *, error_feedback, seed, steps, lr, c1, c2=None, **privacy):
    """Full-batch training (sample rate 1: DP-SGD gets no amplification either) from w = 0."""
    n, d = x.shape
    torch.manual_seed(seed)
    model = nn.Linear(1, d, bias=False)  # w = model(1): per-sample gradient w - x_i
    nn.init.zeros_(model.weight)
    ones = torch.ones(n, 1)
    engine = dptrain.PrivacyEngine()
    kwargs = dict(error_feedback=True, error_max_grad_norm=c2) if error_feedback else {}
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=DataLoader(TensorDataset(ones, x), batch_size=n), max_grad_norm=c1, insecure_noise_seed=seed,
        insecure_sampler_seed=seed, **privacy, **kwargs,
    )
    for _ in range(steps):
        for inp, target in loader:
            (0.5 * (model(inp) - target).pow(2).sum(1)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    if "target_epsilon" in privacy:
        assert engine.get_epsilon(privacy["target_delta"]) <= privacy["target_epsilon"] * (1 + 1e-6)
    w = model.weight.detach()[:, 0]
    return float((w - x.mean(0)).norm())


def test_dicesgd_removes_clipping_bias_without_noise():
    """The algorithm itself: with C2 = 3 C1 B the feedback outruns the clipped gradients' pull to the inliers."""
    x = _mean_estimation_data(0)
    common = dict(seed=0, steps=60, lr=0.5, c1=0.1, noise_multiplier=0.0)
    dp = _mean_estimation_distance(x, error_feedback=False, **common)
    dice = _mean_estimation_distance(x, error_feedback=True, c2=3 * 0.1 * 400, **common)
    assert dp > 1.0  # DP-SGD's fixed point sits at the inliers, 1.25 from the mean
    assert dice < 0.05 * dp


def test_dicesgd_beats_dp_sgd_at_the_same_epsilon_where_the_bound_allows():
    """Acceptance test of issue 5 under the worst-case bound: 5% far points, same (eps, delta), same C1, full batch.

    Under this bound DiceSGD wins only where noise ~ 2 z C2 / B per step is small next to DP-SGD's bias: on this
    task at eps = 32 (mean distance 0.70 vs 1.23 over 12 seeds, per seed 0.28-1.39: the noise's draw decides, so
    8 seeds and a 0.75x margin); at eps = 8 it gets to ~0.6x DP-SGD's distance, at eps = 2 no gain
    (benchmarks/RESULTS.md, error_feedback). Both runs: 10 full-batch steps, lr 1, C1 = 0.1, C2 = 1.5 C1 B.
    """
    privacy = dict(target_epsilon=32.0, target_delta=1e-5, epochs=10)
    dp, dice = [], []
    for seed in range(8):
        x = _mean_estimation_data(seed)
        common = dict(seed=seed, steps=10, lr=1.0, c1=0.1, **privacy)
        dp.append(_mean_estimation_distance(x, error_feedback=False, **common))
        dice.append(_mean_estimation_distance(x, error_feedback=True, c2=1.5 * 0.1 * 400, **common))
    mean_dp, mean_dice = sum(dp) / len(dp), sum(dice) / len(dice)
    assert mean_dp > 1.0  # clipping bias is real here: DP-SGD stays near the inliers
    assert mean_dice <= 0.75 * mean_dp, (dp, dice)


def _five_dim_task(seed, n=1000, d=5):
    """Mean estimation in 5 dimensions, 5% of the points 25 away along one axis (the clipping bias is 1.25)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, d, generator=g)
    x[: n // 20, 0] += 25.0
    return x


@pytest.mark.parametrize("c1, batch, lr", [(1.0, 50, 1.0), (1.0, 50, 0.3), (0.1, 50, 1.0), (1.0, 1000, 1.0),
                                           (0.1, 1000, 0.3)])
def test_default_feedback_budget_is_never_much_worse_than_dp_sgd(c1, batch, lr):
    """Issue 23: with the old default C2 = C1 * B a 5-dim mean estimation at eps 8 ended 25-250 away from the mean
    where DP-SGD ends ~1.2 (noise (2B + 1)x DP-SGD's at the same z). The default C2 = C1 stays within 1.6x of
    DP-SGD's distance, with Poisson batches (q = 0.05: DiceSGD's bound forgoes the amplification) and full batches.
    Oracle: the sample mean (the non-private optimum), 10 epochs, 3 seeds, the same (eps, delta) for both."""
    privacy = dict(target_epsilon=8.0, target_delta=1e-5, epochs=10)
    dp, dice, old = [], [], []
    for seed in range(3):
        x = _five_dim_task(seed)
        n = x.shape[0]

        def distance(**kwargs):
            return _batched_distance(x, seed=seed, lr=lr, c1=c1, batch=batch, **privacy, **kwargs)

        dp.append(distance(error_feedback=False))
        dice.append(distance(error_feedback=True))
        if batch < n:
            old.append(distance(error_feedback=True, c2=c1 * batch))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert 1.0 < mean(dp) < 1.5  # DP-SGD sits near the inliers: the clipping bias (1.25)
    assert mean(dice) <= 1.6 * mean(dp), (dp, dice)
    if old and lr == 1.0 and c1 == 1.0:
        assert mean(old) > 10 * mean(dp)  # what the old default did here


def _batched_distance(x, *, error_feedback, seed, lr, c1, batch, epochs, c2=None, **privacy):
    """||w - mean(x)|| after ``epochs`` passes of Poisson batches of expected size ``batch`` (SGD from w = 0)."""
    n, d = x.shape
    torch.manual_seed(seed)
    model = nn.Linear(1, d, bias=False)  # w = model(1): per-sample gradient w - x_i
    nn.init.zeros_(model.weight)
    engine = dptrain.PrivacyEngine()
    kwargs = dict(error_feedback=True, error_max_grad_norm=c2) if error_feedback else {}
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=DataLoader(TensorDataset(torch.ones(n, 1), x), batch_size=batch), max_grad_norm=c1,
        epochs=epochs, insecure_noise_seed=seed, insecure_sampler_seed=seed, **privacy, **kwargs,
    )
    for _ in range(epochs):
        for inp, target in loader:
            if len(inp):
                (0.5 * (model(inp) - target).pow(2).sum(1)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert engine.get_epsilon(privacy["target_delta"]) <= privacy["target_epsilon"] * (1 + 1e-6)
    return float((model.weight.detach()[:, 0] - x.mean(0)).norm())
