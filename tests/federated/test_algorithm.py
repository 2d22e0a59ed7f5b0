"""Client update, server aggregation, the in-process loop and each client's privacy ledger."""

import math

import pytest
import torch

from dptrain.federated import (FedConfig, aggregate, get_factors, lora_layers, run_in_process, server_update,
                               set_factors, svd_due)

from tests.federated.helpers import make_clients

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(**kw):
    base = dict(method="fedsvd", rounds=2, local_steps=2, batch_size=6, lr=0.5, target_epsilon=4.0)
    return FedConfig(**{**base, **kw})


def test_aggregate_is_weighted_mean_by_name():
    ups = [{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([4.0, 8.0])}]
    assert torch.allclose(aggregate(ups, [1, 3])["x"], torch.tensor([3.25, 6.5]))
    with pytest.raises(ValueError, match="names different"):
        aggregate([{"x": torch.zeros(1)}, {"y": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="one weight per update"):
        aggregate(ups, [1])
    with pytest.raises(ValueError, match="finite and > 0"):
        aggregate(ups, [1, 0])


def test_svd_schedule():
    cfg = _config(svd_period=2, svd_warmup=3, rounds=10)
    assert [t for t in range(1, 11) if svd_due(t, cfg)] == [4, 6, 8, 10]
    assert not any(svd_due(t, _config(method="ffa")) for t in range(1, 5))


def test_server_update_per_method():
    g = torch.Generator().manual_seed(0)
    glob = {"l.A": torch.randn(3, 10, generator=g), "l.B": torch.zeros(8, 3)}
    new_b = {"l.B": torch.randn(8, 3, generator=g)}
    ffa = server_update(glob, new_b, 1, _config(method="ffa"))
    assert torch.equal(ffa["l.A"], glob["l.A"]) and torch.equal(ffa["l.B"], new_b["l.B"])
    svd = server_update(glob, new_b, 1, _config(method="fedsvd"))
    assert torch.allclose(svd["l.B"] @ svd["l.A"], new_b["l.B"] @ glob["l.A"], atol=1e-5)  # BA preserved
    assert torch.allclose(svd["l.A"] @ svd["l.A"].T, torch.eye(3), atol=1e-5)
    warm = server_update(glob, new_b, 1, _config(method="fedsvd", svd_warmup=1))
    assert torch.equal(warm["l.A"], glob["l.A"])  # still warming up
    with pytest.raises(ValueError, match="not in the global model"):
        server_update(glob, {"other.B": torch.zeros(1)}, 1, _config())


@pytest.mark.parametrize("kw,match", [
    ({"method": "fedprox"}, "method must be one of"),
    ({"rounds": 0}, "rounds must be an integer >= 1"),
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ({"delta": 1.5}, r"delta must be a number in \(0, 1\)"),
    ({"svd_warmup": -1}, "svd_warmup must be an integer >= 0"),
    ({"accountant": "gdp"}, "accountant must be"),
])
def test_config_errors_are_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as info:
        _config(**kw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["fedsvd", "ffa", "dplora"])
def test_client_trains_only_its_factors_and_ledgers_every_step(tiny_lora, method):
    model, tok, init = tiny_lora
    cfg = _config(method=method)
    client = make_clients(tok, cfg, sizes=(30,), seeds=(3,))[0]
    update = client.train_round(model, init, server_round=1)
    names = {k[-1] for k in update.factors}
    assert names == ({"A", "B"} if method == "dplora" else {"B"})
    now = get_factors(model)
    for name in update.factors:
        assert not torch.equal(now[name], init[name])  # trained (and noised)
    if method != "dplora":
        assert all(torch.equal(now[k], init[k]) for k in init if k.endswith(".A"))  # A frozen on the client
    assert client.ledger.history == [(client.noise_multiplier, pytest.approx(6 / 30), 2)]
    assert not any(hook for m in model.modules() for hook in m._forward_hooks.values())  # engine detached


def test_ledger_spans_all_rounds_and_matches_dp_accounting(tiny_lora):
    """eps per client over rounds * local_steps Poisson-subsampled Gaussian steps, checked independently."""
    import dp_accounting
    from dp_accounting import rdp as dpa_rdp

    from dptrain.accountants import RDPAccountant

    model, tok, init = tiny_lora
    cfg = _config(rounds=3, local_steps=2, target_epsilon=2.0)
    client = make_clients(tok, cfg, sizes=(30,), seeds=(5,))[0]
    factors = init
    for rnd in (1, 2, 3):
        update = client.train_round(model, factors, rnd)
        factors = {**factors, **update.factors}
    q, sigma, steps, delta = 6 / 30, client.noise_multiplier, 6, client.delta
    assert client.ledger.history == [(sigma, pytest.approx(q), steps)]  # one ledger, every local step of all rounds
    orders = list(range(2, 257))
    reference = dpa_rdp.RdpAccountant(orders=orders)
    reference.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    ours = RDPAccountant(orders=orders).step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    assert ours.get_epsilon(delta) == pytest.approx(reference.get_epsilon(delta), rel=1e-4)
    assert client.epsilon() <= reference.get_epsilon(delta) * (1 + 1e-6)  # more orders: never worse
    assert client.epsilon() == pytest.approx(2.0, rel=1e-2)  # calibrated for all 6 steps, spent them all
    with pytest.raises(ValueError, match="spent its privacy budget"):
        client.train_round(model, factors, 4)


def test_in_process_loop_is_reproducible_with_insecure_seeds_and_secret_by_default(tiny_lora):
    model, tok, init = tiny_lora
    cfg = _config(method="fedsvd")
    runs = []
    for seeds in ((1, 2), (1, 2), None, None):
        set_factors(model, init)
        runs.append(run_in_process(model, make_clients(tok, cfg, seeds=seeds), cfg, evaluate=lambda m: 1.0))
    same = lambda a, b: all(torch.equal(a.factors[k], b.factors[k]) for k in a.factors)  # noqa: E731
    assert same(runs[0], runs[1])
    assert not same(runs[2], runs[3]) and not same(runs[0], runs[2])  # OS entropy by default
    res = runs[0]
    assert [h["round"] for h in res.history] == [1, 2] and all(h["svd"] and h["eval"] == 1.0 for h in res.history)
    assert all(e == pytest.approx(4.0, rel=1e-2) for e in res.epsilons)
    for name in lora_layers(model):
        A = res.factors[f"{name}.A"]
        assert torch.allclose(A @ A.T, torch.eye(A.shape[0]), atol=1e-5)  # re-factorised: orthonormal rows
    last = get_factors(model)
    assert all(torch.equal(v, last[k]) for k, v in runs[-1].factors.items())  # the model holds the last result


def test_client_state_round_trip_and_bad_batch(tiny_lora):
    model, tok, init = tiny_lora
    cfg = _config(rounds=3)
    a, = make_clients(tok, cfg, sizes=(30,), seeds=(1,))
    a.train_round(model, init, 1)
    b, = make_clients(tok, cfg, sizes=(30,), seeds=(1,))
    b.load_state_dict(a.state_dict())
    assert b.rounds_done == 1 and b.epsilon() == a.epsilon() and math.isfinite(b.epsilon())
    with pytest.raises(ValueError, match="larger than its 4 records"):
        make_clients(tok, _config(batch_size=8), sizes=(4,))
