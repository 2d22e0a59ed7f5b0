"""DP-SGD on torch.distributed: each rank clips its own samples, the noised clipped sums are all-reduced.

Every rank adds independent Gaussian noise of std sigma*C/sqrt(W) to its local clipped sum before a SUM
all-reduce, so the total noise has exactly the single-process std sigma*C, and no rank can reproduce or
cancel the others' shares (their generators are seeded independently). DDP's own gradient reduction is
switched off (``require_backward_grad_sync = False``): dptrain never produces ordinary parameter gradients.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["is_distributed", "rank_and_world", "unwrap_ddp", "check_consistent", "all_reduce_sum", "on_rank0",
           "gather_to_rank0", "COLLECTIVE_TIMEOUT_S"]

COLLECTIVE_TIMEOUT_S = 300.0  # a rank waiting longer than this for the others raises instead of hanging


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def unwrap_ddp(module: nn.Module) -> nn.Module:
    """The inner module of a DistributedDataParallel wrapper, with DDP's own gradient sync switched off."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module.require_backward_grad_sync = False  # the DP optimizer reduces the privatised sums itself
        return module.module
    return module


def check_consistent(settings: Dict[str, float], timeout_s: float = 60.0) -> None:
    """Every rank must use the same settings; raise the same clear error on every rank otherwise."""
    if not is_distributed():
        return
    names = sorted(settings)
    mine = torch.tensor([float(settings[n]) for n in names], dtype=torch.float64)
    gathered: List[torch.Tensor] = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    try:
        work = dist.all_gather(gathered, mine, async_op=True)
        if not work.wait(timeout=datetime.timedelta(seconds=timeout_s)):
            raise RuntimeError("timed out")
    except RuntimeError as err:
        raise RuntimeError(
            f"the process group (backend {dist.get_backend()}) cannot all-gather CPU tensors: {err}; "
            "use the gloo backend for CPU training or nccl with tensors on the GPU"
        ) from err
    table = torch.stack(gathered)  # (W, len(names))
    differing = [n for i, n in enumerate(names) if not torch.all(table[:, i] == table[0, i])]
    if differing:
        detail = ", ".join(f"{n}: {table[:, names.index(n)].tolist()}" for n in differing)
        raise ValueError(f"ranks disagree on DP settings (one value per rank) - {detail}")


def all_reduce_sum(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """SUM all-reduce of a list of tensors through one flat buffer."""
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


def on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 only; its result, or the exception it raised, reaches every rank.

    For set-up that only rank 0 may do (the output folder, reading a checkpoint): a failure there must stop
    every rank with the same error, not leave the others waiting in the next collective."""
    if not is_distributed():
        return fn()
    box: List[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        if dist.get_rank() == 0:
            raise value
        kind = type(value) if type(value) in (ValueError, TypeError, FileNotFoundError, FileExistsError) else RuntimeError
        raise kind(f"rank 0 failed: {value}")
    return value


def gather_to_rank0(obj: Any) -> Optional[List[Any]]:
    """Every rank's ``obj`` (picklable) in rank order on rank 0, None on the other ranks; ``[obj]`` alone."""
    if not is_distributed():
        return [obj]
    out: Optional[List[Any]] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
