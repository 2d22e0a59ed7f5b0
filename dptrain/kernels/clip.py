"""The clip factor: the one place its formula lives (the engine uses it too)."""

from __future__ import annotations

import torch

__all__ = ["CLIP_EPS", "clip_factors"]

CLIP_EPS = 1e-6


def clip_factors(norms: torch.Tensor, max_norm: float | torch.Tensor) -> torch.Tensor:
    """Per-sample clip factors ``min(1, max_norm / (norms + 1e-6))``, (B,) fp32.

    Scaling sample i's gradient by its factor bounds its norm by ``max_norm``; samples already inside the ball
    are left alone (factor 1).
    """
    if isinstance(max_norm, torch.Tensor):
        max_norm = max_norm.to(device=norms.device, dtype=torch.float32)
    elif not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, found {max_norm}")
    return (max_norm / (norms.float() + CLIP_EPS)).clamp(max=1.0)  # (B,)
