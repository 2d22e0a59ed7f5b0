"""DP-SGD on FSDP2 (``torch.distributed.fsdp.fully_shard``): per-sample clipping on each rank's own samples,
clipped sums reduce-scattered into each rank's shard.

Between steps FSDP2 registers sharded parameters (DTensors, ``Shard(0)`` over the data-parallel mesh); for the
forward and backward of a unit it all-gathers them and registers the UNSHARDED tensors on the modules. The
per-sample rules run inside forward/backward, so each rank sees complete per-sample gradients of its own
samples: flat and per-layer norms need no cross-rank reduction. The tracker only computes the norms and clip
factors as contributions arrive; at the end of every micro-batch ``FSDPView.scatter_sums`` builds the clipped
sums one bucket of parameters at a time, reduce-scatters each bucket (SUM) and adds this rank's rows into its
shard of the logical batch's sum: at most one bucket of full-size sums is alive at once. The DP optimizer then
adds the FULL noise (std sigma*C) to this rank's shard only, from this rank's own secret stream: every
coordinate is held by exactly one rank, so its noise is drawn exactly once, with the single-process std.

Every rank must end the same number of micro-batches per logical batch (FSDP2's own all-gathers need that too):
the DP data loader agrees on the number of physical batches across ranks.

FSDP2's own reduce-scatter of ordinary gradients never runs: the unsharded tensors' non-private gradients
(layers fed by autograd hooks) are dropped as soon as they are accumulated. Memory per rank: the summed clipped
gradient, the privatised gradient and the noise buffers are 1/W of full size, plus one bucket of full-size sums
while a micro-batch ends; the per-sample pieces (layer inputs and output gradients) are kept until then.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from dptrain import distributed

__all__ = ["is_fsdp", "FSDPView", "shard_rows", "as_sharded_grad", "BUCKET_NUMEL"]

BUCKET_NUMEL = 1 << 22  # full-size fp32 elements reduce-scattered per collective (16 MiB); a bigger parameter alone


def is_fsdp(module: nn.Module) -> bool:
    """True for a model (or a model containing modules) sharded with FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_rows(rows: int, world: int, index: int) -> Tuple[int, int]:
    """Rows [start, stop) of dim 0 held by mesh rank ``index`` under ``Shard(0)`` (torch.chunk layout:
    ceil(rows / world) rows each, the last ranks short or empty)."""
    per = -(-rows // world)
    return min(index * per, rows), min((index + 1) * per, rows)


class FSDPView(nn.Module):
    """What ``make_private`` sees of an FSDP2 model: the same modules (so the tracker hooks them), plus the map
    from the unsharded tensors that forward/backward use to the sharded parameters the optimizer holds."""

    def __init__(self, model: nn.Module):
        super().__init__()
        from torch.distributed.tensor import Shard

        self.module = model
        self._sharded: Dict[Tuple[nn.Module, str], nn.Parameter] = {}
        self._sharded_of: Dict[torch.Tensor, nn.Parameter] = {}  # unsharded tensor -> sharded parameter
        self._handles = []
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for name, module in model.named_modules():
            own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            for pname, p in own.items():
                if not _is_dtensor(p):
                    raise ValueError(f"parameter {name}.{pname} of the FSDP2 model is not sharded (found a plain "
                                     "tensor): apply fully_shard to the root module too")
                mesh = p.device_mesh
                if mesh.ndim != 1 or mesh.size() != world:
                    raise ValueError(f"parameter {name}.{pname} is sharded over a mesh of shape {tuple(mesh.shape)}; "
                                     f"dptrain supports FSDP2 over one data-parallel dimension of all {world} ranks")
                if tuple(p.placements) != (Shard(0),) or p.dim() == 0:
                    raise ValueError(f"parameter {name}.{pname} is placed as {tuple(p.placements)} with shape "
                                     f"{tuple(p.shape)}; dptrain supports FSDP2's default Shard(0) of tensors with "
                                     "at least one dimension (no shard_placement_fn)")
                self._sharded[(module, pname)] = p
            if own:  # runs after FSDP's own pre-forward hook, which registered the unsharded tensors
                self._handles.append(module.register_forward_pre_hook(self._remember_unsharded))

    def forward(self, *args, **kwargs):
        raise RuntimeError("call the FSDP2 model returned by make_private, not this view of it")

    def _remember_unsharded(self, module: nn.Module, args) -> None:
        for pname, t in module._parameters.items():
            sharded = self._sharded.get((module, pname))
            if sharded is None or t is None or t is sharded or t in self._sharded_of:
                continue
            self._sharded_of[t] = sharded
            if t.requires_grad:  # its ordinary gradient is non-private: never keep it, never reduce-scatter it
                self._handles.append(t.register_post_accumulate_grad_hook(_drop_grad))

    def _keys_by_param(self, keys) -> Dict[nn.Parameter, List[torch.Tensor]]:
        """The tracker's ``keys`` (unsharded tensors, or sharded parameters) of each sharded parameter."""
        out: Dict[nn.Parameter, List[torch.Tensor]] = {}
        sharded_ids = {id(p) for p in self._sharded.values()}
        for key in keys:
            target = key if id(key) in sharded_ids else self._sharded_of.get(key)
            if target is None:  # never silently drop a privatised sum
                raise RuntimeError(f"a clipped gradient sum of shape {tuple(key.shape)} belongs to no sharded "
                                   "parameter of the FSDP2 model; were parameters re-created after make_private?")
            out.setdefault(target, []).append(key)
        return out

    def scatter_sums(self, clipper) -> None:
        """The tracker's ``sum_sink``, at the end of every micro-batch on every rank: builds the micro-batch's
        clipped sums one bucket of parameters at a time (in the same order on every rank), reduce-scatters each
        bucket (SUM) and adds this rank's rows into ``clipper.clipped_sum`` (fp32, keyed by the sharded
        parameters, shaped like ``p.to_local()``). At most one bucket of full-size sums is alive at a time; a
        parameter without a sum on this rank contributes zeros."""
        keys = self._keys_by_param(list(clipper.deferred))
        params = list(self._sharded.values())
        for bucket in _buckets(params, BUCKET_NUMEL):
            sums = [_built_sum(p, keys.get(p, []), clipper) for p in bucket]
            for p, shard in zip(bucket, _reduce_scatter_bucket(bucket, sums)):
                held = clipper.clipped_sum.get(p)
                clipper.clipped_sum[p] = shard if held is None else held.add_(shard)


def _buckets(params: List[nn.Parameter], bucket_numel: int) -> List[List[nn.Parameter]]:
    """Consecutive parameters of one process group, up to ``bucket_numel`` full-size elements per bucket."""
    buckets: List[List[nn.Parameter]] = []
    size, group = 0, None
    for p in params:
        g = p.device_mesh.get_group()
        if not buckets or g is not group or size + p.numel() > bucket_numel:
            buckets.append([])
            size, group = 0, g
        buckets[-1].append(p)
        size += p.numel()
    return buckets


def _reduce_scatter_bucket(params: List[nn.Parameter], sums: List[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    """This rank's shards of ``sum over ranks of sums[j]`` for every parameter j, by one collective.

    The input is laid out rank-major, (W, S): rank k's rows of every parameter, each padded with zeros to
    ceil(rows / W) rows. ``sums`` (full size, None for zeros) are released as they are copied in."""
    mesh = params[0].device_mesh
    world, index = mesh.size(), mesh.get_local_rank()
    device = params[0].device
    if world == 1:  # one rank: its shard is the whole sum
        return [s if s is not None else torch.zeros(p.shape, device=device) for p, s in zip(params, sums)]
    row = [p.numel() // p.shape[0] if p.shape[0] else 0 for p in params]  # elements per row
    width = [-(-p.shape[0] // world) * r for p, r in zip(params, row)]  # per-rank columns (padded rows)
    offsets = [sum(width[:j]) for j in range(len(params))]
    if len(params) == 1 and sums[0] is not None and params[0].shape[0] % world == 0:
        buffer = sums.pop().view(world, width[0])  # even rows: the sum is rank-major already, no copy
    else:
        buffer = torch.empty(world, sum(width), dtype=torch.float32, device=device)  # (W, S)
        for j, p in enumerate(params):
            block = buffer[:, offsets[j]:offsets[j] + width[j]]  # (W, per * row)
            full, sums[j] = sums[j], None  # the tracker's full-size sum is freed after this copy
            for k in range(world):
                lo, hi = shard_rows(p.shape[0], world, k)
                if full is not None:
                    block[k, : (hi - lo) * row[j]].copy_(full.view(p.shape[0], row[j])[lo:hi].view(-1))
                block[k, (hi - lo) * row[j] if full is not None else 0:].zero_()
            del full
    out = distributed.reduce_scatter_sum(buffer.view(-1), group=mesh.get_group())  # (S,)
    del buffer
    shards = []
    for j, p in enumerate(params):
        lo, hi = shard_rows(p.shape[0], world, index)
        shard = out[offsets[j]:offsets[j] + (hi - lo) * row[j]].view(hi - lo, *p.shape[1:])  # this rank's rows
        if shard.shape != p.to_local().shape:
            raise RuntimeError(f"FSDP2 holds a local shard of shape {tuple(p.to_local().shape)} of a parameter of "
                               f"shape {tuple(p.shape)}; dptrain expected {tuple(shard.shape)} (torch.chunk rows)")
        shards.append(shard)
    return shards


def _built_sum(p: nn.Parameter, keys: List[torch.Tensor], clipper) -> Optional[torch.Tensor]:
    """The parameter's fp32 clipped sum of the micro-batch (its keys' deferred sums added up); None if none."""
    found = [s for s in (clipper.take_sum(k) for k in keys) if s is not None]
    if not found:
        return None
    total = found[0]
    for s in found[1:]:
        total = total.add_(s)
    if total.shape != p.shape:
        raise RuntimeError(f"a clipped sum of shape {tuple(total.shape)} was filed for a parameter of shape "
                           f"{tuple(p.shape)}")
    return total.contiguous()


def as_sharded_grad(shard: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``shard`` (this rank's rows) as a gradient DTensor placed like ``param``; no communication."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(shard.to(param.dtype), param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def _drop_grad(t: torch.Tensor) -> None:
    t.grad = None
