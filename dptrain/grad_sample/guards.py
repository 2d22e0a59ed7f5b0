"""Modules that mix the samples of a batch or write buffers from the data: refused, with or without parameters.

A BatchNorm in train mode normalises each sample with statistics of the whole batch (no per-sample gradient
exists) and, like an InstanceNorm with running statistics, writes running statistics computed from the data.
Buffers are released with the weights (``state_dict``) without noise. So the tracker refuses such modules by
class at ``make_private`` and guards them at every forward (a frozen BatchNorm must stay in eval mode), and
catches the rest generically: a buffer changed in place bumps its ``_version``, a reassigned or new buffer
changes the list of buffers, so comparing ``buffer_state`` before and after a captured forward pass finds
any module that writes buffers, without comparing tensors. Parameters are compared the same way: an
``nn.Embedding(max_norm=...)`` renormalises the rows it looks up in place, so even a frozen one would release
which tokens the data used.
"""

from __future__ import annotations

from itertools import zip_longest
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from dptrain.grad_sample.registry import UnsupportedModuleError

__all__ = ["is_guarded", "check_mixing", "check_hub_kernels", "buffer_state", "check_buffers"]

_FIX = "replace it with GroupNorm or LayerNorm, or call .eval() on it (frozen running statistics) and keep it in eval mode"


def is_guarded(module: nn.Module) -> bool:
    """Normalisation layers whose mode decides whether they mix samples, and modules whose weight a hook computes:
    checked at set-up and at every forward."""
    return (isinstance(module, (_BatchNorm, _InstanceNorm)) or _weight_hook(module) is not None
            or getattr(module, "max_norm", None) is not None and isinstance(module, (nn.Embedding, nn.EmbeddingBag)))


def _weight_hook(module: nn.Module) -> Optional[str]:
    """The name of the legacy weight_norm / spectral_norm hook that computes ``module``'s weight, if any."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)):
            return "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
    return None


def _mixing_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` in its current mode mixes samples or writes buffers from the data; None if it does not."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None:
        return (f"max_norm={module.max_norm:g} renormalises the rows it looks up in place, in every mode, so its "
                "released weight shows which tokens the data used")
    if isinstance(module, _BatchNorm):
        if module.training:
            writes = " and writes its running statistics from them" if module.track_running_stats else ""
            return f"in train mode it normalises with statistics of the whole batch (mixes samples){writes}"
        if module.running_mean is None and module.running_var is None:
            return "without running statistics it normalises with batch statistics even in eval mode (mixes samples)"
    if isinstance(module, _InstanceNorm) and module.training and module.track_running_stats:
        return "with track_running_stats=True it writes its running statistics from the data in train mode"
    return None


def check_mixing(name: str, module: nn.Module) -> None:
    """Raise, naming the module and the fix, if ``module`` in its current mode mixes samples or writes buffers."""
    hook = _weight_hook(module)
    if hook is not None and any(p.requires_grad for p in module.parameters(recurse=False)):
        # the weight is an attribute each forward recomputes: backward may see another forward's, without a graph
        raise UnsupportedModuleError(
            f"module '{name}' ({type(module).__name__}): its weight is computed by torch.nn.utils.{hook} in a "
            "forward pre-hook, outside any per-sample rule, so its parameters' gradients would be lost; remove it "
            f"(torch.nn.utils.remove_{hook}) or freeze the module"
        )
    reason = _mixing_reason(module)
    if reason is not None:
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            fix = "set max_norm=None (per-sample clipping already bounds each record's influence)"
        elif isinstance(module, _InstanceNorm):
            fix = "use track_running_stats=False or GroupNorm, or call .eval() on it"
        else:
            fix = _FIX
        raise UnsupportedModuleError(
            f"module '{name}' ({type(module).__name__}): {reason}, which differential privacy does not cover; {fix}"
        )


def check_hub_kernels(model: nn.Module) -> None:
    """Refuse a Hugging Face model whose layers ``kernelize`` replaced with hub kernels (``use_kernels``): their
    forward passes bypass the per-sample rules (a kernelized RMSNorm's weight got an ordinary gradient)."""
    if getattr(model, "use_kernels", False) is True:
        raise UnsupportedModuleError(
            f"{type(model).__name__} runs Hugging Face hub kernels (use_kernels=True: from_pretrained's default from "
            "transformers 5.25 when the kernels package is installed), whose layers bypass dptrain's per-sample "
            "rules; load it with from_pretrained(..., use_kernels=False) or call model.set_use_kernels(False)"
        )


BufferState = List[Tuple[str, str, torch.Tensor, int]]


def buffer_state(modules: Sequence[Tuple[str, nn.Module]]) -> BufferState:
    """(module name, tensor name, tensor, version counter) of every buffer and parameter of ``modules``."""
    return [(m_name, t_name, t, _version(t)) for m_name, m in modules
            for t_name, t in [*m._buffers.items(), *m._parameters.items()] if t is not None]


def check_buffers(before: BufferState, after: BufferState) -> None:
    """Raise, naming the module and tensor, if a buffer or parameter was written in place, reassigned, added or
    removed in between."""
    for old, new in zip_longest(before, after):
        if old is None or new is None or old[:2] != new[:2] or old[2] is not new[2] or old[3] != new[3]:
            m_name, t_name = (new or old)[:2]
            kind = "parameter" if isinstance((new or old)[2], nn.Parameter) else "buffer"
            raise UnsupportedModuleError(
                f"module '{m_name}' changed its {kind} '{t_name}' during a training forward pass; it is released "
                "with the weights without noise, so a tensor written from the data leaks it. Freeze the module "
                "(eval mode) or keep the tensor constant"
            )


def _version(t: torch.Tensor) -> int:
    # inference tensors have no version counter, and cannot be changed in place outside inference mode
    return -1 if t.is_inference() else t._version
