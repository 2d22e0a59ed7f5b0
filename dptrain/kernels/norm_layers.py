"""Per-sample gradients of LayerNorm / RMSNorm weights and biases, and their norms.

With x_hat the normalised input (before the affine weight), the per-sample gradients are
grad(weight)_i = sum_t g_t * x_hat_t and grad(bias)_i = sum_t g_t, both (B, d): small, so they are built.
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, INTERPRETED, as_3d, tl, triton, use_triton

__all__ = [
    "per_sample_norm_layer_grads",
    "per_sample_norm_layer_bias_grads",
    "per_sample_norm_layer_grad_norms",
]


def _check(x_hat: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x_hat.shape != g.shape:
        raise ValueError(f"x_hat and g must have the same shape, found x_hat {tuple(x_hat.shape)} and g {tuple(g.shape)}")
    if x_hat.device != g.device:
        raise ValueError(f"x_hat and g must be on one device, found {x_hat.device} and {g.device}")
    return as_3d(x_hat, "x_hat"), as_3d(g, "g")


# ----------------------------------------------------------------------------------------------- Triton kernel
if HAS_TRITON:
    if INTERPRETED:
        _CONFIGS = [triton.Config({"BLOCK_D": 16, "BLOCK_T": 16})]
    else:
        _CONFIGS = [
            triton.Config({"BLOCK_D": bd, "BLOCK_T": bt}, num_warps=w)
            for bd, bt, w in [(128, 32, 4), (256, 16, 4), (64, 64, 4), (512, 8, 8)]
        ]

    @triton.autotune(configs=_CONFIGS, key=["T", "D"])
    @triton.jit
    def _norm_layer_grads_kernel(
        x_ptr, g_ptr, w_ptr, b_ptr,  # outputs w, b: (B, D) fp32
        T, D,
        stride_xb, stride_xt, stride_xd, stride_gb, stride_gt, stride_gd,
        WITH_WEIGHT: tl.constexpr, WITH_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """One program: features [d0, d0 + BLOCK_D) of sample b, reduced over T in fp32."""
        b = tl.program_id(0)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_t = tl.arange(0, BLOCK_T)
        acc_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs_t
            mask = (t[:, None] < T) & (offs_d[None, :] < D)
            gv = tl.load(g_ptr + b.to(tl.int64) * stride_gb + t[:, None] * stride_gt + offs_d[None, :] * stride_gd,
                         mask=mask, other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_D)
            if WITH_WEIGHT:
                xv = tl.load(x_ptr + b.to(tl.int64) * stride_xb + t[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                             mask=mask, other=0.0).to(tl.float32)
                acc_w += tl.sum(gv * xv, axis=0)
            if WITH_BIAS:
                acc_b += tl.sum(gv, axis=0)
        if WITH_WEIGHT:
            tl.store(w_ptr + b * D + offs_d, acc_w, mask=offs_d < D)
        if WITH_BIAS:
            tl.store(b_ptr + b * D + offs_d, acc_b, mask=offs_d < D)


def _norm_layer_grads_triton(x: torch.Tensor | None, g: torch.Tensor, weight: bool, bias: bool):
    B, T, d = g.shape
    w_out = torch.empty(B, d, dtype=torch.float32, device=g.device) if weight else None
    b_out = torch.empty(B, d, dtype=torch.float32, device=g.device) if bias else None
    xs = x if x is not None else g

    def grid(meta):
        return (B, triton.cdiv(d, meta["BLOCK_D"]))

    _norm_layer_grads_kernel[grid](
        xs, g, w_out if weight else g, b_out if bias else g, T, d, *xs.stride(), *g.stride(),
        WITH_WEIGHT=weight, WITH_BIAS=bias,
    )
    return w_out, b_out


# ----------------------------------------------------------------------------------------------- public ops
def per_sample_norm_layer_grads(x_hat: torch.Tensor, g: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Per-sample weight gradients of a norm layer, sum_t g_t * x_hat_t, (B, d) fp32.

    x_hat: (B, T, d) or (B, d) normalised input; g: same shape, gradient of the layer's output.
    """
    x3, g3 = _check(x_hat, g)  # (B, T, d)
    if x3.shape[0] > 0 and use_triton(backend, x3, g3):
        return _norm_layer_grads_triton(x3, g3, True, False)[0]
    return (g3.float() * x3.float()).sum(1)  # (B, d)


def per_sample_norm_layer_bias_grads(g: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Per-sample bias gradients of a norm layer, sum_t g_t, (B, d) fp32."""
    g3 = as_3d(g, "g")  # (B, T, d)
    if g3.shape[0] > 0 and use_triton(backend, g3):
        return _norm_layer_grads_triton(None, g3, False, True)[1]
    return g3.float().sum(1)  # (B, d)


def per_sample_norm_layer_grad_norms(
    x_hat: torch.Tensor, g: torch.Tensor, *, include_bias: bool = False, backend: str = "auto"
) -> torch.Tensor:
    """Per-sample gradient norms of a norm layer's weight (and bias, jointly, if ``include_bias``), (B,) fp32."""
    x3, g3 = _check(x_hat, g)  # (B, T, d)
    if x3.shape[0] > 0 and use_triton(backend, x3, g3):
        w, b = _norm_layer_grads_triton(x3, g3, True, include_bias)
    else:
        w = (g3.float() * x3.float()).sum(1)  # (B, d)
        b = g3.float().sum(1) if include_bias else None
    sq = w.square().sum(1)
    if b is not None:
        sq = sq + b.square().sum(1)
    return sq.sqrt()
