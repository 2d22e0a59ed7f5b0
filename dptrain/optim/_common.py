"""Pieces shared by the low-memory optimizers: validation, matrix view, Adam moments, seeded projections.

Every optimizer in :mod:`dptrain.optim` works on a *canonical matrix* ``(m, n)`` with ``m <= n``: a 2-D
parameter is used as is or transposed, a >2-D parameter (e.g. a conv kernel ``(out, in, kh, kw)``) is first
flattened to ``(out, in * kh * kw)``. Projections then always act on the left (the smaller side ``m``), so
low-rank state has shape ``(r, n)`` and costs ``n * r`` floats per moment, as in the papers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dptrain.validation import check_fraction

__all__ = [
    "adam_compute_dtype",
    "adam_direction",
    "canonical_matrix",
    "check_betas",
    "derive_seed",
    "from_canonical",
    "gaussian_projection",
    "is_matrix",
    "random_columns",
]

_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- validation
def check_betas(betas: Any) -> tuple[float, float]:
    """Adam betas: a pair of numbers, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), found {betas!r}")
    return (check_fraction("betas[0]", betas[0], closed_right=False), check_fraction("betas[1]", betas[1], closed_right=False))


# ----------------------------------------------------------------------------- matrix view
def is_matrix(p: Tensor) -> bool:
    """Parameters with >= 2 dims get the low-memory matrix treatment; the rest (bias, norms) do not."""
    return p.dim() >= 2


def canonical_matrix(t: Tensor) -> tuple[Tensor, bool]:
    """View ``t`` as ``(m, n)`` with ``m <= n``; returns the view and whether it was transposed.

    >2-D tensors are flattened to ``(shape[0], prod(shape[1:]))`` first. The projection side rule:
    the smaller side is the one projected, so transpose when rows outnumber columns.
    """
    mat = t.reshape(t.shape[0], -1)  # (rows, cols)
    if mat.shape[0] > mat.shape[1]:
        return mat.t(), True  # (m, n), m <= n
    return mat, False


def from_canonical(mat: Tensor, transposed: bool, shape: torch.Size) -> Tensor:
    """Invert :func:`canonical_matrix`: back to the parameter's shape."""
    return (mat.t() if transposed else mat).reshape(shape)


def canonical_shape(shape: torch.Size) -> tuple[int, int]:
    """``(m, n)`` with ``m <= n`` of a parameter shape, without touching data (works on meta tensors)."""
    rows, cols = shape[0], math.prod(shape[1:])
    return (min(rows, cols), max(rows, cols))


# ----------------------------------------------------------------------------- Adam moments
def adam_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in for state of ``dtype``: float32 for half types, else ``dtype`` (fp32, fp64)."""
    return torch.promote_types(dtype, torch.float32)


def adam_direction(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, *, beta1: float, beta2: float,
                   eps: float, step: int) -> Tensor:
    """Update the Adam moments in place with ``grad`` and return the bias-corrected direction.

    ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``, direction ``(m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)``.
    """
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return (exp_avg / bc1) / ((exp_avg_sq / bc2).sqrt_().add_(eps))


# ----------------------------------------------------------------------------- seeds and projections
def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 finaliser), so per-parameter seeds are independent."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


def _generator(seed: int, device: torch.device) -> torch.Generator | None:
    """A generator seeded with ``seed``; None on the meta device (shape-only dry runs draw nothing)."""
    if torch.device(device).type == "meta":
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def gaussian_projection(seed: int, rank: int, dim: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The ``(rank, dim)`` Gaussian projection with entries N(0, 1/rank), regenerated from ``seed``.

    Equal to ``torch.randn(rank, dim, generator=torch.Generator(device).manual_seed(seed)) / sqrt(rank)``.
    """
    proj = torch.randn(rank, dim, generator=_generator(seed, device), device=device, dtype=torch.float32)  # (r, m)
    return proj.div_(math.sqrt(rank)).to(dtype)


def random_columns(seed: int, n: int, k: int, *, device: torch.device) -> Tensor:
    """``k`` distinct column indices out of ``n``: ``torch.randperm(n, generator=seed)[:k]``."""
    return torch.randperm(n, generator=_generator(seed, device), device=device)[:k]  # (k,)
