"""DP-SGD on FSDP2 (fully_shard) with 2 processes on gloo/CPU against the single-process oracle on the union batch.

torch 2.13 runs fully_shard on CPU with gloo, so these run without a GPU.
"""

import datetime
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dptrain
from tests.distributed.test_ddp import WORLD, _data, _loss, _model, _train

pytestmark = pytest.mark.slow  # spawns 2 processes: ~10 s CPU, 20-35 s on a loaded 2-core machine
fsdp = pytest.importorskip("torch.distributed.fsdp")
SCENARIOS = ("plain", "per_layer", "accumulate", "noise")


def _shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)  # its own unit: gathered for its forward/backward only
    return fully_shard(model, mesh=mesh)  # the root unit holds the LayerNorm


def _train_fsdp(rank, scenario, per_rank_batch=4):
    data = _data()
    model = _shard(_model(wide=scenario == "noise"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = torch.utils.data.DataLoader(data, batch_size=per_rank_batch)
    engine = dptrain.PrivacyEngine()
    sigma = 1.0 if scenario == "noise" else 0.0
    clipping = "per_layer" if scenario == "per_layer" else "flat"
    model, optimizer, _ = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                              max_grad_norm=0.3, noise_multiplier=sigma, poisson_sampling=False,
                                              clipping=clipping)
    x, y = data.tensors
    global_batch = per_rank_batch * WORLD
    for step in range(3):
        xs, ys = x[step * global_batch:(step + 1) * global_batch][rank::WORLD], y[step * global_batch:(step + 1) * global_batch][rank::WORLD]
        if scenario == "noise":
            (model(xs) * 0).sum().backward()
            optimizer.step()
            grad = next(iter(model.parameters())).grad  # a DTensor: this rank's shard
            return {"std": float(grad.full_tensor().std()), "local_rows": grad.to_local().shape[0],
                    "epsilon": engine.get_epsilon(1e-5)}
        if scenario == "accumulate":
            half = len(xs) // 2
            optimizer.signal_skip_step(True)
            _loss(model, xs[:half], ys[:half]).backward()
            optimizer.step()
            _loss(model, xs[half:], ys[half:]).backward()
        else:
            _loss(model, xs, ys).backward()
        # FSDP's own reduce-scatter of non-private gradients never ran: only the DP optimizer writes .grad
        no_plain_grads = all(p.grad is None for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
    return {"params": [p.full_tensor().detach().flatten().tolist() for p in model.parameters()],
            "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()), "no_plain_grads": no_plain_grads}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for scenario in SCENARIOS:
            try:
                result = _train_fsdp(rank, scenario)
            except Exception as err:  # noqa: BLE001 - reported to the test
                import traceback

                result = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
            with open(os.path.join(out_dir, f"{scenario}-rank{rank}.json"), "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=WORLD, join=True)
    return {s: [json.load(open(out / f"{s}-rank{r}.json")) for r in range(WORLD)] for s in SCENARIOS}


def _oracle(clipping):
    """The single-process run on the union batch (same data, model, C, lr, steps)."""
    torch.manual_seed(0)
    data, model = _data(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = torch.utils.data.DataLoader(data, batch_size=4 * WORLD)
    model, optimizer, _ = dptrain.PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=0.3, noise_multiplier=0.0,
        poisson_sampling=False, clipping=clipping)
    x, y = data.tensors
    for step in range(3):
        rows = slice(step * 4 * WORLD, (step + 1) * 4 * WORLD)
        _loss(model, x[rows], y[rows]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().flatten() for p in model.parameters()]


@pytest.mark.parametrize("scenario", ["plain", "per_layer", "accumulate"])
def test_fsdp_update_matches_the_single_process_union_batch(scenario, ranks):
    want = _oracle("per_layer" if scenario == "per_layer" else "flat")
    start = [p.detach().flatten() for p in _model().parameters()]
    for result in ranks[scenario]:
        assert "error" not in result, result.get("trace")
        assert result["sharded"] and result["no_plain_grads"]
        for got, w, s in zip(result["params"], want, start):
            got = torch.tensor(got)
            assert float((got - w).norm() / w.norm()) < 1e-4
    # the oracle's update is not zero (clipping and steps matter)
    assert max(float((w - s).abs().max()) for w, s in zip(want, start)) > 1e-3


def test_fsdp_noise_has_the_single_process_std_once(ranks):
    noise = ranks["noise"]
    assert all("error" not in r for r in noise), noise[0].get("trace")
    expected = 1.0 * 0.3 / (4 * WORLD)  # sigma * C / B_total
    assert noise[0]["std"] == pytest.approx(noise[1]["std"])  # one gradient, sharded
    assert abs(noise[0]["std"] / expected - 1) < 0.1
    assert noise[0]["local_rows"] + noise[1]["local_rows"] == 400  # each rank holds its half of the rows
    assert noise[0]["epsilon"] == pytest.approx(_train(0, 1, "noise")["epsilon"], rel=1e-12)
