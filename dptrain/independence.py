"""A one-time probe that the model treats the samples of a batch independently.

Per-sample clipping bounds one record's influence only if each sample's output depends on that sample alone.
The per-module checks catch layers that mix samples through parameters or buffers (BatchNorm); a layer that
mixes them without either (``x - x.mean(0)``, attention across the batch, capacity-limited expert routing) is
invisible to them. So before the first training forward pass of two or more samples the model is run in eval
mode (dropout off), without gradients, on the whole batch and on its first and last samples alone; each one's
output must equal its row of the batch's output, or ``make_private``'s model refuses to train. The probe runs
before the real forward pass, so anything a forward pass sets on the model is left as the real one set it.
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping

import torch
from torch import nn

from dptrain.grad_sample.registry import UnsupportedModuleError

__all__ = ["install_probe", "check_independence"]


def install_probe(model: nn.Module, batch_size: Callable[[], int], disabled: Callable) -> Callable[[], None]:
    """Probe ``model`` before its first training forward pass of >= 2 samples; returns the undo.

    ``batch_size()`` is the batch size of the call being probed, ``disabled()`` a context in which forward passes
    are not captured for per-sample gradients.
    """
    state = {"probing": False}

    def hook(module, args, kwargs):
        if state["probing"] or not torch.is_grad_enabled():
            return
        batch = batch_size()
        if batch is None or batch < 2:
            return
        state["probing"] = True
        try:
            with disabled(), torch.no_grad():
                check_independence(module, args, kwargs, batch)
        finally:
            state["probing"] = False
        handle.remove()

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return handle.remove


def check_independence(model: nn.Module, args: tuple, kwargs: dict, batch: int) -> None:
    """Raise if the eval-mode output of the first or last sample alone differs from its row in the batch's output."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        rows = _tensors(model(*args, **kwargs))
        for i in (0, batch - 1):
            alone = _tensors(model(*_slice(args, i, batch), **_slice(kwargs, i, batch)))
            if len(alone) != len(rows):
                raise UnsupportedModuleError(f"the model returns {len(rows)} tensors for a batch of {batch} but "
                                             f"{len(alone)} for sample {i} alone, so its samples cannot be compared")
            for where, (full, single) in enumerate(zip(rows, alone)):
                if full.dim() > 0 and full.shape[0] == batch:  # a per-sample output
                    _compare(full[i], single, i, where)
    finally:
        for m, training in modes.items():
            m.training = training


def _compare(in_batch: torch.Tensor, alone: torch.Tensor, i: int, where: int) -> None:
    alone = alone[0] if alone.dim() > 0 and alone.shape[0] == 1 else alone.new_full((0,), 0)  # (...) of one sample
    tol = max(1e-4, 16 * torch.finfo(in_batch.dtype).eps) if in_batch.is_floating_point() else 0.0
    scale = float(in_batch.abs().max()) if in_batch.numel() else 0.0
    gap = float((in_batch.float() - alone.float()).abs().max()) if in_batch.numel() else 0.0
    if in_batch.shape != alone.shape or gap > tol * max(scale, 1.0):
        raise UnsupportedModuleError(
            f"the model mixes the samples of a batch: in eval mode, output {where} of sample {i} run alone differs "
            f"from its row in the batch by {gap:.3g} (tolerance {tol * max(scale, 1.0):.3g}), so per-sample "
            "clipping does not bound one record's influence; remove the layer that combines samples (a batch "
            "statistic, attention across the batch), or make its result per sample"
        )


def _slice(value: Any, i: int, batch: int) -> Any:
    """``value`` with every tensor whose first dimension is the batch cut to sample ``i`` (kept 1 long)."""
    if isinstance(value, torch.Tensor):
        return value[i:i + 1] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, Mapping):
        return {k: _slice(v, i, batch) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_slice(v, i, batch) for v in value)
    return value


def _tensors(value: Any) -> List[torch.Tensor]:
    """The tensors of a forward's output in a fixed order (dicts and Hugging Face outputs by key)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for k in value for t in _tensors(value[k])]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []
