"""DP-SGD on torch.distributed: each rank clips its own samples; the clipped sums are summed across ranks.

DDP (and unsharded models): every rank adds independent Gaussian noise of std sigma*C/sqrt(W) to its local
clipped sum before a SUM all-reduce, so the total noise has exactly the single-process std sigma*C, and no rank
can reproduce or cancel the others' shares (their generators are seeded independently). FSDP2: the clipped sums
are reduce-scattered (SUM) and each rank adds the full noise to its own shard (``dptrain.fsdp``). DDP's own
gradient reduction is switched off (``require_backward_grad_sync = False``): dptrain never produces ordinary
parameter gradients.
Collectives wait at most ``COLLECTIVE_TIMEOUT_S`` and fail with a ``CollectiveError`` naming the rank, the
operation and the likely cause, so a rank that never arrives or a backend that cannot reduce CPU tensors
stops every rank with an error instead of a hang.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["is_distributed", "rank_and_world", "tracked_module", "check_consistent", "all_reduce_sum",
           "all_reduce_max", "reduce_scatter_sum", "on_rank0",
           "gather_to_rank0", "CollectiveError", "COLLECTIVE_TIMEOUT_S"]

COLLECTIVE_TIMEOUT_S = 300.0  # a rank waiting longer than this for the others raises instead of hanging


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def tracked_module(module: nn.Module) -> nn.Module:
    """What the privacy engine tracks: the inner module of a DistributedDataParallel wrapper (DDP's own gradient
    sync switched off), or for an FSDP2 model (``fully_shard``) a ``dptrain.fsdp.FSDPView`` of it; else ``module``."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module.require_backward_grad_sync = False  # the DP optimizer reduces the privatised sums itself
        return module.module
    from dptrain.fsdp import FSDPView, is_fsdp

    if is_fsdp(module):
        return FSDPView(module)
    return module


class CollectiveError(RuntimeError):
    """A collective operation failed or timed out; the message says which rank, which operation and why."""


def _collective(what: str, start: Callable[[], Any], tensors: Sequence[torch.Tensor], timeout_s: float) -> None:
    """Runs ``start()`` (an ``async_op=True`` collective) and waits at most ``timeout_s``; clear error otherwise.

    A timeout means another rank never reached the same call (it failed, or runs other code or settings):
    raising here, instead of waiting forever, lets every rank stop with an error naming the cause."""
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        work = start()
        if work is not None and work.wait(timeout=datetime.timedelta(seconds=timeout_s)) is False:
            raise RuntimeError(f"timed out after {timeout_s:g} s")
    except RuntimeError as err:  # DistBackendError and gloo's errors are RuntimeErrors
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        low = text.lower()
        kinds = sorted({f"{t.device.type} {t.dtype}" for t in tensors})
        if "timed out" in low or "timeout" in low:
            why = (f"another rank did not reach this call within {timeout_s:g} s: it failed (see its error) or runs "
                   "other code or settings; this process group is no longer usable, restart every rank")
        elif "connection closed" in low or "connection reset" in low or "broken pipe" in low:
            why = "another rank exited or crashed (see its error); restart every rank"
        else:
            why = (f"the process group's backend ({dist.get_backend()}) cannot run it on {', '.join(kinds)} tensors; "
                   "use the gloo backend for CPU training, or nccl with the model and data on the GPU")
        raise CollectiveError(f"rank {rank} of {world}: {what} failed - {why} ({text})") from err


def check_consistent(settings: Dict[str, float], timeout_s: Optional[float] = None) -> None:
    """Every rank must use the same settings; raise the same clear error on every rank otherwise.

    ``timeout_s`` (default ``COLLECTIVE_TIMEOUT_S``): a rank that never arrives (it failed before
    ``make_private``) gives a ``CollectiveError`` on the others instead of a hang."""
    if not is_distributed():
        return
    timeout_s = COLLECTIVE_TIMEOUT_S if timeout_s is None else timeout_s
    names = sorted(settings)
    mine = torch.tensor([float(settings[n]) for n in names], dtype=torch.float64)  # (S,)
    gathered: List[torch.Tensor] = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    _collective("make_private's all-gather of the DP settings",
                lambda: dist.all_gather(gathered, mine, async_op=True), [mine], timeout_s)
    table = torch.stack(gathered)  # (W, S)
    differing = [n for i, n in enumerate(names) if not torch.all(table[:, i] == table[0, i])]
    if differing:
        detail = ", ".join(f"{n}: {table[:, names.index(n)].tolist()}" for n in differing)
        raise ValueError(f"ranks disagree on DP settings (one value per rank) - {detail}")


def all_reduce_sum(tensors: List[torch.Tensor], timeout_s: Optional[float] = None) -> List[torch.Tensor]:
    """SUM all-reduce of a list of tensors through one flat buffer; ``CollectiveError`` on failure or timeout."""
    flat = torch.cat([t.flatten() for t in tensors])  # (sum of numels,)
    _collective("the optimizer step's all-reduce of the noised clipped sums",
                lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True), [flat],
                COLLECTIVE_TIMEOUT_S if timeout_s is None else timeout_s)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


def all_reduce_max(value: int, timeout_s: Optional[float] = None) -> int:
    """The largest ``value`` over ranks (``value`` alone without a process group); ``CollectiveError`` on failure
    or timeout."""
    if not is_distributed():
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    box = torch.tensor([value], dtype=torch.int64, device=device)
    _collective("the data loader's agreement on the number of physical batches",
                lambda: dist.all_reduce(box, op=dist.ReduceOp.MAX, async_op=True), [box],
                COLLECTIVE_TIMEOUT_S if timeout_s is None else timeout_s)
    return int(box.item())


def reduce_scatter_sum(flat: torch.Tensor, group=None, timeout_s: Optional[float] = None) -> torch.Tensor:
    """SUM reduce-scatter of ``flat`` (W * n,) over ``group``: this rank's (n,) slice of the sum over ranks;
    ``CollectiveError`` on failure or timeout."""
    world = dist.get_world_size(group)
    if flat.dim() != 1 or flat.numel() % world:
        raise ValueError(f"reduce_scatter_sum needs a flat tensor of a multiple of {world} elements, found shape "
                         f"{tuple(flat.shape)}")
    out = torch.empty(flat.numel() // world, dtype=flat.dtype, device=flat.device)  # (n,)
    _collective("the reduce-scatter of the FSDP2 clipped sums at the end of a micro-batch",
                lambda: dist.reduce_scatter_tensor(out, flat, op=dist.ReduceOp.SUM, group=group, async_op=True),
                [flat], COLLECTIVE_TIMEOUT_S if timeout_s is None else timeout_s)
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
