"""What one use of a parameter contributes to each sample's gradient, and the algebra on it.

A parameter may be used several times in one forward pass (tied embedding and LM head, a module called
twice). Its per-sample gradient is the SUM over its uses, so its norm needs the cross terms between uses.
Each use is kept in one of two forms:

- ``Factored``: G_i = left_i^T right_i (a linear-like layer: Linear, HF Conv1D, Conv via unfold, Embedding).
  ``left`` is dense (B, T, rows) or an index tensor (B, T) of one-hot rows (Embedding); ``right`` is
  (B, T, cols). Norms use the ghost (Gram) form or instantiation, whichever is cheaper (``dptrain.kernels``).
- ``Instantiated``: the per-sample gradient itself, (B, *param.shape) (norm layers, biases, the fallback).

Cross terms: <L1^T R1, L2^T R2> = sum_{t,s} (L1 L2^T)[t, s] (R1 R2^T)[t, s] per sample.

Densifying: a parameter's uses can instead be summed into one ``Instantiated`` per-sample gradient
(``densify``). Building it costs the same GEMM FLOPs as the weight gradient itself (a batched product instead
of one product), after which the norm and the clipped sum are cheap elementwise passes, so for long sequences
it beats "ghost norm + scaled GEMM" by the whole norm computation. It needs (B, *shape) memory, so callers
densify only within a byte budget (``densify_gain`` says whether it pays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from dptrain import kernels
from dptrain.kernels._common import GRAM_DTYPE

__all__ = [
    "Factored", "Instantiated", "Contribution", "per_sample_sq_norms", "clip_sq_norms", "weighted_sum",
    "batch_size_of", "device_of",
    "densify",
    "select_samples",
    "densify_gain",
    "dense_pass_cost",
]


@dataclass
class Factored:
    """Per-sample gradient G_i = left_i^T right_i, viewed as ``shape``."""

    left: torch.Tensor  # (B, T, rows) dense, or (B, T) long ids of one-hot rows
    right: torch.Tensor  # (B, T, cols)
    rows: int
    shape: torch.Size

    @property
    def is_index(self) -> bool:
        return not self.left.is_floating_point()

    @property
    def kernel_args(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x, g) as ``dptrain.kernels`` names a linear layer's factors (G_i = g_i^T x_i): (right, left)."""
        return self.right, self.left

    def matrix_view(self, grad: torch.Tensor) -> torch.Tensor:
        """View per-sample gradients (B, *shape) as (B, rows, cols)."""
        return grad.reshape(grad.shape[0], self.rows, -1)


@dataclass
class Instantiated:
    """The per-sample gradient itself."""

    grad: torch.Tensor  # (B, *shape)


Contribution = Union[Factored, Instantiated]


def batch_size_of(c: Contribution) -> int:
    return (c.left if isinstance(c, Factored) else c.grad).shape[0]


def device_of(c: Contribution) -> torch.device:
    return (c.right if isinstance(c, Factored) else c.grad).device


def select_samples(c: Contribution, sl: slice) -> Contribution:
    """The contribution of the samples ``sl`` only."""
    if sl == slice(0, batch_size_of(c)):
        return c
    if isinstance(c, Instantiated):
        return Instantiated(c.grad[sl])
    return Factored(c.left[sl], c.right[sl], c.rows, c.shape)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """``t.float()`` without the dispatch when it is fp32 already (the usual case, on the per-layer hot path)."""
    return t if t.dtype == torch.float32 else t.float()


def _self_sq_norm(c: Contribution) -> torch.Tensor:
    if isinstance(c, Instantiated):
        return kernels.row_sq_norms(c.grad.flatten(1))  # (B,) one pass
    if c.is_index:
        return kernels.per_sample_embedding_grad_sq_norms(c.left, c.right)
    return kernels.per_sample_linear_grad_sq_norms(*c.kernel_args)


def _left_gram(a: Factored, b: Factored) -> torch.Tensor:
    """(L_a L_b^T) per sample, (B, T_a, T_b) fp64, for dense or one-hot left factors."""
    if a.is_index and b.is_index:
        return (a.left[:, :, None] == b.left[:, None, :]).to(GRAM_DTYPE)
    if a.is_index:  # entry [t, s] = L_b[s, ids_a[t]]: picked values, exact in any dtype
        idx = a.left[:, :, None].expand(-1, -1, b.left.shape[1])  # (B, T_a, T_b)
        return torch.gather(b.left.transpose(1, 2), 1, idx).to(GRAM_DTYPE)
    if b.is_index:
        return _left_gram(b, a).transpose(1, 2)
    return torch.bmm(a.left.to(GRAM_DTYPE), b.left.to(GRAM_DTYPE).transpose(1, 2))


def _inner(a: Contribution, b: Contribution) -> torch.Tensor:
    """Per-sample inner product <G_a,i, G_b,i>, (B,), summed in fp64 (``GRAM_DTYPE``: its terms can cancel)."""
    if isinstance(a, Instantiated) and isinstance(b, Instantiated):
        return (a.grad.to(GRAM_DTYPE) * b.grad.to(GRAM_DTYPE)).flatten(1).sum(1).float()
    if isinstance(a, Instantiated):
        a, b = b, a
    if isinstance(b, Instantiated):  # <L^T R, G> = sum_t <L_t^T G, R_t>
        grad = a.matrix_view(b.grad)  # (B, rows, cols)
        if a.is_index:  # picked rows, exact in any dtype
            rows_used = torch.gather(grad, 1, a.left[:, :, None].expand(-1, -1, grad.shape[2])).to(GRAM_DTYPE)
        else:
            rows_used = torch.bmm(a.left.to(GRAM_DTYPE), grad.to(GRAM_DTYPE))  # (B, T, cols)
        return (rows_used * a.right.to(GRAM_DTYPE)).sum((1, 2)).float()
    right_gram = torch.bmm(a.right.to(GRAM_DTYPE), b.right.to(GRAM_DTYPE).transpose(1, 2))  # (B, T_a, T_b)
    return (_left_gram(a, b) * right_gram).sum((1, 2)).float()


def per_sample_sq_norms(uses: Sequence[Contribution]) -> torch.Tensor:
    """Squared norms of the per-sample gradient summed over all ``uses`` of one parameter, (B,) fp32."""
    total = _self_sq_norm(uses[0])
    for i in range(1, len(uses)):
        total = total + _self_sq_norm(uses[i])
        for j in range(i):
            total = total + 2.0 * _inner(uses[i], uses[j])
    return total


def _triangle_bound(c: Contribution) -> Tuple[torch.Tensor, int, Optional[torch.Tensor]]:
    """(B,) upper bounds of one use's per-sample gradient norms that no cancellation can understate, the tokens
    its fp32 sums run over (1 for a dense gradient: its sum adds each entry once), and what fp32 Grams of its norm
    may lose (``kernels.ghost_rounding_allowance``; None if nothing)."""
    if isinstance(c, Instantiated):
        return kernels.row_sq_norms(c.grad.flatten(1)).sqrt(), 1, None
    if c.is_index:
        return kernels.triangle_bounds(None, c.right), c.right.shape[1], None
    (x, g), tokens = c.kernel_args, c.right.shape[1]
    strategy = kernels.choose_linear_strategy(tokens, x.shape[2], g.shape[2], x.device.type)
    bound, allowance = kernels.bound_terms(x, g, strategy)  # (B,) each
    return bound, tokens, allowance


def clip_sq_norms(uses: Sequence[Contribution]) -> torch.Tensor:
    """Squared norms to clip ``uses`` against, (B,) fp32: ``per_sample_sq_norms`` raised to ``kernels.clip_bounds_sq``
    wherever rounding can understate them: several uses, or a factored one over T > 1 tokens."""
    sq = per_sample_sq_norms(uses)
    if len(uses) == 1 and (isinstance(uses[0], Instantiated) or uses[0].right.shape[1] == 1):
        return sq  # one dense gradient or one rank-one product: its norm is a sum of squares, its sum one product
    triangle = token_weighted = 0.0
    allowance = None
    for c in uses:
        bound, tokens, lost = _triangle_bound(c)
        triangle, token_weighted = triangle + bound, token_weighted + tokens * bound
        if lost is not None:
            allowance = lost if allowance is None else allowance + lost
    return kernels.clip_bounds_sq(sq, triangle, token_weighted, allowance)


def weighted_sum(uses: Sequence[Contribution], scale: torch.Tensor, shape: torch.Size,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_i scale_i G_i over samples and uses, shaped ``shape`` (fp32); added into ``out`` in place if given
    (one pass per use, no temporary of the parameter's size for dense or index uses)."""
    for c in uses:
        if isinstance(c, Instantiated):
            grad = _fp32(c.grad.reshape(len(scale), shape.numel())).T  # (numel, B)
            out = torch.mv(grad, scale).view(shape) if out is None else out.view(-1).addmv_(grad, scale).view(shape)
        elif c.is_index:
            if out is None:
                out = torch.zeros(shape, dtype=torch.float32, device=c.right.device)
            rows = (_fp32(c.right) * scale[:, None, None]).flatten(0, 1)  # (B*T, cols)
            out.view(c.rows, -1).index_add_(0, c.left.flatten(), rows)
        else:
            part = kernels.scaled_linear_grad(*c.kernel_args, scale, out_dtype=torch.float32).reshape(shape)  # 1 GEMM
            out = part if out is None else out.add_(part)
    return out


# A densified gradient is written once and read twice (norm, weighted sum): memory-bound passes worth about this
# many multiply-adds per element each on a CPU, against the GEMM FLOPs of the factored norm they replace.
DENSE_PASS_COST = 8
# Extra cost per element where one batch chunk of a parameter's per-sample gradients outgrows the cache
# (``DENSE_CACHE_BYTES``, half of a 32 MiB last-level cache, the rest for the layer's inputs): the batched product
# then streams its output to main memory and both passes read it back from there (see benchmarks/RESULTS.md,
# engine_speed analysis). The planner keeps chunks within it where one sample fits.
DENSE_SPILL_COST = 88
DENSE_CACHE_BYTES = 16 * 2**20


def densify_gain(uses: Sequence[Contribution], numel: int, pass_cost: float = DENSE_PASS_COST) -> float:
    """Multiply-adds per sample saved by densifying ``uses`` (<= 0: keep them factored); ``pass_cost``: see
    ``DENSE_PASS_COST``."""
    saved = 0.0
    for c in uses:
        if isinstance(c, Factored) and not c.is_index:
            t, rows, cols = c.left.shape[1], c.rows, c.right.shape[2]
            ghost = kernels.gram_cost("cpu") * t * t * (rows + cols)  # the dense route is CPU-only
            saved += min(ghost, t * rows * cols)  # the factored norm (ghost or instantiate)
    return saved - pass_cost * numel if saved else 0.0


def dense_pass_cost(chunk_numel: int, base: float = DENSE_PASS_COST, cache_bytes: int = DENSE_CACHE_BYTES) -> float:
    """``densify_gain``'s cost per element of a parameter with ``chunk_numel`` values of per-sample gradients in one
    batch chunk: ``base`` while they fit in ``cache_bytes``, ``base + DENSE_SPILL_COST`` beyond."""
    return base + (DENSE_SPILL_COST if 4 * chunk_numel > cache_bytes else 0.0)


def densify(uses: Sequence[Contribution], out: torch.Tensor) -> Instantiated:
    """The per-sample gradient summed over ``uses``, written into ``out`` (B, *shape) fp32 (any contents)."""
    batch = out.shape[0]
    for k, c in enumerate(uses):
        first = k == 0
        if isinstance(c, Instantiated):
            part = c.grad.reshape(out.shape)
            out.copy_(part) if first else out.add_(part)
            continue
        if first and c.is_index:
            out.zero_()
        rows_view = out.view(batch, c.rows, -1)  # (B, rows, cols)
        right = _fp32(c.right)
        if c.is_index:  # row ids_t of sample i gets right_i[t]
            offsets = torch.arange(batch, device=c.left.device)[:, None] * c.rows  # (B, 1)
            rows_view.view(batch * c.rows, -1).index_add_(0, (c.left + offsets).flatten(), right.flatten(0, 1))
            continue
        left_t = _fp32(c.left).transpose(1, 2)  # (B, rows, T)
        if first:  # left_i^T right_i, straight into the reused buffer (a fresh result costs page faults)
            torch.bmm(left_t, right, out=rows_view)
        else:
            rows_view.baddbmm_(left_t, right)
    return Instantiated(out)
