"""The Flower apps: the strategy's aggregation (fast), and a local Deployment Runtime run equal to the in-process
loop with the same (insecure, test-only) client seeds (slow). Skipped without ``flwr``."""

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, MetricRecord, RecordDict  # noqa: E402

from dptrain.federated import FedConfig, aggregate, server_update  # noqa: E402
from dptrain.federated.flower import FedSVDStrategy  # noqa: E402


def _reply(client_id, n, b):
    return RecordDict({"arrays": ArrayRecord({"l.B": b}),
                       "metrics": MetricRecord({"num-examples": n, "client_id": client_id, "epsilon": 1.0 + client_id})})


@pytest.mark.parametrize("method", ["fedsvd", "ffa"])
def test_strategy_aggregates_in_client_order_like_the_library(method):
    g = torch.Generator().manual_seed(0)
    glob = {"l.A": torch.randn(2, 6, generator=g), "l.B": torch.zeros(5, 2)}
    bs = [torch.randn(5, 2, generator=g) for _ in range(3)]
    cfg = FedConfig(method=method, rounds=3)
    strategy = FedSVDStrategy(cfg, num_clients=3)
    strategy.global_factors = glob
    replies = [_reply(2, 30, bs[2]), _reply(0, 10, bs[0]), _reply(1, 20, bs[1])]  # arrival order is arbitrary
    arrays, metrics = strategy.aggregate_contents(1, replies)
    expected = server_update(glob, aggregate([{"l.B": b} for b in bs], [10, 20, 30]), 1, cfg)
    got = arrays.to_torch_state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert metrics["max_epsilon"] == 3.0 and metrics["svd"] == int(method == "fedsvd")
    assert strategy.history == [{"round": 1, "svd": method == "fedsvd", "max_epsilon": 3.0}]


@pytest.mark.slow
def test_three_clients_three_rounds_through_flower_equal_in_process(tmp_path):
    """Flower's Deployment Runtime on 127.0.0.1 (1 SuperLink, 3 SuperNodes) vs run_local, same client seeds."""
    from dptrain.federated.app import run_local
    from dptrain.federated.flower import run_flower

    run_config = dict(method="fedsvd", rounds=3, local_steps=2, batch_size=8, lr=0.5, target_epsilon=3.0,
                      base="demo", lora_r=4, max_length=48, num_clients=3, demo_records=150, round_timeout=600.0)
    nodes = [{"insecure-seed": 100 + k} for k in range(3)]  # the clients' test-only secrets (node config)
    flower = run_flower(run_config, node_configs=nodes, workdir=tmp_path, timeout=1200)
    local = run_local(run_config, node_configs=nodes)
    assert flower.factors.keys() == local.factors.keys()
    for k in local.factors:
        assert torch.allclose(flower.factors[k], local.factors[k], atol=1e-6), k
    assert flower.epsilons == pytest.approx(local.epsilons, rel=1e-9)
    assert all(e == pytest.approx(3.0, rel=1e-2) for e in flower.epsilons)
    assert [h["svd"] for h in flower.history] == [True, True, True]
    other = run_local(run_config, node_configs=[{"insecure-seed": 200 + k} for k in range(3)])
    assert not all(torch.equal(other.factors[k], local.factors[k]) for k in local.factors)
