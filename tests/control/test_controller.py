"""SACController in real (tiny) private training runs: budget, ledger, adaptation, guard, checkpoints, bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain.accountants import RDPAccountant
from dptrain.control import BudgetExhaustedError, SACController

DELTA = 1e-5
N, BATCH = 64, 8  # sample rate 1/8: 8 logical steps per epoch
S = 4.0  # release noise std: the default m/20 = 0.4 is far too little noise for a batch of 8


def _data(seed=0, n=N, d=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, 1, generator=g) + 0.3 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def _per_sample_loss(model, x, y):
    return (model(x) - y).pow(2).flatten(1).mean(1)  # (B,)


def _setup(ctrl, *, target_epsilon=4.0, epochs=3, clipping="per_layer", seed=0, max_grad_norm=1.0, accountant="rdp"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    engine = dptrain.PrivacyEngine(accountant=accountant)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(_data(seed), batch_size=BATCH),
        max_grad_norm=max_grad_norm, target_epsilon=target_epsilon, target_delta=DELTA, epochs=epochs,
        clipping=clipping, controller=ctrl, insecure_noise_seed=seed, insecure_sampler_seed=seed,
    )
    return engine, model, optimizer, loader


def _train(model, optimizer, loader, epochs, ctrl=None):
    for _ in range(epochs):
        for x, y in loader:
            losses = _per_sample_loss(model, x, y)
            if ctrl is not None and ctrl.loss_bound is not None:
                ctrl.observe_losses(losses)
            losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad()


def _validation(model, data=_data(seed=99, n=32)):
    return lambda: float(_per_sample_loss(model, *data.tensors).mean())


def _gradient_steps_only_epsilon(engine, ctrl):
    """Epsilon of the gradient steps alone, rebuilt from the controller's sigma schedule (no releases)."""
    acc = RDPAccountant()
    sigmas = [(h["step"], h["noise_multiplier"]) for h in ctrl.history] + [(ctrl.total_steps, None)]
    for (start, sigma), (stop, _) in zip(sigmas[:-1], sigmas[1:]):
        acc.step(noise_multiplier=sigma, sample_rate=engine.sample_rate, steps=stop - start)
    return acc.get_epsilon(DELTA)


def test_sac_run_adapts_sigma_and_thresholds_and_ends_within_budget():
    ctrl = SACController(release_noise_std=S, interval=3, seed=0, warmup=1, updates_per_action=5)
    engine, model, optimizer, loader = _setup(ctrl)
    ctrl.validation_loss = _validation(model)
    _train(model, optimizer, loader, epochs=3)
    assert optimizer.steps_taken == ctrl.total_steps == 24
    sigmas = [h["noise_multiplier"] for h in ctrl.history]
    norms = [tuple(h["max_grad_norm"]) for h in ctrl.history]
    assert len(ctrl.history) == 1 + ctrl.releases_planned == 1 + 7
    assert len(set(sigmas)) > 2 and len(set(norms)) > 2, (sigmas, norms)
    assert all(len(n) == 2 for n in norms)  # per_layer: one threshold per Linear
    assert all(h["noise_multiplier"] >= h["sigma_floor"] for h in ctrl.history)
    assert all(isinstance(h["reward"], float) for h in ctrl.history[2:])
    assert engine.get_epsilon(DELTA) <= 4.0


def test_clip_fraction_releases_are_in_the_ledger():
    ctrl = SACController(release_noise_std=S, interval=4, seed=1, validation_loss=lambda: 0.0)
    engine, model, optimizer, loader = _setup(ctrl, clipping="per_layer", max_grad_norm=0.2)
    _train(model, optimizer, loader, epochs=3)
    release_sigma = ctrl.release_noise_std_used / math.sqrt(2)  # two groups released together
    assert ctrl.releases_planned == 5
    # expected ledger, step by step: the sigma in force; release steps (4, 8, ..., 20) joint with their statistics
    expected, in_force = [], ctrl.history[0]["noise_multiplier"]
    actions = {h["step"]: h["noise_multiplier"] for h in ctrl.history[1:]}
    for step in range(1, 25):
        joint = step in actions
        expected.append((in_force ** -2 + release_sigma ** -2) ** -0.5 if joint else in_force)
        in_force = actions.get(step, in_force)
    ledger = [sigma for sigma, q, steps in engine.accountant.history for _ in range(steps)]
    assert all(q == engine.sample_rate for _, q, _ in engine.accountant.history)
    np.testing.assert_allclose(ledger, expected, rtol=1e-12)
    assert engine.get_epsilon(DELTA) > _gradient_steps_only_epsilon(engine, ctrl) * 1.001
    fractions = [h["clip_fraction"] for h in ctrl.history[1:]]
    assert all(len(f) == 2 for f in fractions)


@settings(max_examples=4, deadline=None)
@given(actions=st.lists(st.lists(st.floats(-1, 1), min_size=3, max_size=3), min_size=8, max_size=8),
       target=st.sampled_from([1.0, 3.0, 8.0]))
def test_random_action_sequences_never_end_above_target(actions, target):
    queue = list(actions)
    ctrl = SACController(release_noise_std=S, interval=3, seed=2, policy=lambda obs: queue.pop(0), validation_loss=lambda: 1.0)
    engine, model, optimizer, loader = _setup(ctrl, target_epsilon=target)
    _train(model, optimizer, loader, epochs=3)
    assert engine.get_epsilon(DELTA) <= target
    assert all(h["noise_multiplier"] >= h["sigma_floor"] for h in ctrl.history)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_adversary_asking_for_sigma_min_is_held_at_the_floor(clipping):
    """Always the smallest sigma and growing thresholds: the guard binds, the run spends almost exactly the budget."""
    groups = 1 if clipping == "flat" else 2
    ctrl = SACController(release_noise_std=S, interval=2, seed=3, sigma_min=0.05, policy=lambda obs: [1.0] * groups + [-1.0])
    engine, model, optimizer, loader = _setup(ctrl, target_epsilon=2.0, clipping=clipping)
    _train(model, optimizer, loader, epochs=3)
    eps = engine.get_epsilon(DELTA)
    assert eps <= 2.0
    assert eps > 1.9  # the floor is tight (sigma to 1%), so nothing is wasted either
    assert all(math.isclose(h["noise_multiplier"], h["sigma_floor"]) for h in ctrl.history[1:])
    assert ctrl.history[-1]["max_grad_norm"][0] > ctrl.history[0]["max_grad_norm"][0]


def test_guard_refuses_a_step_beyond_the_budget_before_any_noise():
    ctrl = SACController(release_noise_std=S, interval=4, seed=4, policy=lambda obs: [0.0, 0.0, -1.0])
    engine, model, optimizer, loader = _setup(ctrl, target_epsilon=2.0, epochs=1)
    _train(model, optimizer, loader, epochs=1)
    assert engine.get_epsilon(DELTA) <= 2.0
    ledger, params = engine.accountant.history, [p.detach().clone() for p in model.parameters()]
    optimizer.noise_multiplier = 0.3  # beyond the plan, with little noise: does not fit
    x, y = _data().tensors
    _per_sample_loss(model, x[:8], y[:8]).mean().backward()
    with pytest.raises(BudgetExhaustedError, match="target_epsilon=2.0"):
        optimizer.step()
    assert engine.accountant.history == ledger  # nothing accounted
    assert engine.tracker.num_samples == 0 and not engine.tracker.clipped_sum  # the batch is gone for good
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))  # nothing updated
    assert engine.get_epsilon(DELTA) <= 2.0


def test_noisy_training_loss_release_is_one_more_coordinate():
    ctrl = SACController(release_noise_std=S, interval=4, seed=5, loss_bound=10.0)
    engine, model, optimizer, loader = _setup(ctrl)
    _train(model, optimizer, loader, epochs=3, ctrl=ctrl)
    assert math.isclose(ctrl.release_sigma, S / math.sqrt(3))  # 2 counts + 1 bounded loss
    assert all(h["loss"] is not None for h in ctrl.history[1:])
    assert engine.get_epsilon(DELTA) <= 4.0


def test_release_noise_matches_its_calibration():
    """Released fractions: mean count/m and std s/m (closed form), over many draws."""
    from dptrain.control.release import release_statistics

    g = torch.Generator().manual_seed(0)
    draws = np.array([release_statistics([6, 2], expected_batch_size=8.0, noise=0.4 * torch.randn(3, generator=g),
                                         loss_sum=3.0, loss_bound=2.0) for _ in range(4000)], dtype=object)
    fractions = np.array([d.unclipped_fraction for d in draws])  # (4000, 2)
    losses = np.array([d.loss for d in draws])
    np.testing.assert_allclose(fractions.mean(0), [0.75, 0.25], atol=4 * 0.05 / math.sqrt(4000))
    np.testing.assert_allclose(fractions.std(0), [0.05, 0.05], rtol=0.06)
    assert abs(losses.mean() - 3.0 / 8) < 4 * 0.1 / math.sqrt(4000)  # loss noise std s * L / m = 0.1


def test_checkpoint_resume_restores_the_controller():
    ctrl = SACController(release_noise_std=S, interval=3, seed=6, validation_loss=lambda: 1.0)
    engine, model, optimizer, loader = _setup(ctrl)
    _train(model, optimizer, loader, epochs=1)
    state = engine.state_dict()
    ctrl2 = SACController(release_noise_std=S, interval=3, seed=60, validation_loss=lambda: 1.0)
    engine2, *_ = _setup(ctrl2)
    engine2.load_state_dict(state)
    assert ctrl2.history == ctrl.history
    assert engine2.optimizer.noise_multiplier == optimizer.noise_multiplier
    obs = np.zeros(2 * 2 + 5)
    np.testing.assert_array_equal(ctrl2.agent.act(obs, deterministic=True), ctrl.agent.act(obs, deterministic=True))
    with pytest.raises(ValueError, match="interval"):
        _setup(SACController(release_noise_std=S, interval=4, validation_loss=lambda: 1.0))[0].load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"interval": 0}, "interval .* must be an integer >= 1, found 0"),
        ({"interval": -3}, "found -3"),
        ({"sigma_min": 2.0, "sigma_max": 1.0}, "lower 2.0 must be < upper 1.0"),
        ({"min_clip": 5.0, "max_clip": 0.1}, "lower 5.0 must be < upper 0.1"),
        ({"sigma_min": -1.0}, "sigma_min must be a finite number > 0, found -1.0"),
        ({"max_factor": 0.5}, r"max_factor .* must be a finite number > 1, found 0.5"),
        ({"validation_loss": lambda: 0.0, "loss_bound": 1.0}, "not both"),
    ],
)
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SACController(**kwargs)


def test_a_non_integer_interval_is_a_type_error():
    with pytest.raises(TypeError, match="interval .* must be an integer >= 1, found 2.5"):
        SACController(interval=2.5)


def test_bad_attachments_are_rejected():
    model = nn.Linear(5, 1)
    engine = dptrain.PrivacyEngine()
    with pytest.raises(ValueError, match="controller needs target_epsilon"):
        engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            data_loader=DataLoader(_data(), batch_size=BATCH), max_grad_norm=1.0,
                            noise_multiplier=1.0, controller=SACController())
    with pytest.raises(ValueError, match="automatic"):
        _setup(SACController(release_noise_std=S), clipping="automatic")
    with pytest.raises(ValueError, match="does not fit the budget"):  # sigma_max too small for the target
        _setup(SACController(release_noise_std=S, sigma_max=0.2), target_epsilon=0.5)
    with pytest.raises(ValueError, match=r"noise multiplier 0.2828 \(release_noise_std=0.4\)"):  # default m/20
        _setup(SACController())
    ctrl = SACController(release_noise_std=S)
    engine, *_ = _setup(ctrl)
    with pytest.raises(ValueError, match="already attached"):
        ctrl.attach(engine, target_epsilon=1.0, target_delta=DELTA, total_steps=10)
    with pytest.raises(ValueError, match="loss_bound"):
        ctrl.observe_losses(torch.ones(3))


def test_zero_action_is_private_quantile_clipping():
    """With action 0 the thresholds follow Andrew et al.'s geometric step on the RELEASED unclipped fractions."""
    ctrl = SACController(release_noise_std=0.5, interval=2, seed=7, policy=lambda obs: [0.0, 0.0, 0.0],
                         validation_loss=lambda: 1.0)
    engine, model, optimizer, loader = _setup(ctrl, target_epsilon=50.0, epochs=2, max_grad_norm=1e-3)
    _train(model, optimizer, loader, epochs=2)
    for before, after in zip(ctrl.history[:-1], ctrl.history[1:]):
        unclipped = np.clip(1 - np.array(after["clip_fraction"]), 0, 1)
        expected = np.array(before["max_grad_norm"]) * np.exp(-0.2 * (unclipped - 0.5))
        np.testing.assert_allclose(after["max_grad_norm"], expected, rtol=1e-12)
    # everything is clipped at C ~ 1e-3, so the released fractions are small and the thresholds grow
    assert all(b > a for a, b in zip(ctrl.history[0]["max_grad_norm"], ctrl.history[-1]["max_grad_norm"]))


def test_pld_engine_plans_with_an_rdp_replay_and_ends_within_budget():
    """With a PLD ledger the floor uses an RDP replay (an upper bound); the PLD epsilon ends under the target."""
    ctrl = SACController(release_noise_std=S, interval=4, seed=8, sigma_min=0.05, policy=lambda obs: [0.0, 0.0, -1.0])
    engine, model, optimizer, loader = _setup(ctrl, target_epsilon=3.0, epochs=2, accountant="pld")
    _train(model, optimizer, loader, epochs=2)
    replay = ctrl.plan.planning_accountant()
    assert isinstance(replay, RDPAccountant) and replay.history == engine.accountant.history
    assert ctrl.history[-1]["epsilon"] <= 3.0
    assert engine.get_epsilon(DELTA) <= replay.get_epsilon(DELTA) <= 3.0
