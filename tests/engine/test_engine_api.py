"""PrivacyEngine end to end: the gradient convention, noise, virtual steps, sampling, resume and bad input."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain.grad_sample.tracker import GradSampleTracker
from tests.helpers.oracle import clipped_sum, per_sample_grads, relative_error


def _regression_data(n=24, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, 1, generator=g) + 3.0 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def _mlp(seed=0, d=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 1))


def _private(model, data, *, batch_size=8, **kwargs):
    engine = dptrain.PrivacyEngine()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data, batch_size=batch_size)
    kwargs.setdefault("max_grad_norm", 1.0)
    kwargs.setdefault("noise_multiplier", 0.0)
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, **kwargs)
    return engine, model, optimizer, loader


def _mse_per_sample(model, x, y):
    return (model(x) - y).pow(2).flatten(1).mean(1)  # (B,)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_noise_free_update_is_the_oracles_clipped_mean(clipping):
    data = _regression_data()
    model = _mlp()
    x, y = data.tensors[0][:8], data.tensors[1][:8]
    oracle = per_sample_grads(model, lambda m, i: _mse_per_sample(m, x[i : i + 1], y[i : i + 1]).sum(), 8)
    engine, model, optimizer, loader = _private(model, data, poisson_sampling=False, clipping=clipping, max_grad_norm=0.5)
    names = {p: n for n, p in model.named_parameters()}
    _mse_per_sample(model, x, y).sum().backward()
    optimizer.step()
    groups = [[names[p] for p in g.params] for g in engine.tracker.groups]
    expected = clipped_sum(oracle, groups, [g.max_norm for g in engine.tracker.groups])
    for p in model.parameters():
        assert relative_error(p.grad, expected[names[p]] / 8) < 1e-4


def test_automatic_clipping_normalises_each_sample():
    data = _regression_data()
    model = _mlp()
    x, y = data.tensors[0][:8], data.tensors[1][:8]
    oracle = per_sample_grads(model, lambda m, i: _mse_per_sample(m, x[i : i + 1], y[i : i + 1]).sum(), 8)
    engine, model, optimizer, _ = _private(model, data, poisson_sampling=False, clipping="automatic", max_grad_norm=2.0)
    _mse_per_sample(model, x, y).sum().backward()
    optimizer.step()
    for n, p in model.named_parameters():
        expected = sum(2.0 * g[n] / (torch.sqrt(sum(v.pow(2).sum() for v in g.values())) + 0.01) for g in oracle) / 8
        assert relative_error(p.grad, expected) < 1e-4


@settings(max_examples=15, deadline=None)
@given(scale=st.floats(1e-3, 1e3), c=st.floats(0.01, 10.0), clipping=st.sampled_from(["flat", "per_layer"]))
def test_each_sample_contributes_at_most_its_threshold(scale, c, clipping):
    model = _mlp(seed=1)
    tracker = GradSampleTracker(model, clipping=clipping, loss_reduction="mean", max_grad_norm=c)
    x = scale * torch.randn(1, 5)
    (model(x) - 1.0).pow(2).sum().backward()
    tracker.flush()
    for g in tracker.groups:
        group_norm = math.sqrt(sum(float(tracker.clipped_sum[p].pow(2).sum()) for p in g.params))
        assert group_norm <= g.max_norm * (1 + 1e-5)
    total = math.sqrt(sum(float(s.pow(2).sum()) for s in tracker.clipped_sum.values()))
    assert total <= c * (1 + 1e-5)


@settings(max_examples=6, deadline=None)
@given(sigma=st.floats(0.3, 4.0), c=st.floats(0.1, 5.0), batch=st.integers(2, 16))
def test_noise_std_is_sigma_c_over_expected_batch(sigma, c, batch):
    torch.manual_seed(0)
    model = nn.Linear(100, 200, bias=False)
    data = TensorDataset(torch.randn(64, 100))
    engine, model, optimizer, _ = _private(
        model, data, batch_size=batch, noise_multiplier=sigma, max_grad_norm=c, poisson_sampling=False, insecure_noise_seed=1
    )
    (model(data.tensors[0][:batch]) * 0.0).sum().backward()  # every per-sample gradient is zero
    optimizer.step()
    measured = float(model.weight.grad.std())
    expected = sigma * c / batch
    assert abs(measured / expected - 1) < 0.05  # 20,000 draws: the std's sampling error is ~0.5%


def test_micro_batches_accumulate_to_the_union_batch():
    data = _regression_data()
    results = []
    for physical in (None, 3):
        model = _mlp()
        engine, model, optimizer, loader = _private(
            model, data, poisson_sampling=False, max_physical_batch_size=physical, max_grad_norm=0.3
        )
        steps = 0
        for x, y in loader:
            _mse_per_sample(model, x, y).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]), optimizer.steps_taken, steps))
    (full, logical_full, _), (split, logical_split, micro) = results
    assert logical_full == logical_split == 3 and micro == 9
    assert relative_error(split, full.double()) < 1e-5


def test_poisson_batches_are_uneven_and_empty_batches_still_step():
    data = _regression_data(n=40)
    model = _mlp()
    engine, model, optimizer, loader = _private(
        model, data, batch_size=1, noise_multiplier=1.0, insecure_sampler_seed=0, insecure_noise_seed=0
    )  # q = 1/40: many empty batches
    sizes = []
    for x, y in loader:
        sizes.append(len(x))
        if len(x):
            _mse_per_sample(model, x, y).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert len(sizes) == 40 and 0 in sizes and len(set(sizes)) > 1
    assert optimizer.steps_taken == 40
    assert len(engine.accountant.history) >= 1 and engine.get_epsilon(1e-5) > 0


def test_resume_reproduces_the_uninterrupted_run():
    data = _regression_data(n=32)

    def run(steps, state=None):
        model = _mlp()
        engine, model, optimizer, loader = _private(model, data, noise_multiplier=1.0, insecure_sampler_seed=3, insecure_noise_seed=4)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            engine.load_state_dict(state["engine"])
        done = 0
        while done < steps:
            for x, y in loader:
                if len(x):
                    _mse_per_sample(model, x, y).sum().backward()
                optimizer.step()
                optimizer.zero_grad()
                done += 1
                if done == steps:
                    break
        state = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
                 "engine": copy.deepcopy(engine.state_dict())}
        return state, engine.get_epsilon(1e-5)

    full, eps_full = run(6)
    half, _ = run(3)
    resumed, eps_resumed = run(3, half)
    assert eps_resumed == pytest.approx(eps_full, rel=1e-9)
    for k in full["model"]:
        assert torch.allclose(full["model"][k], resumed["model"][k], atol=1e-6)


def test_target_epsilon_calibrates_sigma_and_the_ledger_stays_under_it():
    data = _regression_data(n=40)
    engine, model, optimizer, loader = _private(
        _mlp(), data, noise_multiplier=None, target_epsilon=2.0, target_delta=1e-5, epochs=1, insecure_sampler_seed=0
    )
    assert optimizer.noise_multiplier > 0
    for x, y in loader:
        if len(x):
            _mse_per_sample(model, x, y).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert engine.get_epsilon(1e-5) <= 2.0 * (1 + 1e-6)


# ---------------------------------------------------------------------------------------- bad input
def test_batchnorm_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"GroupNorm or LayerNorm"):
        _private(model, _regression_data())


def test_recurrent_layer_is_refused_by_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(5, 3)

        def forward(self, x):
            return self.rnn(x)[0]

    with pytest.raises(ValueError, match="'rnn'"):
        _private(Net(), _regression_data())


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_max_grad_norm_must_be_positive(bad):
    with pytest.raises(ValueError, match="max_grad_norm"):
        _private(_mlp(), _regression_data(), max_grad_norm=bad)


def test_noise_or_target_is_required():
    with pytest.raises(ValueError, match="noise_multiplier"):
        _private(_mlp(), _regression_data(), noise_multiplier=None)
    with pytest.raises(ValueError, match="target_delta"):
        _private(_mlp(), _regression_data(), noise_multiplier=None, target_epsilon=1.0)


def test_optimizer_parameters_must_belong_to_the_model():
    model, other = _mlp(), nn.Linear(2, 2)
    optimizer = torch.optim.SGD(list(model.parameters()) + list(other.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="not in the model"):
        dptrain.PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=DataLoader(_regression_data(), batch_size=4),
            max_grad_norm=1.0, noise_multiplier=1.0,
        )


def test_secure_mode_refuses_user_seeds():
    with pytest.raises(ValueError, match="secure_mode"):
        engine = dptrain.PrivacyEngine(secure_mode=True)
        engine.make_private(
            module=_mlp(), optimizer=torch.optim.SGD(_mlp().parameters(), lr=0.1),
            data_loader=DataLoader(_regression_data(), batch_size=4), max_grad_norm=1.0, noise_multiplier=1.0,
            insecure_noise_seed=3,
        )


@pytest.mark.parametrize("clipping", ["flat", "per_layer", "automatic"])
def test_non_finite_norm_names_layer_and_step_and_changes_nothing(clipping):
    data = _regression_data()
    model = _mlp()
    engine, model, optimizer, loader = _private(model, data, noise_multiplier=1.0, poisson_sampling=False,
                                                clipping=clipping)
    x, y = data.tensors[0][:8], data.tensors[1][:8]
    _mse_per_sample(model, x, y).sum().backward()
    optimizer.step()  # one good step: its counts and ledger entry must survive the bad one
    before = [p.detach().clone() for p in model.parameters()]
    counted = dict(optimizer.tracker.clipped_count)
    x = x.clone()
    x[2, 0] = float("inf")
    _mse_per_sample(model, x, y).sum().backward()  # per-layer clipping processes during backward
    with pytest.raises(FloatingPointError, match=r"layer\(s\) 0\.weight at step 1"):
        optimizer.step()  # the norms are checked when the micro-batch is flushed
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(engine.accountant.history) == 1
    assert optimizer.tracker.clipped_count == {name: 0 for name in counted}, "statistics of the dropped batch reset"


class _SkipLog:
    """Stands in for the DP optimizer: records which pieces the loader says end a logical batch."""

    def __init__(self):
        self.skips = []

    def signal_skip_step(self, do_skip=True):
        self.skips.append(do_skip)


@pytest.mark.parametrize("agreed", [None, 4])
def test_pieces_agreed_across_ranks_split_every_logical_batch_into_that_many(monkeypatch, agreed):
    """FSDP2 ranks must run the same number of physical batches: with an agreed count (the largest over ranks,
    here faked) a logical batch of 3 rows, or 1, becomes 4 pieces of at most 2 rows, in order, none lost;
    without one (the count every rank already needs) the usual pieces of max_physical_batch_size rows."""
    from dptrain import sampling

    monkeypatch.setattr(sampling.distributed, "all_reduce_max", lambda n: n if agreed is None else max(n, agreed))
    data = DataLoader(TensorDataset(torch.arange(10.0)), batch_size=3)
    loader = sampling.DPDataLoader(data, poisson_sampling=False, sample_rate=0.3, max_physical_batch_size=2,
                                   same_pieces_on_every_rank=True)
    loader.optimizer = _SkipLog()
    pieces = [x.tolist() for (x,) in loader]
    if agreed is None:
        assert pieces == [[0, 1], [2], [3, 4], [5], [6, 7], [8], [9]]
        assert loader.optimizer.skips == [True, False] * 3 + [False]
    else:
        assert pieces == [[], [0], [1], [2], [], [3], [4], [5], [], [6], [7], [8], [], [], [], [9]]
        assert loader.optimizer.skips == [True, True, True, False] * 4
