"""The clip factor (the one place its formula lives; the engine uses it too) and the rounding margin that makes
clipping against a factored norm sound."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["CLIP_EPS", "CANCELLATION_RHO", "clip_factors", "triangle_bounds", "cancellation_margins"]

CLIP_EPS = 1e-6

#: The margin's square root, 2^-10 of the triangle bound U = sum_t |x_t| |g_t|, covers what a factored norm and
#: the weighted sum still round in fp32: sums over T tokens, each within T 2^-24 U of exact in any order, so up to
#: T = 2^14 (the Gram sums over features are fp64: ``_common.GRAM_DTYPE``). docs/architecture.md, "Precision of
#: the private sums", has the attacks it stops and its measured price.
CANCELLATION_RHO = 2.0**-20


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


def triangle_bounds(x: Optional[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """Triangle bounds sum_t |x_t| |g_t| of G_i = g_i^T x_i, (B,) fp64; ``x`` None: one-hot rows (|x_t| = 1)."""
    bound = _row_norms(g)  # (B, T)
    if x is not None:
        bound = bound * _row_norms(x)
    return bound.sum(-1)


def _row_norms(t: torch.Tensor) -> torch.Tensor:
    """Norms of the rows of ``t`` (B, T, d), (B, T) fp64: fp32 sums of squares, and fp64 for the rows whose fp32
    squares may have underflowed (norm below 2^-60) or overflowed."""
    norms = torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32).double()  # (B, T)
    redo = (norms < 2.0**-60) | ~torch.isfinite(norms)
    if bool(redo.any()):
        norms[redo] = torch.linalg.vector_norm(t[redo].double(), dim=-1)
    return norms


def cancellation_margins(triangle_bounds: torch.Tensor) -> torch.Tensor:
    """What to add to a factored squared norm before clipping, (B,) fp32: ``CANCELLATION_RHO * bound^2``.

    A sample whose token terms cancel has a true norm far below its terms; its computed squared norm can then be
    ~0 (or negative) while the weighted sum, another computation, adds its true gradient. Clipping against
    sqrt(norm^2 + margin) >= the true norm keeps every sample within C; a typical sample (bound^2 / norm^2 ~ T) is
    clipped as if its norm were larger by a factor ~1 + CANCELLATION_RHO * T / 2.
    """
    return triangle_bounds.double().square().mul_(CANCELLATION_RHO).float()
