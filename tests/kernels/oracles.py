"""Independent einsum / dense oracles for the kernel ops (obviously correct, not fast)."""

from __future__ import annotations

import math

import torch


def per_sample_linear_grads(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B, d_out, d_in) per-sample gradients g_i^T x_i in float64."""
    if x.dim() == 2:
        x, g = x[:, None], g[:, None]
    return torch.einsum("bto,bti->boi", g.double(), x.double())


def linear_norms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return per_sample_linear_grads(x, g).flatten(1).norm(dim=1)


def clip_sq_norms(x: torch.Tensor, g: torch.Tensor, rho: float, fp32_grams: bool = False) -> torch.Tensor:
    """What a fused clip clips against, float64: ||g_i^T x_i||^2, and for T > 1 the bound
    (sqrt(||g_i^T x_i||^2 + rho U^2 + A) + 2^-23 T U)^2, U = sum_t |x_t| |g_t|, A = 0 or (``fp32_grams``) what Grams
    summed in fp32 blocks of 128 features may lose: entries within e |v_t| |v_s| + 2 d 2^-126 of exact,
    e = D u / (1 - D u), D = 128 + ceil(d / 128) + 1."""
    sq = linear_norms(x, g) ** 2
    if x.dim() == 3 and x.shape[1] > 1:
        rx, rg = x.double().norm(dim=-1), g.double().norm(dim=-1)  # (B, T)
        u = (rx * rg).sum(1)
        if fp32_grams:
            (e_x, a_x), (e_g, a_g) = (_blocked_gram_error(t.shape[-1]) for t in (x, g))
            sq = (sq + (e_x + e_g + e_x * e_g) * u**2 + a_x * (1 + e_g) * rg.sum(1) ** 2
                  + a_g * (1 + e_x) * rx.sum(1) ** 2 + a_x * a_g * x.shape[1] ** 2)
        sq = ((sq + rho * u**2).sqrt() + 2.0**-23 * x.shape[1] * u) ** 2
    return sq


def _blocked_gram_error(d: int):
    depth = 128 + math.ceil(d / 128) + 1
    return depth * 2.0**-24 / (1 - depth * 2.0**-24), 2 * d * 2.0**-126


def scaled_sum(x: torch.Tensor, g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.einsum("b,boi->oi", scale.double(), per_sample_linear_grads(x, g))


def embedding_grads(ids: torch.Tensor, g: torch.Tensor, vocab: int, padding_idx=None) -> torch.Tensor:
    """(B, V, d) dense per-sample embedding gradients via one-hot, padding rows zeroed, float64."""
    onehot = torch.nn.functional.one_hot(ids, vocab).double()  # (B, T, V)
    grads = torch.einsum("btv,btd->bvd", onehot, g.double())
    if padding_idx is not None:
        grads[:, padding_idx] = 0
    return grads


def embedding_norms_by_autograd(ids: torch.Tensor, g: torch.Tensor, vocab: int, padding_idx=None) -> torch.Tensor:
    """Norms of the gradient torch's own nn.functional.embedding gives each sample (batch-size-1 loop)."""
    out = []
    for i in range(ids.shape[0]):
        w = torch.zeros(vocab, g.shape[-1], dtype=torch.float64, requires_grad=True)
        y = torch.nn.functional.embedding(ids[i], w, padding_idx=padding_idx)
        (y * g[i].double()).sum().backward()
        out.append(w.grad.norm())
    return torch.stack(out)
