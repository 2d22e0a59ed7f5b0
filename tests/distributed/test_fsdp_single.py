"""FSDP2's sharded-gradient path in one process (a 1-rank gloo group): fast checks that run by default.

The 2-process tests (union-batch parity, noise regeneration per rank, statistics, memory) are in test_fsdp.py."""

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dptrain
from dptrain.fsdp import shard_rows
from tests.distributed.test_ddp import _data, _loss, _model

fsdp = pytest.importorskip("torch.distributed.fsdp")


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shard_rows_is_the_torch_chunk_layout(world):
    for rows in range(0, 20):
        chunks = torch.arange(rows).chunk(world) if rows else ()
        for index in range(world):
            start, stop = shard_rows(rows, world, index)
            want = chunks[index].tolist() if index < len(chunks) else []
            assert list(range(start, stop)) == want


@pytest.fixture
def one_rank_group():
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no group already initialised")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _run(model, seed):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = torch.utils.data.DataLoader(_data(), batch_size=8)
    model, optimizer, _ = dptrain.PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=0.3, noise_multiplier=1.0,
        poisson_sampling=False, insecure_noise_seed=seed)
    x, y = _data().tensors
    for step in range(2):
        _loss(model, x[8 * step:8 * step + 8], y[8 * step:8 * step + 8]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for p in model.parameters()]


def test_one_rank_fsdp2_step_equals_the_unsharded_step_with_the_same_noise(one_rank_group):
    """One rank holds every coordinate: its shard is the whole sum and it draws the whole noise, as one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    sharded = _model()
    for layer in sharded:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    got = _run(fully_shard(sharded, mesh=mesh), seed=7)
    want = _run(_model(), seed=7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
