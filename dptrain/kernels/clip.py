"""The clip factor (the one place its formula lives; the engine uses it too) and the bound that factored per-sample
norms are clipped against, so that no rounding lets a clipped sample weigh more than C."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

__all__ = ["CLIP_EPS", "CANCELLATION_RHO", "FP32_UNIT_ROUNDOFF", "clip_factors", "row_norm_bounds",
           "triangle_bounds", "clip_bounds_sq", "ieee_fp32_matmul"]

CLIP_EPS = 1e-6

#: A factored norm is clipped against sqrt(norm^2 + rho U^2 + A) + 2 u sum_k T_k U_k (``clip_bounds_sq``), U the
#: triangle bound sum_t |x_t| |g_t|: rho U^2 covers the fp64 Gram and cross-term sums and the fp32 rounding of norm^2
#: itself (relative to U^2), A what fp32 Grams may lose (``linear_norms.ghost_rounding_allowance``), the linear term
#: the fp32 sums over a use's T_k tokens that the norm (instantiated tiles, segment sums) and the weighted sum each
#: make, within T_k u U_k of exact in any order, u = 2^-24.
#: docs/architecture.md, "Precision of the private sums", has the attacks they stop and their measured price.
CANCELLATION_RHO = 2.0**-20
FP32_UNIT_ROUNDOFF = 2.0**-24


@contextlib.contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """fp32 matmuls in IEEE fp32 inside, whatever the caller set: the bounds assume u = 2^-24, while
    ``torch.set_float32_matmul_precision("high")`` (or the backends' ``fp32_precision``) runs CUDA's in TF32 (10
    mantissa bits), "medium" the CPU's in bf16 (7), and a backward called inside ``torch.autocast`` would cast the
    clipper's products to half precision. Sets and restores each backend's own flag, which overrides both the
    legacy and the global setting (reading the legacy one raises once the backends disagree)."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        matmuls = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
        backends = [m for m in matmuls if hasattr(m, "fp32_precision")]
        for matmul in backends:
            saved = matmul.fp32_precision
            if saved != "ieee":
                matmul.fp32_precision = "ieee"
                stack.callback(setattr, matmul, "fp32_precision", saved)
        if not backends and torch.get_float32_matmul_precision() != "highest":  # torch before the per-backend flags
            stack.callback(torch.set_float32_matmul_precision, torch.get_float32_matmul_precision())
            torch.set_float32_matmul_precision("highest")
        yield


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
    bound = row_norm_bounds(g)  # (B, T)
    if x is not None:
        bound = bound * row_norm_bounds(x)
    return bound.sum(-1)


def row_norm_bounds(t: torch.Tensor) -> torch.Tensor:
    """Upper bounds of the norms of the rows of ``t`` (B, T, d), (B, T) fp64: fp32 sums of squares raised by their
    rounding, (d + 3) u, and fp64 for the rows whose fp32 squares may have underflowed (norm below 2^-60) or
    overflowed."""
    d, work = t.shape[-1], torch.float64 if t.dtype == torch.float64 else torch.float32
    norms = torch.linalg.vector_norm(t, dim=-1, dtype=work).double().mul_(1 + (d + 3) * 2.0**-24)  # (B, T)
    redo = (norms < 2.0**-60) | ~torch.isfinite(norms)
    if bool(redo.any()):
        norms[redo] = torch.linalg.vector_norm(t[redo].double(), dim=-1)
    return norms


def clip_bounds_sq(sq_norms: torch.Tensor, triangle: torch.Tensor, token_weighted: torch.Tensor,
                   allowance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Squared bounds to clip factored per-sample gradients against, (B,) fp32:
    (sqrt(max(sq_norms, 0) + rho U^2 + A) + 2 u sum_k T_k U_k)^2, from their computed squared norms, U = ``triangle``,
    sum_k T_k U_k = ``token_weighted`` and A = ``allowance`` (what fp32 Grams may lose; all (B,)).

    A sample whose token terms cancel has a true norm far below its terms, and a computed norm that rounding can
    put anywhere below that (~0, or negative); the weighted sum, another computation, rounds its own way. Both are
    covered: the bound is at least the norm of what the weighted sum adds. A typical sample (U / norm ~ sqrt(T))
    is clipped as if its norm were larger by ~rho T / 2 + 2 u T sqrt(T).
    """
    sq = sq_norms.double().clamp_min(0) + CANCELLATION_RHO * triangle.double().square()
    if allowance is not None:
        sq = sq + allowance
    return (sq.sqrt() + 2 * FP32_UNIT_ROUNDOFF * token_weighted.double()).square().float()
