"""A process group whose backend cannot all-gather/all-reduce: a clear ``CollectiveError`` naming the rank, the
operation and the fix, from make_private's settings check and from the optimizer step (no spawn: one process
plays each rank of a 2-rank group over an in-memory store)."""

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dptrain import distributed
from dptrain.grad_sample.tracker import GradSampleTracker
from dptrain.optimizer import DPOptimizer


class _CannotReduce(dist.ProcessGroup):
    """Stands for a backend without these collectives on CPU tensors (nccl with a CPU model, say)."""

    def getBackendName(self):
        return "cannot-reduce"

    def allgather(self, outputs, inputs, opts=None):
        raise RuntimeError("no allgather for CPU tensors in this backend")

    def allreduce(self, tensors, opts=None):
        raise RuntimeError("no allreduce for CPU tensors in this backend")


dist.Backend.register_backend("dptrain_test_cannot_reduce", lambda store, rank, size, timeout: _CannotReduce(rank, size),
                              devices=["cpu"])


@pytest.fixture(params=[0, 1], ids=["rank0", "rank1"])
def broken_group(request):
    dist.init_process_group("dptrain_test_cannot_reduce", store=dist.HashStore(), rank=request.param, world_size=2,
                            timeout=datetime.timedelta(seconds=5))
    try:
        yield request.param
    finally:
        dist.destroy_process_group()


def test_settings_check_names_rank_operation_and_fix(broken_group):
    with pytest.raises(distributed.CollectiveError) as err:
        distributed.check_consistent({"batch_size": 8.0})
    msg = str(err.value)
    assert msg.startswith(f"rank {broken_group} of 2: make_private's all-gather of the DP settings failed")
    assert "backend (dptrain_test_cannot_reduce) cannot run it on cpu torch.float64 tensors" in msg
    assert "use the gloo backend for CPU training" in msg and "no allgather for CPU tensors" in msg


def test_optimizer_step_names_rank_operation_and_fix(broken_group):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    tracker = GradSampleTracker(model, clipping="flat", loss_reduction="mean", max_grad_norm=1.0)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tracker, noise_multiplier=1.0,
                      expected_batch_size=4, insecure_noise_seed=0)
    model(torch.randn(4, 3)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(distributed.CollectiveError, match=f"rank {broken_group} of 2: the optimizer step's all-reduce "
                       r"of the noised clipped sums failed - the process group's backend .* cannot run it on cpu "
                       "torch.float32 tensors"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing applied
    assert opt.steps_taken == 0  # and nothing accounted
