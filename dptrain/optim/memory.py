"""Count the bytes an optimizer keeps as state (what it adds to memory beyond parameters and gradients)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["optimizer_state_bytes", "parameter_state_bytes"]

_PY_SCALAR_BYTES = 8  # a Python int/float kept in state (e.g. APOLLO's seed) counts as one 64-bit word


def _bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, bool):
        return 0
    if isinstance(value, (int, float)):
        return _PY_SCALAR_BYTES
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_bytes(v) for v in value.values())
    return 0


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of all state tensors of ``optimizer`` (numel x element size), plus 8 per Python int/float, plus
    state shared by several parameters outside ``optimizer.state`` (``shared_state_bytes()``, e.g. DCT bases).

    Works for any ``torch.optim.Optimizer`` (AdamW included, and a DP wrapper of one), so ratios against AdamW
    are like for like.
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, found {type(optimizer).__name__}")
    inner = getattr(optimizer, "original_optimizer", optimizer)  # dptrain.DPOptimizer forwards its state
    shared = inner.shared_state_bytes() if hasattr(inner, "shared_state_bytes") else 0
    return sum(_bytes(state) for state in optimizer.state.values()) + shared


def parameter_state_bytes(optimizer: Optimizer, param: torch.Tensor) -> int:
    """Bytes of the state ``optimizer`` keeps for ``param`` alone (same counting as :func:`optimizer_state_bytes`)."""
    return _bytes(optimizer.state.get(param, {}))
