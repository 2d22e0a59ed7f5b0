"""Per-layer clipping of a linear layer in one call: per-sample norms, clip factors and the clipped sum.

norms_i = sqrt(b_i^2 + extra_i), b_i the bound ``clip_bounds_sq`` puts on ||g_i^T x_i|| for T > 1 (so rounding in
the norm or the sum cannot let a sample exceed C) and the norm itself for T = 1, extra the squared norms of the
layer's other parameters, e.g. its bias, so the layer is clipped jointly; grad = sum_i min(1, C / (norms_i + 1e-6))
g_i^T x_i.
On the GPU the norm kernel never writes per-sample gradients, and the clip factor is computed inside the sum
kernel from the squared norms, so nothing of size (B, d_out, d_in) ever reaches global memory.
"""

from __future__ import annotations

import torch

from ._common import check_linear_inputs, check_per_sample, check_strategy, use_triton
from .clip import clip_bounds_sq, clip_factors
from .linear_norms import bound_terms, choose_linear_strategy, linear_grad_sq_norms_torch, linear_grad_sq_norms_triton
from .scaled_grad import scaled_linear_grad_torch, scaled_linear_grad_triton

__all__ = ["fused_clip_linear_grad"]


# ----------------------------------------------------------------------------------------------- public op
def fused_clip_linear_grad(
    x: torch.Tensor,
    g: torch.Tensor,
    max_norm: float,
    *,
    extra_sq_norms: torch.Tensor | None = None,
    strategy: str = "auto",
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped weight-gradient sum and per-sample norms of a linear layer: (grad (d_out, d_in), norms (B,)).

    x: (B, T, d_in) or (B, d_in); g: (B, T, d_out) or (B, d_out); extra_sq_norms: (B,) squared per-sample norms
    of the layer's other parameters (e.g. bias), included in the norm so the layer is clipped jointly. grad is
    in ``out_dtype`` (default: x's dtype), norms fp32 (what is clipped against: bounds for T > 1, see above); the
    clip factors are ``clip_factors(norms, max_norm)``.
    """
    check_strategy(strategy)
    if isinstance(max_norm, torch.Tensor):
        max_norm = float(max_norm)
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, found {max_norm}")
    x3, g3 = check_linear_inputs(x, g)  # (B, T, d_in), (B, T, d_out)
    if g3.dtype != x3.dtype:
        g3 = g3.to(x3.dtype)
    if extra_sq_norms is not None:
        extra_sq_norms = check_per_sample(extra_sq_norms, x3.shape[0], "extra_sq_norms").to(x.device)
    if strategy == "auto":
        strategy = choose_linear_strategy(x3.shape[1], x3.shape[2], g3.shape[2], x3.device.type)
    triton = x3.shape[0] > 0 and use_triton(backend, x3, g3)
    sq = (linear_grad_sq_norms_triton if triton else linear_grad_sq_norms_torch)(x3, g3, strategy)  # (B,) fp32
    if x3.shape[1] > 1:
        bound, allowance = bound_terms(x3, g3, strategy)  # (B,) each
        sq = clip_bounds_sq(sq, bound, x3.shape[1] * bound, None if triton else allowance)
    if extra_sq_norms is not None:
        sq = sq + extra_sq_norms
    if triton:  # the scaled-sum kernel's clipping variant: clip factors from the squared norms, in the kernel
        return scaled_linear_grad_triton(x3, g3, sq, clip_norm=max_norm, out_dtype=out_dtype), sq.sqrt()
    norms = sq.sqrt()
    return scaled_linear_grad_torch(x3, g3, clip_factors(norms, max_norm), out_dtype), norms
