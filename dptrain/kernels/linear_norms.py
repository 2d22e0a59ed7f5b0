"""Per-sample gradient norms of a linear layer: ||G_i||_F with G_i = g_i^T x_i.

x: (B, T, d_in) layer inputs, g: (B, T, d_out) output gradients ((B, d) means T = 1). Two exact strategies:

- ghost (Gram): ||G_i||^2 = <x_i x_i^T, g_i g_i^T>, cost ~ 2 T^2 (d_in + d_out) per sample, (T, T) temporaries.
  Its feature sums of d terms can round a crafted sample's norm far below its gradient's (docs/architecture.md,
  "Precision of the private sums"): the CPU sums them in fp32 blocks with a known error bound, which the clip
  bound adds (``ghost_rounding_allowance``), accelerators in fp64;
- instantiate: build G_i = g_i^T x_i, cost T d_in d_out per sample, (d_out, d_in) temporaries.

``strategy="auto"`` picks the cheaper (``choose_linear_strategy``: the ghost's Gram work weighed by ``gram_cost``).
The Triton kernels do both tiled in on-chip memory, never writing (B, T, T) or (B, d_out, d_in) to global memory.
"""

from __future__ import annotations

import torch

from ._common import (
    DOT_FP32,
    GRAM_BLOCKS,
    GRAM_DTYPE,
    HAS_TRITON,
    INSTANTIATE_BLOCKS,
    INSTANTIATE_TABLE,
    LINEAR_GRAM_TABLE,
    autotune_configs,
    batch_chunks,
    check_linear_inputs,
    check_strategy,
    dot_acc,
    gram_cost,
    gram_fp32_blocked,
    gram_fp64,
    gram_rounding,
    gram_partials,
    gram_tile,
    min_block,
    row_sq_norms,
    tl,
    triton,
    tuning_bucket,
    upper_tile,
    use_triton,
)

from .clip import row_norm_bounds

__all__ = ["per_sample_linear_grad_norms", "per_sample_linear_grad_sq_norms", "choose_linear_strategy",
           "ghost_rounding_allowance", "bound_terms"]


def choose_linear_strategy(seq_len: int, d_in: int, d_out: int, device_type: str = "cpu") -> str:
    """'ghost' when its Gram work, ``gram_cost(device_type)`` T^2 (d_in + d_out) multiply-adds, is below
    instantiating's T d_in d_out; else 'instantiate'."""
    return "ghost" if gram_cost(device_type) * seq_len * (d_in + d_out) < d_in * d_out else "instantiate"


def _fp32_grams(x: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the torch ghost norm of these factors sums its Grams in fp32 blocks (the CPU, working dtypes)."""
    return x.device.type == "cpu" and x.dtype != torch.float64 and g.dtype != torch.float64


def ghost_rounding_allowance(x3: torch.Tensor, g3: torch.Tensor, x_rows: torch.Tensor, g_rows: torch.Tensor,
                             strategy: str) -> torch.Tensor | None:
    """How far below ||g_i^T x_i||^2 the norm computed with ``strategy`` (resolved) may fall beyond what
    ``clip.CANCELLATION_RHO`` covers, (B,) fp64, from upper bounds of the row norms (B, T); None when nothing.

    With Gram entries within e |v_t| |v_s| + delta of exact (``gram_rounding``) on each side and
    |(x x^T)[t,s]| <= |x_t| |x_s|: (e_x + e_g + e_x e_g) U^2 + delta_x (1 + e_g) S_g^2 + delta_g (1 + e_x) S_x^2
    + delta_x delta_g T^2, U = sum_t |x_t| |g_t|, S = sum_t of the row norms."""
    if strategy != "ghost" or x3.shape[1] == 1 or not _fp32_grams(x3, g3):
        return None
    e_x, delta_x = gram_rounding(x3.shape[2])
    e_g, delta_g = gram_rounding(g3.shape[2])
    u, s_x, s_g = (x_rows * g_rows).sum(1), x_rows.sum(1), g_rows.sum(1)  # (B,) each
    return ((e_x + e_g + e_x * e_g) * u.square() + delta_x * (1 + e_g) * s_g.square()
            + delta_g * (1 + e_x) * s_x.square() + delta_x * delta_g * x3.shape[1] ** 2)


def bound_terms(x3: torch.Tensor, g3: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``clip.clip_bounds_sq`` needs of a linear use besides its norm: the triangle bounds U, (B,) fp64, and
    ``ghost_rounding_allowance`` for the norm ``strategy`` (resolved) computes, from the same row norms."""
    x_rows, g_rows = row_norm_bounds(x3), row_norm_bounds(g3)  # (B, T) each
    return (x_rows * g_rows).sum(1), ghost_rounding_allowance(x3, g3, x_rows, g_rows, strategy)


# ----------------------------------------------------------------------------------------------- torch reference
def _sq_norms_ghost_torch(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum_{t,s} (x x^T)[t,s] (g g^T)[t,s] per sample, batch-chunked; Grams in fp32 blocks on the CPU (fp64 where
    a value is too large for them), fp64 elsewhere; their products summed in fp64, returned fp32."""
    B, T, d_in = x.shape
    d_out = g.shape[2]
    if T == 1:  # rank one: ||g_i x_i^T|| = ||g_i|| ||x_i||
        return (x[:, 0].to(GRAM_DTYPE).square().sum(1) * g[:, 0].to(GRAM_DTYPE).square().sum(1)).float()  # (B,)
    out = torch.empty(B, dtype=torch.float32, device=x.device)
    fp32 = _fp32_grams(x, g)
    for sl in batch_chunks(B, 16 * T * T):
        gx = gram_fp32_blocked(x[sl].float()) if fp32 else None  # (b, T, T)
        gg = gram_fp32_blocked(g[sl].float()) if gx is not None else None
        if gg is None:
            gx, gg = gram_fp64(x[sl]), gram_fp64(g[sl])
        out[sl] = gx.to(GRAM_DTYPE).mul_(gg.to(GRAM_DTYPE)).sum((1, 2))  # (b, T, T) products, summed in fp64
    return out


def _sq_norms_instantiate_torch(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||g_i^T x_i||^2 per sample from the instantiated per-sample gradients, batch-chunked bmm, fp32."""
    B, T, d_in = x.shape
    d_out = g.shape[2]
    out = torch.empty(B, dtype=torch.float32, device=x.device)
    work = torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32  # as the weighted sum multiplies
    per_sample = 4 * d_in * d_out + (4 * T * (d_in + d_out) if x.dtype != torch.float32 else 0)
    for sl in batch_chunks(B, per_sample):
        grads = torch.bmm(g[sl].to(work).transpose(1, 2), x[sl].to(work))  # (b, d_out, d_in)
        out[sl] = row_sq_norms(grads.flatten(1))
    return out


def linear_grad_sq_norms_torch(x: torch.Tensor, g: torch.Tensor, strategy: str) -> torch.Tensor:
    """Reference squared norms for (B, T, d_in), (B, T, d_out) inputs and a resolved strategy."""
    if strategy == "ghost":
        return _sq_norms_ghost_torch(x, g)
    return _sq_norms_instantiate_torch(x, g)


# ----------------------------------------------------------------------------------------------- Triton kernels
if HAS_TRITON:
    _INST_CONFIGS = autotune_configs(INSTANTIATE_BLOCKS, INSTANTIATE_TABLE)
    _GHOST_CONFIGS = autotune_configs(GRAM_BLOCKS, LINEAR_GRAM_TABLE)

    # partial sums: zeroed again after tuning, so no config leaves stale tiles behind
    @triton.autotune(configs=_INST_CONFIGS, key=["T_KEY", "D_IN", "D_OUT"], reset_to_zero=["out_ptr"])
    @triton.jit
    def _linear_norms_instantiate_kernel(
        x_ptr, g_ptr, out_ptr,  # out: (B, n_tiles) fp32 partial squared norms
        T, D_IN, D_OUT,
        stride_xb, stride_xt, stride_xd,
        stride_gb, stride_gt, stride_gd,
        n_tiles, T_KEY,  # T_KEY: ``tuning_bucket(T)``, read by the autotuner only
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        """One program: tile (BLOCK_O, BLOCK_I) of G_b = g_b^T x_b accumulated over T on chip, squared, summed."""
        b = tl.program_id(0)
        tile = tl.program_id(1)
        n_i = tl.cdiv(D_IN, BLOCK_I)
        offs_o = (tile // n_i) * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = (tile % n_i) * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_t = tl.arange(0, BLOCK_T)
        x_base = x_ptr + b.to(tl.int64) * stride_xb
        g_base = g_ptr + b.to(tl.int64) * stride_gb
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs_t
            g_tile = tl.load(  # (BLOCK_O, BLOCK_T) = g_b[t, o]^T
                g_base + t[None, :] * stride_gt + offs_o[:, None] * stride_gd,
                mask=(t[None, :] < T) & (offs_o[:, None] < D_OUT), other=0.0,
            )
            x_tile = tl.load(  # (BLOCK_T, BLOCK_I)
                x_base + t[:, None] * stride_xt + offs_i[None, :] * stride_xd,
                mask=(t[:, None] < T) & (offs_i[None, :] < D_IN), other=0.0,
            )
            acc = dot_acc(g_tile, x_tile, acc, DOT_FP32)
        tl.store(out_ptr + b * n_tiles + tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))

    # partial sums: zeroed again after tuning, so no config leaves stale tiles behind
    @triton.autotune(configs=_GHOST_CONFIGS, key=["T_KEY", "D_IN", "D_OUT"], reset_to_zero=["out_ptr"])
    @triton.jit
    def _linear_norms_ghost_kernel(
        x_ptr, g_ptr, out_ptr,  # out: (B, out_stride) fp32 partial squared norms
        T, D_IN, D_OUT,
        stride_xb, stride_xt, stride_xd,
        stride_gb, stride_gt, stride_gd,
        out_stride, T_KEY,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One program: Gram tiles (x x^T)[r, c] and (g g^T)[r, c] of sample b on chip, their inner product.

        Both Grams are symmetric: tiles below the diagonal skip their work, tiles above it count twice.
        """
        b = tl.program_id(0)
        p = tl.program_id(1)
        offs_r, offs_c, upper, weight = upper_tile(p, T, BLOCK_T)
        x_base = x_ptr + b.to(tl.int64) * stride_xb
        g_base = g_ptr + b.to(tl.int64) * stride_gb
        gram_x = gram_tile(x_base, offs_r, offs_c, T, D_IN, tl.where(upper, D_IN, 0), stride_xt, stride_xd,
                           BLOCK_T, BLOCK_K)  # fp64
        gram_g = gram_tile(g_base, offs_r, offs_c, T, D_OUT, tl.where(upper, D_OUT, 0), stride_gt, stride_gd,
                           BLOCK_T, BLOCK_K)
        tl.store(out_ptr + b * out_stride + p, weight * tl.sum(tl.sum(gram_x * gram_g, axis=1), axis=0))


def linear_grad_sq_norms_triton(x: torch.Tensor, g: torch.Tensor, strategy: str) -> torch.Tensor:
    """Launch the ghost or instantiate kernel on (B, T, d_in), (B, T, d_out); (B,) fp32 squared norms.

    Each program writes one partial sum (fp64 for ghost) into a zeroed (B, n_tiles_max) buffer (sized for the smallest
    autotuned tile, so any config fits) and the partials are summed: deterministic, no atomics.
    """
    B, T, d_in = x.shape
    d_out = g.shape[2]
    strides = (*x.stride(), *g.stride())
    if strategy == "ghost":
        partial, grid = gram_partials(B, T, _GHOST_CONFIGS, x.device)
        _linear_norms_ghost_kernel[grid](x, g, partial, T, d_in, d_out, *strides, partial.shape[1], tuning_bucket(T))
        return partial.sum(1).float()
    n_tiles = triton.cdiv(d_out, min_block(_INST_CONFIGS, "BLOCK_O")) * triton.cdiv(
        d_in, min_block(_INST_CONFIGS, "BLOCK_I")
    )
    partial = torch.zeros(B, n_tiles, dtype=torch.float32, device=x.device)

    def grid(meta):
        return (B, triton.cdiv(d_out, meta["BLOCK_O"]) * triton.cdiv(d_in, meta["BLOCK_I"]))

    _linear_norms_instantiate_kernel[grid](x, g, partial, T, d_in, d_out, *strides, n_tiles, tuning_bucket(T),
                                           DOT_FP32=DOT_FP32)
    return partial.sum(1)


# ----------------------------------------------------------------------------------------------- public op
def per_sample_linear_grad_sq_norms(
    x: torch.Tensor, g: torch.Tensor, *, strategy: str = "auto", backend: str = "auto"
) -> torch.Tensor:
    """Squared Frobenius norms ||g_i^T x_i||^2, (B,) fp32 (see ``per_sample_linear_grad_norms``)."""
    check_strategy(strategy)
    x3, g3 = check_linear_inputs(x, g)  # (B, T, d_in), (B, T, d_out)
    if strategy == "auto":
        strategy = choose_linear_strategy(x3.shape[1], x3.shape[2], g3.shape[2], x3.device.type)
    if x3.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=x.device)
    if use_triton(backend, x3, g3):
        return linear_grad_sq_norms_triton(x3, g3.to(x3.dtype), strategy)
    return linear_grad_sq_norms_torch(x3, g3, strategy)


def per_sample_linear_grad_norms(
    x: torch.Tensor, g: torch.Tensor, *, strategy: str = "auto", backend: str = "auto"
) -> torch.Tensor:
    """Per-sample gradient norms of a linear layer's weight, (B,) fp32.

    x: (B, T, d_in) or (B, d_in) inputs; g: (B, T, d_out) or (B, d_out) output gradients. ``strategy``:
    "ghost", "instantiate" or "auto" (cost rule); ``backend``: "auto" (Triton on CUDA), "torch", "triton".
    """
    return per_sample_linear_grad_sq_norms(x, g, strategy=strategy, backend=backend).sqrt()
