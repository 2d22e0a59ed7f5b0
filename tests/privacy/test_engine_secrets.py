"""Attacks on the engine's secrets: regenerate the noise, replay a checkpoint, recompute the Poisson batches.

Each attack is run twice: against a run with an insecure seed (where it must succeed: the test can fail) and
against the default or secure run (where it must recover nothing).
"""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain.noise import GaussianNoise
from dptrain.sampling import PoissonBatchSampler

N, D, SIGMA, C, LR = 8, 40, 1.0, 1.0, 1.0


def _data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, D, generator=g), torch.randn(N, 3, generator=g))


def _model():
    torch.manual_seed(0)  # the public seed: initialisation only
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, 3))


def _run(steps=1, *, noise_multiplier=SIGMA, secure=False, state=None, **seeds):
    """Full-batch (q = 1) SGD steps; returns (engine, model, initial weights)."""
    model = _model()
    initial = [p.detach().clone() for p in model.parameters()]
    engine = dptrain.PrivacyEngine(secure_mode=secure)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), data_loader=DataLoader(_data(), batch_size=N),
        max_grad_norm=C, noise_multiplier=noise_multiplier, **seeds,
    )
    if state is not None:
        engine.load_state_dict(state)
    for _ in range(steps):
        x, y = next(iter(loader))
        (model(x) - y).pow(2).mean(1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return engine, model, initial


def _update_sum(model, initial):
    """The privatised clipped sum the released weights reveal: -(w1 - w0) / lr * B."""
    return [-(p.detach() - w0) / LR * N for p, w0 in zip(model.parameters(), initial)]


def _relative_error(found, truth):
    num = math.sqrt(sum(float((f - t).pow(2).sum()) for f, t in zip(found, truth)))
    return num / math.sqrt(sum(float(t.pow(2).sum()) for t in truth))


def _regenerated_noise(seed, shapes):
    """The attacker replays the optimizer's noise call (std sigma C / B, scale 1 / B) on zero sums."""
    zeros = [torch.zeros(s) for s in shapes]
    GaussianNoise(seed, rank=0).add_(zeros, SIGMA * C / N, scale=1.0 / N)
    return [z * N for z in zeros]


def _attack(model, initial, candidate_seeds):
    """Best recovery of the clipped sum over the candidate seeds (relative error against the true sum)."""
    _, clean, _ = _run(noise_multiplier=0.0)
    truth = _update_sum(clean, initial)
    noisy = _update_sum(model, initial)
    shapes = [p.shape for p in model.parameters()]
    errors = []
    for seed in candidate_seeds:
        noise = _regenerated_noise(seed, shapes)
        errors.append(_relative_error([u - n for u, n in zip(noisy, noise)], truth))
    return min(errors), _relative_error(noisy, truth)


def test_noise_regeneration_recovers_the_clipped_sum_only_with_an_insecure_seed():
    engine, model, initial = _run(insecure_noise_seed=7)
    recovered, _ = _attack(model, initial, [7])
    assert recovered < 1e-4  # the attack works when the seed is known
    assert not engine.trust_model()["private"] and engine.trust_model()["noise_seed_given"]

    for secure in (False, True):
        engine, model, initial = _run(secure=secure)
        recovered, baseline = _attack(model, initial, [0, 1, 7, 8])  # public seed and the old derivations
        assert recovered > 0.5 and baseline > 0.5  # nothing cancels: the noise dominates as it should
        assert engine.trust_model()["private"]


def test_same_public_seed_gives_different_weights_insecure_seed_identical():
    first, second = _run()[1], _run()[1]
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    first = _run(insecure_noise_seed=3, insecure_sampler_seed=4)[1]
    second = _run(insecure_noise_seed=3, insecure_sampler_seed=4)[1]
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


def _generator_states(obj):
    """Every tensor in ``obj`` shaped like a CPU generator's state (mt19937: 5056 bytes) or a noise key (32)."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.dtype == torch.uint8 and obj.numel() in (5056, 32) else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _generator_states(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _generator_states(v)]
    return []


@pytest.mark.parametrize("secure", [False, True])
def test_saved_noise_state_replays_the_next_draw_unless_secure(secure):
    """Default: the saved keys and positions regenerate the next draw exactly (so they are secret). Secure: nothing
    saved, and a source restored from the state draws other numbers."""
    source = GaussianNoise(secure=secure)
    source.add_([torch.zeros(1000)], 1.0)
    state = source.state_dict()
    draws = []
    for _ in range(2):
        replay = GaussianNoise(secure=secure)
        replay.load_state_dict(state)
        draws.append(torch.zeros(1000))
        replay.add_([draws[-1]], 1.0)
    following = torch.zeros(1000)
    source.add_([following], 1.0)
    assert torch.equal(draws[0], following) is (not secure)
    assert torch.equal(draws[0], draws[1]) is (not secure)
    assert (_generator_states(state) == []) is secure


def test_secure_mode_saves_nothing_that_replays_noise_or_batches():
    engine, model, _ = _run(secure=True)
    state = engine.state_dict()
    assert _generator_states(state) == []
    assert state["noise"]["generators"] == {} and set(state["sampler"]) == {"drawn"}
    replays = [_run(steps=1, secure=True, state=state)[1] for _ in range(2)]
    assert any(not torch.equal(a, b) for a, b in zip(replays[0].parameters(), replays[1].parameters()))


def test_secure_sampler_batches_cannot_be_recomputed_from_its_state():
    sampler = PoissonBatchSampler(200, 0.3, secure=True)
    first = list(sampler)
    assert set(sampler.state_dict()) == {"drawn"}
    replays = []
    for _ in range(2):
        replay = PoissonBatchSampler(200, 0.3, secure=True)
        replay.load_state_dict({"drawn": 0})
        replays.append(list(replay))
    assert replays[0] != replays[1] and replays[0] != first
    # a default sampler IS replayed by its state (so that state must stay secret)
    plain = PoissonBatchSampler(200, 0.3)
    saved = plain.state_dict()
    batches = list(plain)
    again = PoissonBatchSampler(200, 0.3)
    again.load_state_dict(saved)
    assert list(again) == batches


def test_insecure_seeds_are_refused_in_secure_mode_and_must_be_integers():
    with pytest.raises(ValueError, match="secure_mode .* insecure_noise_seed"):
        _run(secure=True, insecure_noise_seed=1)
    with pytest.raises(TypeError, match="insecure_sampler_seed must be an integer or None, found '1'"):
        _run(insecure_sampler_seed="1")


def test_a_ranks_keys_are_never_loaded_into_another_rank():
    """One rank's saved keys in two ranks would give both the same noise (under FSDP: two shards whose difference
    carries none) and the same batches: a checkpoint names the rank and world size that wrote it."""
    engine, _, _ = _run()
    state = engine.state_dict()
    assert state["rank_and_world"] == [0, 1]
    _run(state=state)  # the same rank resumes
    state["rank_and_world"] = [1, 2]
    with pytest.raises(ValueError, match=r"written by rank and world size \[1, 2\], this process is \[0, 1\]"):
        _run(state=state)
