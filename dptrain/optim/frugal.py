"""FRUGAL (Zmushko et al., arXiv 2411.07837): Adam on a state-full subspace, signSGD on the rest.

The canonical gradient ``G`` (m, n), m <= n, is split into a state-full part and a state-free residual:

- ``proj="columns"`` (default): a random set of ``k = ceil(density * n)`` columns, redrawn from a stored
  integer seed every ``update_proj_gap`` steps (indices ``randperm(n, seed)[:k]``, regenerated, not stored);
  Adam state on those columns: 2 m k floats = ``density`` x AdamW's.
- ``proj="svd"``: the top ``k = ceil(density * m)`` left singular vectors ``P`` (m, k) of G (stored, m k
  floats); Adam on ``P^T G`` (k, n) (2 n k floats), mapped back with ``P``.

The residual (the other columns, or ``G - P P^T G``) gets ``free_lr_scale * sign(residual)``. When the
subspace changes the Adam state is reset to zero and its bias correction restarts (the old moments belong
to other coordinates).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dptrain.validation import check_choice, check_fraction, check_int, check_nonnegative, check_positive_int

from ._base import LowMemoryOptimizer
from ._common import adam_direction, derive_seed, random_columns
from .galore import top_left_singular_vectors

__all__ = ["Frugal"]

_PROJS = ("columns", "svd")


class Frugal(LowMemoryOptimizer):
    """FRUGAL with Adam as the state-full and signSGD as the state-free optimizer.

    Args:
        lr, betas, eps, weight_decay: AdamW options (decoupled weight decay).
        density: fraction rho of the state-full subspace, in (0, 1].
        proj: "columns" (random columns from a seed) or "svd" (top singular subspace).
        update_proj_gap: steps between subspace changes.
        free_lr_scale: the state-free signSGD step is ``lr * free_lr_scale``.
        seed: base seed of the column draws.

    Non-matrix parameters get full-rank AdamW.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, density: float = 0.25, proj: str = "columns",
                 update_proj_gap: int = 200, free_lr_scale: float = 1.0, seed: int = 0) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=density, proj=proj,
                        update_proj_gap=update_proj_gap, free_lr_scale=free_lr_scale, seed=seed)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_fraction("density", group["density"], closed_right=True)
        check_choice("proj", group["proj"], _PROJS)
        check_positive_int("update_proj_gap", group["update_proj_gap"])
        check_nonnegative("free_lr_scale", group["free_lr_scale"])
        check_int("seed", group["seed"])

    def _matrix_direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> Tensor:
        m, n = grad.shape
        columns = group["proj"] == "columns"
        k = max(1, math.ceil(group["density"] * (n if columns else m)))
        moment_shape = (m, k) if columns else (k, n)
        if (state["step"] - 1) % group["update_proj_gap"] == 0:  # new subspace: fresh Adam state
            if columns:
                state["seed"] = derive_seed(group["seed"], index, (state["step"] - 1) // group["update_proj_gap"])
            else:
                state["projector"] = top_left_singular_vectors(grad, k)  # (m, k)
            state["exp_avg"] = torch.zeros(moment_shape, dtype=grad.dtype, device=grad.device)
            state["exp_avg_sq"] = torch.zeros(moment_shape, dtype=grad.dtype, device=grad.device)
            state["subspace_step"] = 0
        state["subspace_step"] += 1
        beta1, beta2 = group["betas"]
        adam = dict(beta1=beta1, beta2=beta2, eps=group["eps"], step=state["subspace_step"])
        if columns:
            idx = random_columns(state["seed"], n, k, device=grad.device)  # (k,)
            update = torch.sign(grad) * group["free_lr_scale"]  # (m, n)
            update[:, idx] = adam_direction(state["exp_avg"], state["exp_avg_sq"], grad[:, idx], **adam)  # (m, k)
            return update
        proj = state["projector"]  # (m, k)
        low = proj.t() @ grad  # (k, n)
        residual = grad - proj @ low  # (m, n)
        full = proj @ adam_direction(state["exp_avg"], state["exp_avg_sq"], low, **adam)  # (m, n)
        return full + torch.sign(residual) * group["free_lr_scale"]
