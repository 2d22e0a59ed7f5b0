"""Scaled sum of per-sample linear-layer gradients: sum_i scale_i g_i^T x_i, one GEMM over B*T rows.

This is the clipped (or weighted, for flat clipping) weight gradient: with scale_i = 1 it is the ordinary
batch weight gradient. Output (d_out, d_in), accumulated in fp32, in x's dtype or ``out_dtype``: a private sum
must come out in fp32, since rounding it to a half type moves it by up to 2^-9 of its own size, which grows with
the batch and is not bounded by the clip threshold.
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
    dot_acc,
    rows_2d,
    tl,
    triton,
    tuning_bucket,
    use_triton,
)
from .clip import CLIP_EPS

__all__ = ["scaled_linear_grad"]


# ----------------------------------------------------------------------------------------------- torch reference
def scaled_linear_grad_torch(x: torch.Tensor, g: torch.Tensor, scale: torch.Tensor,
                             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference for (B, T, d_in), (B, T, d_out), (B,) fp32: ((scale * g) reshaped)^T @ x reshaped."""
    out_dtype = out_dtype or x.dtype
    B, T, d_in = x.shape
    d_out = g.shape[2]
    work = torch.bfloat16 if x.is_cuda and x.dtype == torch.bfloat16 else torch.float32  # see split_bf16
    s = scale.to(x.device)[:, None, None]  # (B, 1, 1)
    if torch.float64 in (x.dtype, g.dtype):  # an fp64 layer: cast to fp32, a value could round up (2^-150 to 2^-149)
        return _scaled_sum_fp64(x, g, s).to(out_dtype)
    fold_into_g = d_out <= d_in  # the scale goes into the smaller operand
    scaled = (g if fold_into_g else x).float() * s  # (B, T, d) fp32
    if _rounded_into_subnormals(scaled):  # a clip factor times a tiny operand: redo the products in fp64
        return _scaled_sum_fp64(x, g, s).to(out_dtype)
    other = (x if fold_into_g else g).to(work).reshape(B * T, -1)  # (B*T, d')
    total = None
    for part in (split_bf16(scaled) if work == torch.bfloat16 else [scaled]):
        rows = part.reshape(B * T, -1)
        gs, xs = (rows, other) if fold_into_g else (other, rows)  # (B*T, d_out), (B*T, d_in)
        term = _mm_fp32(gs.T, xs)  # (d_out, d_in)
        total = term if total is None else total.add_(term)
    return total.to(out_dtype)


def _rounded_into_subnormals(scaled: torch.Tensor) -> bool:
    """Whether an fp32 scaled operand has nonzero subnormal entries: there a product with the clip factor keeps few
    bits (2^-149 * 0.51 rounds to 2^-149, doubling the term), and against an operand of 2^127 that doubled a clipped
    sample's weight (tests/privacy/test_clip_bound.py)."""
    tiny = torch.finfo(torch.float32).tiny
    return bool(((scaled.abs() < tiny) & (scaled != 0)).any())


def _scaled_sum_fp64(x: torch.Tensor, g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """sum_i s_i g_i^T x_i with fp64 products and sums (fp32's whole range stays normal there), (d_out, d_in)."""
    B, T, d_in = x.shape
    scaled = (g.double() * s.double()).reshape(B * T, -1)  # (B*T, d_out)
    return scaled.T @ x.double().reshape(B * T, d_in)


def split_bf16(v: torch.Tensor) -> list:
    """fp32 ``v`` as two bf16 operands hi + lo, 16 of its 24 bits: a scaled term rounded to one bf16 value would
    move by up to 2^-9 of itself, and a clipped sample could then weigh more than C; hi + lo leaves 2^-17. Not
    for fp16: its lo underflows below 2^-14 (an absolute 2^-25, not a relative 2^-17), so fp16 layers multiply
    fp32 copies instead (as on the CPU)."""
    hi = v.to(torch.bfloat16)
    return [hi, (v - hi.float()).to(torch.bfloat16)]


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32; bf16 operands (GPU) keep cuBLAS's fp32 accumulator unrounded (torch.mm's out_dtype, torch
    >= 2.8; older versions multiply fp32 copies)."""
    if a.dtype == torch.float32:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, NotImplementedError):  # no out_dtype argument, or no such kernel for this device
        return a.float() @ b.float()


# ----------------------------------------------------------------------------------------------- Triton kernel
if HAS_TRITON:
    _CONFIGS = autotune_configs(SUM_BLOCKS, SUM_TABLE)

    # CLIP and SPLIT in the key: each variant is tuned apart
    @triton.autotune(configs=_CONFIGS, key=["N_KEY", "D_IN", "D_OUT", "CLIP", "SPLIT"])
    @triton.jit
    def _scaled_linear_grad_kernel(
        x_ptr, g_ptr, scale_ptr, out_ptr,
        max_norm, eps,
        N, T, D_IN, D_OUT,
        stride_xr, stride_xd, stride_gr, stride_gd, stride_oo, stride_oi,
        N_KEY,  # ``tuning_bucket(N)``, read by the autotuner only
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, CLIP: tl.constexpr,
        SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        """One program: tile (BLOCK_O, BLOCK_I) of sum_r s[r // T] g[r, o] x[r, i] over the N = B*T rows, written
        in out's dtype (fp32 accumulation).

        CLIP=False: s = scale_ptr[b]. CLIP=True: scale_ptr holds squared norms and s = min(1, C / (norm + eps)),
        the clip factor computed in registers (the formula of ``clip.clip_factors``), never stored.
        """
        offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for k0 in range(0, N, BLOCK_K):
            r = k0 + offs_k
            row_ok = r < N
            s = tl.load(scale_ptr + r // T, mask=row_ok, other=0.0)  # (BLOCK_K,) per-row sample scale
            if CLIP:
                s = tl.minimum(max_norm / (tl.sqrt(s) + eps), 1.0)
            g_tile = tl.load(g_ptr + r[None, :].to(tl.int64) * stride_gr + offs_o[:, None] * stride_gd,
                             mask=row_ok[None, :] & (offs_o[:, None] < D_OUT), other=0.0)  # (BLOCK_O, BLOCK_K)
            x_tile = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_xr + offs_i[None, :] * stride_xd,
                             mask=row_ok[:, None] & (offs_i[None, :] < D_IN), other=0.0)  # (BLOCK_K, BLOCK_I)
            g_tile = g_tile.to(tl.float32) * s[None, :]
            if SPLIT:  # bf16 operands: s * g as hi + lo, as ``split_bf16`` does
                hi = g_tile.to(x_tile.dtype)
                acc = dot_acc(hi, x_tile, acc, DOT_FP32)
                acc = dot_acc((g_tile - hi.to(tl.float32)).to(x_tile.dtype), x_tile, acc, DOT_FP32)
            else:  # fp32 and fp16 operands: IEEE fp32 products
                acc = dot_acc(g_tile, x_tile.to(tl.float32), acc, DOT_FP32)
        tl.store(out_ptr + offs_o[:, None] * stride_oo + offs_i[None, :] * stride_oi,
                 acc.to(out_ptr.dtype.element_ty), mask=(offs_o[:, None] < D_OUT) & (offs_i[None, :] < D_IN))


def scaled_linear_grad_triton(
    x: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, clip_norm: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Launch the scaled-sum kernel on (B, T, d_in), (B, T, d_out) and a (B,) fp32 vector; (d_out, d_in).

    clip_norm None: the vector is the scale. clip_norm C: the vector holds squared per-sample norms and each
    sample is scaled by its clip factor min(1, C / (norm + CLIP_EPS)), computed inside the kernel.
    """
    B, T, d_in = x.shape
    d_out = g.shape[2]
    x2, g2 = rows_2d(x), rows_2d(g)  # (B*T, d_in), (B*T, d_out)
    out = torch.empty(d_out, d_in, dtype=out_dtype or x.dtype, device=x.device)
    clip = clip_norm is not None
    max_norm, eps = (float(clip_norm), CLIP_EPS) if clip else (1.0, 0.0)

    def grid(meta):
        return (triton.cdiv(d_out, meta["BLOCK_O"]), triton.cdiv(d_in, meta["BLOCK_I"]))

    _scaled_linear_grad_kernel[grid](
        x2, g2, scale.contiguous(), out, max_norm, eps, B * T, T, d_in, d_out, *x2.stride(), *g2.stride(),
        *out.stride(), tuning_bucket(B * T), CLIP=clip, SPLIT=x.dtype == torch.bfloat16, DOT_FP32=DOT_FP32,
    )
    return out


# ----------------------------------------------------------------------------------------------- public op
def scaled_linear_grad(x: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, *, backend: str = "auto",
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum_i scale_i g_i^T x_i, (d_out, d_in) in ``out_dtype`` (default: x's dtype), fp32 accumulation.

    x: (B, T, d_in) or (B, d_in); g: (B, T, d_out) or (B, d_out); scale: (B,).
    """
    x3, g3 = check_linear_inputs(x, g)  # (B, T, d_in), (B, T, d_out)
    scale = check_per_sample(scale, x3.shape[0], "scale").to(x.device)  # (B,)
    if g3.dtype != x3.dtype:
        g3 = g3.to(x3.dtype)
    if use_triton(backend, x3, g3):
        return scaled_linear_grad_triton(x3, g3, scale, out_dtype=out_dtype)
    return scaled_linear_grad_torch(x3, g3, scale, out_dtype)
