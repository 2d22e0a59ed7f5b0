"""Per-layer clipping of a linear layer in one call: per-sample norms, clip factors and the clipped sum.

norms_i = sqrt(||g_i^T x_i||^2 + extra_i) (extra: squared norms of the layer's other parameters, e.g. its bias,
so the layer is clipped jointly); grad = sum_i min(1, C / (norms_i + 1e-6)) g_i^T x_i. On the GPU the norm
kernel never writes per-sample gradients, and the clip factor is computed inside the sum kernel from the
squared norms, so nothing of size (B, d_out, d_in) ever reaches global memory.
"""

from __future__ import annotations

import torch

from ._common import (
    DOT_FP32,
    HAS_TRITON,
    SUM_BLOCKS,
    SUM_TABLE,
    autotune_configs,
    check_linear_inputs,
    check_per_sample,
    check_strategy,
    rows_2d,
    scaled_tile,
    tl,
    triton,
    use_triton,
)
from .clip import CLIP_EPS, clip_factors
from .linear_norms import choose_linear_strategy, linear_grad_sq_norms_torch, linear_grad_sq_norms_triton
from .scaled_grad import scaled_linear_grad_torch

__all__ = ["fused_clip_linear_grad"]


# ----------------------------------------------------------------------------------------------- torch reference
def fused_clip_linear_grad_torch(x, g, max_norm, extra_sq_norms, strategy):
    """Reference: norms (ghost or instantiate), then one scaled GEMM."""
    sq = linear_grad_sq_norms_torch(x, g, strategy)  # (B,)
    if extra_sq_norms is not None:
        sq = sq + extra_sq_norms
    norms = sq.sqrt()
    return scaled_linear_grad_torch(x, g, clip_factors(norms, max_norm)), norms


# ----------------------------------------------------------------------------------------------- Triton kernel
if HAS_TRITON:
    _CONFIGS = autotune_configs(SUM_BLOCKS, SUM_TABLE)

    @triton.autotune(configs=_CONFIGS, key=["N", "D_IN", "D_OUT"])
    @triton.jit
    def _fused_clip_linear_grad_kernel(
        x_ptr, g_ptr, sq_ptr, out_ptr,
        max_norm, eps,
        N, T, D_IN, D_OUT,
        stride_xr, stride_xd, stride_gr, stride_gd, stride_oo, stride_oi,
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        """One tile of sum_i min(1, C / (sqrt(sq_i) + eps)) g_i^T x_i: the clip factor never leaves registers."""
        pid_o = tl.program_id(0)
        pid_i = tl.program_id(1)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        acc = scaled_tile(x_ptr, g_ptr, sq_ptr, max_norm, eps, N, T, D_IN, D_OUT,
                           stride_xr, stride_xd, stride_gr, stride_gd, offs_o, offs_i, BLOCK_O, BLOCK_I, BLOCK_K, True, DOT_FP32)
        tl.store(out_ptr + offs_o[:, None] * stride_oo + offs_i[None, :] * stride_oi,
                 acc.to(out_ptr.dtype.element_ty), mask=(offs_o[:, None] < D_OUT) & (offs_i[None, :] < D_IN))


def fused_clip_linear_grad_triton(x, g, max_norm, extra_sq_norms, strategy):
    """Norm kernel (ghost or instantiate, tiled on chip), then the clip-and-sum kernel."""
    B, T, d_in = x.shape
    d_out = g.shape[2]
    sq = linear_grad_sq_norms_triton(x, g, strategy)  # (B,) fp32
    if extra_sq_norms is not None:
        sq = sq + extra_sq_norms
    x2, g2 = rows_2d(x), rows_2d(g)  # (B*T, d_in), (B*T, d_out)
    out = torch.empty(d_out, d_in, dtype=x.dtype, device=x.device)

    def grid(meta):
        return (triton.cdiv(d_out, meta["BLOCK_O"]), triton.cdiv(d_in, meta["BLOCK_I"]))

    _fused_clip_linear_grad_kernel[grid](
        x2, g2, sq, out, float(max_norm), CLIP_EPS, B * T, T, d_in, d_out, *x2.stride(), *g2.stride(), *out.stride(),
        DOT_FP32=DOT_FP32,
    )
    return out, sq.sqrt()


# ----------------------------------------------------------------------------------------------- public op
def fused_clip_linear_grad(
    x: torch.Tensor,
    g: torch.Tensor,
    max_norm: float,
    *,
    extra_sq_norms: torch.Tensor | None = None,
    strategy: str = "auto",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped weight-gradient sum and per-sample norms of a linear layer: (grad (d_out, d_in), norms (B,)).

    x: (B, T, d_in) or (B, d_in); g: (B, T, d_out) or (B, d_out); extra_sq_norms: (B,) squared per-sample norms
    of the layer's other parameters (e.g. bias), included in the norm so the layer is clipped jointly. grad is
    in x's dtype, norms fp32; the clip factors are ``clip_factors(norms, max_norm)``.
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
        strategy = choose_linear_strategy(x3.shape[1], x3.shape[2], g3.shape[2])
    if x3.shape[0] > 0 and use_triton(backend, x3, g3):
        return fused_clip_linear_grad_triton(x3, g3, max_norm, extra_sq_norms, strategy)
    return fused_clip_linear_grad_torch(x3, g3, max_norm, extra_sq_norms, strategy)
