"""Independent einsum / dense oracles for the kernel ops (obviously correct, not fast)."""

from __future__ import annotations

import torch


def per_sample_linear_grads(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B, d_out, d_in) per-sample gradients g_i^T x_i in float64."""
    if x.dim() == 2:
        x, g = x[:, None], g[:, None]
    return torch.einsum("bto,bti->boi", g.double(), x.double())


def linear_norms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return per_sample_linear_grads(x, g).flatten(1).norm(dim=1)


def clip_sq_norms(x: torch.Tensor, g: torch.Tensor, rho: float) -> torch.Tensor:
    """What a fused clip clips against, float64: ||g_i^T x_i||^2, and for T > 1 the bound
    (sqrt(||g_i^T x_i||^2 + rho U^2) + 2^-23 T U)^2, U = sum_t |x_t| |g_t|."""
    sq = linear_norms(x, g) ** 2
    if x.dim() == 3 and x.shape[1] > 1:
        u = (x.double().norm(dim=-1) * g.double().norm(dim=-1)).sum(1)
        sq = ((sq + rho * u**2).sqrt() + 2.0**-23 * x.shape[1] * u) ** 2
    return sq


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
