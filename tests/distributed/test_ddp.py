"""DP-SGD under DistributedDataParallel: 2 processes on gloo over loopback against the single-process oracle."""

import datetime
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain.accountants import compute_epsilon

WORLD = 2
N, D = 32, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    return TensorDataset(x, x @ torch.randn(D, 1, generator=g) + torch.randn(N, 1, generator=g))


def _model(wide=False):
    torch.manual_seed(0)
    if wide:
        return nn.Sequential(nn.Linear(D, 400, bias=False))
    return nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 1))


def _loss(model, x, y):
    return (model(x) - y).pow(2).flatten(1).mean(1).mean()


def _train(rank, world, scenario, per_rank_batch=4):
    """Runs one scenario; returns what rank 0 reports. world=1 is the single-process oracle."""
    data = _data()
    model = _model(wide=scenario == "noise")
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = per_rank_batch * (WORLD // world)
    loader = DataLoader(data, batch_size=batch)
    engine = dptrain.PrivacyEngine()
    sigma = 1.0 if scenario == "noise" else 0.0
    model, optimizer, _ = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                              max_grad_norm=0.3, noise_multiplier=sigma, poisson_sampling=False)
    x, y = data.tensors
    global_batch = per_rank_batch * WORLD
    for step in range(3):
        rows = slice(step * global_batch, (step + 1) * global_batch)
        xs, ys = x[rows], y[rows]
        if world > 1:  # this rank's share of the union batch
            xs, ys = xs[rank::world], ys[rank::world]
        if scenario == "noise":
            (model(xs) * 0).sum().backward()
            optimizer.step()
            return {"std": float(next(iter(model.parameters())).grad.std()), "epsilon": engine.get_epsilon(1e-5)}
        if scenario == "accumulate":  # two micro-batches per logical batch
            half = len(xs) // 2
            optimizer.signal_skip_step(True)
            _loss(model, xs[:half], ys[:half]).backward()  # each micro-batch: its own mean loss
            optimizer.step()
            _loss(model, xs[half:], ys[half:]).backward()
        else:
            _loss(model, xs, ys).backward()
        optimizer.step()
        optimizer.zero_grad()
    inner = model.module if world > 1 else model
    return {"params": [p.detach().flatten().tolist() for p in inner.parameters()],
            "epsilon": engine.get_epsilon(1e-5) if sigma > 0 else None, "sample_rate": engine.sample_rate}


SCENARIOS = ("plain", "accumulate", "noise", "mismatch")


def _worker(rank, port, out_dir):
    """Every scenario in one process group (spawning is the slow part)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for scenario in SCENARIOS:
            try:
                if scenario == "mismatch":
                    result = _train(rank, WORLD, "plain", per_rank_batch=4 + rank)
                else:
                    result = _train(rank, WORLD, scenario)
            except Exception as err:  # reported to the test, which checks every rank raised
                result = {"error": f"{type(err).__name__}: {err}"}
            with open(os.path.join(out_dir, f"{scenario}-rank{rank}.json"), "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return {s: [json.load(open(out / f"{s}-rank{r}.json")) for r in range(WORLD)] for s in SCENARIOS}


@pytest.mark.parametrize("scenario", ["plain", "accumulate"])
def test_two_ranks_match_the_single_process_union_batch(scenario, ranks):
    single = _train(0, 1, "plain")
    for result in ranks[scenario]:
        assert "error" not in result, result
        for got, want in zip(result["params"], single["params"]):
            got, want = torch.tensor(got), torch.tensor(want)
            assert float((got - want).norm() / want.norm()) < 1e-4
    assert ranks[scenario][0]["sample_rate"] == single["sample_rate"]


def test_total_noise_has_the_single_process_std_and_epsilon(ranks):
    noise = ranks["noise"]
    expected = 1.0 * 0.3 / (4 * WORLD)  # sigma * C / B_total: duplicated or correlated shares would be sqrt(2) off
    assert noise[0]["std"] == pytest.approx(noise[1]["std"])  # the reduced gradient is identical on every rank
    assert abs(noise[0]["std"] / expected - 1) < 0.1
    single = _train(0, 1, "noise")
    assert noise[0]["epsilon"] == pytest.approx(single["epsilon"], rel=1e-12)
    q = 4 * WORLD / N
    assert single["epsilon"] == pytest.approx(compute_epsilon(sample_rate=q, noise_multiplier=1.0, steps=1, delta=1e-5))


def test_mismatched_batch_settings_fail_on_every_rank(ranks):
    assert all("ranks disagree" in r.get("error", "") and "batch_size" in r["error"] for r in ranks["mismatch"])
