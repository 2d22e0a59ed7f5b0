"""Per-sample gradient norms of an embedding table, from token ids and output gradients (never (B, V, d)).

G_i = sum_t onehot(ids_t) g_t^T, so ||G_i||^2 = sum_{t,s} [ids_t == ids_s] <g_t, g_s>. Two exact strategies:

- ghost: the masked Gram form above, cost T^2 d per sample, accumulated in fp64 as a linear layer's (the Triton
  kernel tiles it on chip);
- instantiate: sum the gradients of equal tokens (a segment sum over unique (sample, id) pairs) and take the
  squared norms of the sums, cost T d per sample plus a sort; only the rows actually used are built.

Tokens equal to ``padding_idx`` contribute nothing: torch's embedding gives that row no gradient.
"""

from __future__ import annotations

import torch

from ._common import (
    EMBEDDING_GRAM_TABLE,
    GRAM_BLOCKS,
    HAS_TRITON,
    as_3d,
    autotune_configs,
    batch_chunks,
    check_strategy,
    gram_fp64,
    gram_partials,
    gram_tile,
    tl,
    triton,
    tuning_bucket,
    upper_tile,
    use_triton,
)

__all__ = ["per_sample_embedding_grad_norms", "per_sample_embedding_grad_sq_norms"]


def _check_embedding_inputs(ids: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor, found dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[:, None]
    ids = ids.reshape(ids.shape[0], -1)  # (B, T)
    g3 = as_3d(g, "g") if g.dim() != 2 or ids.shape[1] != 1 else g[:, None, :]  # (B, T, d)
    if g3.shape[:2] != ids.shape:
        raise ValueError(
            f"ids (B, T) and g (B, T, d) must agree in (B, T), found ids {tuple(ids.shape)} and g {tuple(g.shape)}"
        )
    if ids.device != g.device:
        raise ValueError(f"ids and g must be on one device, found {ids.device} and {g.device}")
    return ids, g3


# ----------------------------------------------------------------------------------------------- torch reference
def _sq_norms_ghost_torch(ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    B, T, d = g.shape
    out = torch.empty(B, dtype=torch.float32, device=g.device)
    for sl in batch_chunks(B, 8 * T * T):
        gram = gram_fp64(g[sl])  # (b, T, T)
        gram.mul_(ids[sl, :, None] == ids[sl, None, :])
        out[sl] = gram.sum((1, 2))
    return out


def _sq_norms_segment_torch(ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    B, T, d = g.shape
    if T == 1:
        return g[:, 0].float().square().sum(1)
    span = int(ids.max()) + 1 if ids.numel() else 1
    sample = torch.arange(B, device=ids.device)[:, None]  # (B, 1)
    keys = (sample * span + ids).flatten()  # (B*T,) one key per (sample, id)
    uniq, inverse = torch.unique(keys, return_inverse=True)
    sums = torch.zeros(uniq.numel(), d, dtype=torch.float32, device=g.device)
    sums.index_add_(0, inverse, g.reshape(B * T, d).float())  # (n_unique, d) per-(sample, id) gradient rows
    out = torch.zeros(B, dtype=torch.float32, device=g.device)
    return out.index_add_(0, uniq // span, sums.square().sum(1))


def embedding_grad_sq_norms_torch(ids: torch.Tensor, g: torch.Tensor, strategy: str) -> torch.Tensor:
    if strategy == "ghost":
        return _sq_norms_ghost_torch(ids, g)
    return _sq_norms_segment_torch(ids, g)


# ----------------------------------------------------------------------------------------------- Triton kernel
if HAS_TRITON:
    _CONFIGS = autotune_configs(GRAM_BLOCKS, EMBEDDING_GRAM_TABLE)

    # partial sums: zeroed again after tuning, so no config leaves stale tiles behind
    @triton.autotune(configs=_CONFIGS, key=["T_KEY", "D"], reset_to_zero=["out_ptr"])
    @triton.jit
    def _embedding_norms_kernel(
        ids_ptr, g_ptr, out_ptr,
        T, D, pad,
        stride_ib, stride_it, stride_gb, stride_gt, stride_gd,
        out_stride, T_KEY,  # T_KEY: ``tuning_bucket(T)``, read by the autotuner only
        HAS_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One program: Gram tile (g g^T)[r, c] of sample b masked by token equality, summed (upper tiles only)."""
        b = tl.program_id(0)
        p = tl.program_id(1)
        offs_r, offs_c, upper, weight = upper_tile(p, T, BLOCK_T)
        id_base = ids_ptr + b.to(tl.int64) * stride_ib
        id_r = tl.load(id_base + offs_r * stride_it, mask=offs_r < T, other=-1)
        id_c = tl.load(id_base + offs_c * stride_it, mask=offs_c < T, other=-2)
        same = id_r[:, None] == id_c[None, :]  # (BLOCK_T, BLOCK_T); padded rows never match
        if HAS_PAD:
            same = same & (id_r[:, None] != pad)
        gram = gram_tile(g_ptr + b.to(tl.int64) * stride_gb, offs_r, offs_c, T, D, tl.where(upper, D, 0),
                         stride_gt, stride_gd, BLOCK_T, BLOCK_K)
        total = tl.sum(tl.sum(tl.where(same, gram, 0.0), axis=1), axis=0)  # fp64
        tl.store(out_ptr + b * out_stride + p, weight * total)


def embedding_grad_sq_norms_triton(ids: torch.Tensor, g: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    B, T, d = g.shape
    partial, grid = gram_partials(B, T, _CONFIGS, g.device)
    _embedding_norms_kernel[grid](
        ids, g, partial, T, d, -1 if padding_idx is None else int(padding_idx),
        *ids.stride(), *g.stride(), partial.shape[1], tuning_bucket(T), HAS_PAD=padding_idx is not None,
    )
    return partial.sum(1).float()


# ----------------------------------------------------------------------------------------------- public op
def per_sample_embedding_grad_sq_norms(
    ids: torch.Tensor,
    g: torch.Tensor,
    *,
    padding_idx: int | None = None,
    strategy: str = "auto",
    backend: str = "auto",
) -> torch.Tensor:
    """Squared per-sample gradient norms of an embedding table, (B,) fp32 (see ``per_sample_embedding_grad_norms``)."""
    check_strategy(strategy)
    ids, g3 = _check_embedding_inputs(ids, g)  # (B, T), (B, T, d)
    if ids.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=g.device)
    if use_triton(backend, g3):  # the kernel is the tiled ghost form; strategy only steers the reference
        return embedding_grad_sq_norms_triton(ids, g3, padding_idx)
    if padding_idx is not None:
        g3 = g3 * (ids != padding_idx)[:, :, None]  # padding tokens give no gradient
    if strategy == "auto":
        strategy = "instantiate"
    return embedding_grad_sq_norms_torch(ids, g3, strategy)


def per_sample_embedding_grad_norms(
    ids: torch.Tensor,
    g: torch.Tensor,
    *,
    padding_idx: int | None = None,
    strategy: str = "auto",
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sample gradient norms of an embedding table, (B,) fp32.

    ids: (B, T) integer token ids; g: (B, T, d) gradients of the looked-up rows. ``strategy``: "ghost" (masked
    Gram), "instantiate" (segment sums of equal tokens) or "auto" (instantiate: cost T d instead of T^2 d).
    """
    return per_sample_embedding_grad_sq_norms(
        ids, g, padding_idx=padding_idx, strategy=strategy, backend=backend
    ).sqrt()
