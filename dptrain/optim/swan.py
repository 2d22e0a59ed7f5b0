"""SWAN (Ma, Gong, Scetbon, Meeds, arXiv 2412.13148): stateless SGD with gradient normalisation and whitening.

For a canonical gradient ``G`` (m, n), m <= n:

1. GradNorm: standardise each row over its n entries, ``G~ = (G - mean_row) / (std_row + eps)``;
2. GradWhitening: ``W = (G~ G~^T)^(-1/2) G~``, the inverse square root of the (m, m) Gram matrix computed by
   ``ns_steps`` coupled Newton-Schulz iterations on ``A = G~ G~^T / ||G~ G~^T||_F``:
   ``T = (3 I - Z Y) / 2; Y <- Y T; Z <- T Z`` from ``Y = A, Z = I`` (Z -> A^(-1/2));
3. optional rescale (``rescale=True``): ``W <- W ||G~||_F / ||W||_F`` so entries are O(1) like Adam's;
4. ``p <- p (1 - lr wd) - lr W``.

No state is kept for matrices. Non-matrix parameters get full-rank AdamW (the paper also keeps Adam for
those).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dptrain.validation import check_bool, check_positive_int

from ._base import LowMemoryOptimizer

__all__ = ["Swan", "inverse_sqrt_newton_schulz"]


def inverse_sqrt_newton_schulz(gram: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """``(Z, c)`` with ``Z ~ (gram / c)^(-1/2)``, ``c = ||gram||_F``, by coupled Newton-Schulz iterations."""
    c = gram.norm().clamp_min(1e-30)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)  # (m, m)
    y = gram / c  # (m, m), eigenvalues in [0, 1]
    z = eye.clone()
    for _ in range(steps):
        t = 0.5 * (3.0 * eye - z @ y)  # (m, m)
        y = y @ t
        z = t @ z
    return z, c


class Swan(LowMemoryOptimizer):
    """SWAN: no optimizer state on matrices.

    Args:
        lr, weight_decay: learning rate and decoupled weight decay.
        betas, eps: AdamW options for non-matrix parameters; ``eps`` also guards the row std.
        ns_steps: Newton-Schulz iterations of the whitening.
        rescale: rescale the whitened gradient to the Frobenius norm of the normalised one.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, ns_steps: int = 10, rescale: bool = True) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, ns_steps=ns_steps, rescale=rescale)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_positive_int("ns_steps", group["ns_steps"])
        check_bool("rescale", group["rescale"])

    def _matrix_direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> Tensor:
        g = grad.float()  # (m, n)
        mean = g.mean(dim=1, keepdim=True)  # (m, 1)
        std = g.std(dim=1, keepdim=True, unbiased=False)  # (m, 1)
        normed = (g - mean) / (std + group["eps"])  # (m, n)
        z, c = inverse_sqrt_newton_schulz(normed @ normed.t(), group["ns_steps"])  # (m, m)
        white = (z @ normed) / c.sqrt()  # (m, n)
        if group["rescale"]:
            white = white * (normed.norm() / white.norm().clamp_min(1e-30))
        return white.to(grad.dtype)
