"""DP-SGD on FSDP2 (``torch.distributed.fsdp.fully_shard``): per-sample clipping on each rank's own samples.

Between steps FSDP2 registers sharded parameters (DTensors, ``Shard(0)`` over the data-parallel mesh); for the
forward and backward of a unit it all-gathers them and registers the UNSHARDED tensors on the modules. The
per-sample rules run inside forward/backward, so each rank sees complete per-sample gradients of its own
samples: flat and per-layer norms need no cross-rank reduction. The tracker files its clipped sums under the
unsharded tensors; this module maps them back to the sharded parameters the optimizer holds, and the DP
optimizer then adds each rank's noise share (std sigma*C/sqrt(W)) to the full-size sum, all-reduces (SUM: the
noise is present exactly once in total, with the single-process std), and writes this rank's shard as the
DTensor gradient the inner optimizer expects.

FSDP2's own reduce-scatter of ordinary gradients never runs: the unsharded tensors' non-private gradients
(layers fed by autograd hooks) are dropped as soon as they are accumulated. Cost: the clipped sums and the
all-reduce are full-size on every rank (as with DDP); the parameters and optimizer state stay sharded.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["is_fsdp", "FSDPView", "shard_like"]


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


class FSDPView(nn.Module):
    """What ``make_private`` sees of an FSDP2 model: the same modules (so the tracker hooks them), plus the map
    from the unsharded tensors that forward/backward use to the sharded parameters the optimizer holds."""

    def __init__(self, model: nn.Module):
        super().__init__()
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

    def clipped_sums(self, clipped_sum: Dict[torch.Tensor, torch.Tensor],
                     params: List[nn.Parameter]) -> List[Optional[torch.Tensor]]:
        """The tracker's clipped sums (keyed by unsharded tensors) in the order of ``params`` (sharded)."""
        by_param: Dict[nn.Parameter, torch.Tensor] = {}
        sharded_ids = {id(p) for p in self._sharded.values()}
        for key, s in clipped_sum.items():
            target = key if id(key) in sharded_ids else self._sharded_of.get(key)
            if target is None:  # never silently drop a privatised sum
                raise RuntimeError(f"a clipped gradient sum of shape {tuple(s.shape)} belongs to no sharded parameter "
                                   "of the FSDP2 model; were parameters re-created after make_private?")
            by_param[target] = s if target not in by_param else by_param[target] + s
        return [by_param.get(p) for p in params]


def _drop_grad(t: torch.Tensor) -> None:
    t.grad = None


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` (identical on every rank) as a DTensor placed like ``param``; no communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
