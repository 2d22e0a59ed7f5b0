"""DP-SGD under DistributedDataParallel: 2 processes on gloo over loopback against the single-process oracle."""

import datetime
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain import distributed
from dptrain.accountants import compute_epsilon

WORLD = 2
N, D = 32, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(n=N):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)[:n]
    return TensorDataset(x, x @ torch.randn(D, 1, generator=g) + torch.randn(N, 1, generator=g)[:n])


def _model(wide=False):
    torch.manual_seed(0)
    if wide:
        return nn.Sequential(nn.Linear(D, 400, bias=False))
    return nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 1))


def _loss(model, x, y):
    return (model(x) - y).pow(2).flatten(1).mean(1).sum()


def _train(rank, world, scenario, per_rank_batch=4, n=N, wrap=True, pass_inner=False, steps=3):
    """Runs one scenario; returns what rank 0 reports. world=1 is the single-process oracle.

    ``wrap``: DDP-wrap the model; ``pass_inner``: hand make_private the wrapped model's inner module."""
    data = _data(n)
    model = _model(wide=scenario == "noise")
    if world > 1 and wrap:
        model = nn.parallel.DistributedDataParallel(model)
        model = model.module if pass_inner else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = per_rank_batch * (WORLD // world)
    loader = DataLoader(data, batch_size=batch)
    engine = dptrain.PrivacyEngine()
    sigma = 1.0 if scenario == "noise" else 0.0
    model, optimizer, _ = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                              max_grad_norm=0.3, noise_multiplier=sigma, poisson_sampling=False)
    x, y = data.tensors
    global_batch = per_rank_batch * WORLD
    for step in range(steps):
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
            _loss(model, xs[:half], ys[:half]).backward()  # each micro-batch: its own summed loss
            optimizer.step()
            _loss(model, xs[half:], ys[half:]).backward()
        else:
            _loss(model, xs, ys).backward()
        optimizer.step()
        optimizer.zero_grad()
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {"params": [p.detach().flatten().tolist() for p in inner.parameters()],
            "epsilon": engine.get_epsilon(1e-5) if sigma > 0 else None, "sample_rate": engine.sample_rate}


SCENARIOS = ("plain", "accumulate", "noise", "mismatch", "dataset_mismatch", "not_wrapped", "wrapped_on_one_rank",
             "rank1_stops_stepping", "rank1_fails_before_make_private")
TIMEOUT_S = 3.0  # collective timeout in the scenarios where one rank never arrives


def _scenario(rank, scenario):
    if scenario == "mismatch":
        return _train(rank, WORLD, "plain", per_rank_batch=4 + rank)
    if scenario == "dataset_mismatch":
        return _train(rank, WORLD, "plain", n=N - 2 * rank)
    if scenario == "not_wrapped":
        return _train(rank, WORLD, "plain", wrap=False)
    if scenario == "wrapped_on_one_rank":
        return _train(rank, WORLD, "plain", pass_inner=rank == 1)
    if scenario == "rank1_stops_stepping":  # rank 1 leaves after one step, rank 0 waits in its second
        return _train(rank, WORLD, "plain", steps=1 if rank == 1 else 3)
    if scenario == "rank1_fails_before_make_private":
        if rank == 1:  # wrapped its model (DDP's own collectives done), then failed and is still alive
            nn.parallel.DistributedDataParallel(_model())
            time.sleep(TIMEOUT_S + 1)
            raise ValueError("rank 1's own data failed to load")
        return _train(rank, WORLD, "plain")
    return _train(rank, WORLD, scenario)


def _init(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))


def _worker(rank, ports, out_dir):
    """Every scenario in one process group (spawning is the slow part); a fresh group after each timeout."""
    _init(rank, ports[0])
    try:
        for scenario in SCENARIOS:
            # short only where a rank is meant to be missing (a loaded machine may delay the others by seconds)
            distributed.COLLECTIVE_TIMEOUT_S = TIMEOUT_S if scenario.startswith("rank1_") else 60.0
            started = time.perf_counter()
            try:
                result = _scenario(rank, scenario)
            except Exception as err:  # reported to the test, which checks every rank raised
                result = {"error": f"{type(err).__name__}: {err}"}
            result["seconds"] = time.perf_counter() - started
            with open(os.path.join(out_dir, f"{scenario}-rank{rank}.json"), "w") as f:
                json.dump(result, f)
            if scenario.startswith("rank1_"):  # a timed-out group is unusable: start the next one afresh
                dist.destroy_process_group()
                _init(rank, ports[SCENARIOS.index(scenario) - SCENARIOS.index("rank1_stops_stepping") + 1])
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=([_free_port() for _ in range(3)], str(out)), nprocs=WORLD, join=True)
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
    # fixed batches: one step of its epoch charged, un-amplified, replace-one (sensitivity 2C: multiplier 1 / 2)
    assert single["epsilon"] == pytest.approx(compute_epsilon(sample_rate=1.0, noise_multiplier=0.5, steps=1, delta=1e-5))


def test_mismatched_batch_settings_fail_on_every_rank(ranks):
    assert all("ranks disagree" in r.get("error", "") and "batch_size" in r["error"] for r in ranks["mismatch"])


def test_mismatched_dataset_fails_on_every_rank(ranks):
    assert all("ranks disagree" in r.get("error", "") and "dataset_size: [32.0, 30.0]" in r["error"]
               for r in ranks["dataset_mismatch"])


def test_model_wrapped_on_no_rank_fails_on_every_rank(ranks):
    assert all("not wrapped in DistributedDataParallel" in r.get("error", "") for r in ranks["not_wrapped"])


def test_model_wrapped_on_one_rank_only_fails_on_every_rank(ranks):
    assert all("ranks disagree" in r.get("error", "") and "ddp_wrapped: [1.0, 0.0]" in r["error"]
               for r in ranks["wrapped_on_one_rank"])


def test_a_rank_that_stops_stepping_gives_a_timeout_error_not_a_hang(ranks):
    waiting, gone = ranks["rank1_stops_stepping"]
    assert "error" not in gone
    assert waiting["error"].startswith("CollectiveError: rank 0 of 2: the optimizer step's all-reduce")
    assert "did not reach this call within 3 s" in waiting["error"]
    assert waiting["seconds"] < 4 * TIMEOUT_S


def test_a_rank_that_fails_before_make_private_gives_a_timeout_error_on_the_others(ranks):
    waiting, failed = ranks["rank1_fails_before_make_private"]
    assert failed["error"] == "ValueError: rank 1's own data failed to load"
    assert waiting["error"].startswith("CollectiveError: rank 0 of 2: make_private's all-gather of the DP settings")
    assert "did not reach this call within 3 s" in waiting["error"] and waiting["seconds"] < 4 * TIMEOUT_S
