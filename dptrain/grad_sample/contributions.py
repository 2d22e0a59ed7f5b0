"""What one use of a parameter contributes to each sample's gradient, and the algebra on it.

A parameter may be used several times in one forward pass (tied embedding and LM head, a module called
twice). Its per-sample gradient is the SUM over its uses, so its norm needs the cross terms between uses.
Each use is kept in one of two forms:

- ``Factored``: G_i = left_i^T right_i (a linear-like layer: Linear, HF Conv1D, Conv via unfold, Embedding).
  ``left`` is dense (B, T, rows) or an index tensor (B, T) of one-hot rows (Embedding); ``right`` is
  (B, T, cols). Norms use the ghost (Gram) form or instantiation, whichever is cheaper (``dptrain.kernels``).
- ``Instantiated``: the per-sample gradient itself, (B, *param.shape) (norm layers, biases, the fallback).

Cross terms: <L1^T R1, L2^T R2> = sum_{t,s} (L1 L2^T)[t, s] (R1 R2^T)[t, s] per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from dptrain import kernels

__all__ = ["Factored", "Instantiated", "Contribution", "per_sample_sq_norms", "weighted_sum", "batch_size_of"]


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


def _self_sq_norm(c: Contribution) -> torch.Tensor:
    if isinstance(c, Instantiated):
        return c.grad.flatten(1).float().pow(2).sum(1)  # (B,)
    if c.is_index:
        return kernels.per_sample_embedding_grad_sq_norms(c.left, c.right)
    return kernels.per_sample_linear_grad_sq_norms(c.right, c.left)


def _left_gram(a: Factored, b: Factored) -> torch.Tensor:
    """(L_a L_b^T) per sample, (B, T_a, T_b), for dense or one-hot left factors."""
    if a.is_index and b.is_index:
        return (a.left[:, :, None] == b.left[:, None, :]).float()
    if a.is_index:  # entry [t, s] = L_b[s, ids_a[t]]
        idx = a.left[:, :, None].expand(-1, -1, b.left.shape[1])  # (B, T_a, T_b)
        return torch.gather(b.left.float().transpose(1, 2), 1, idx)
    if b.is_index:
        return _left_gram(b, a).transpose(1, 2)
    return torch.bmm(a.left.float(), b.left.float().transpose(1, 2))


def _inner(a: Contribution, b: Contribution) -> torch.Tensor:
    """Per-sample inner product <G_a,i, G_b,i>, (B,)."""
    if isinstance(a, Instantiated) and isinstance(b, Instantiated):
        return (a.grad.float() * b.grad.float()).flatten(1).sum(1)
    if isinstance(a, Instantiated):
        a, b = b, a
    if isinstance(b, Instantiated):  # <L^T R, G> = sum_t <L_t^T G, R_t>
        grad = a.matrix_view(b.grad).float()  # (B, rows, cols)
        if a.is_index:
            rows_used = torch.gather(grad, 1, a.left[:, :, None].expand(-1, -1, grad.shape[2]))  # (B, T, cols)
        else:
            rows_used = torch.bmm(a.left.float(), grad)  # (B, T, cols)
        return (rows_used * a.right.float()).sum((1, 2))
    right_gram = torch.bmm(a.right.float(), b.right.float().transpose(1, 2))  # (B, T_a, T_b)
    return (_left_gram(a, b) * right_gram).sum((1, 2))


def per_sample_sq_norms(uses: Sequence[Contribution]) -> torch.Tensor:
    """Squared norms of the per-sample gradient summed over all ``uses`` of one parameter, (B,) fp32."""
    total = _self_sq_norm(uses[0])
    for i in range(1, len(uses)):
        total = total + _self_sq_norm(uses[i])
        for j in range(i):
            total = total + 2.0 * _inner(uses[i], uses[j])
    return total


def weighted_sum(uses: Sequence[Contribution], scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """sum_i scale_i G_i over samples and uses, shaped ``shape`` (fp32)."""
    out = None
    for c in uses:
        if isinstance(c, Instantiated):
            part = torch.einsum("b,b...->...", scale, c.grad.float())
        elif c.is_index:
            part = torch.zeros(c.rows, c.right.shape[-1], dtype=torch.float32, device=c.right.device)
            part.index_add_(0, c.left.flatten(), (c.right.float() * scale[:, None, None]).flatten(0, 1))
        else:
            part = kernels.scaled_linear_grad(c.right, c.left, scale).float()  # (rows, cols)
        part = part.reshape(shape)
        out = part if out is None else out + part
    return out
