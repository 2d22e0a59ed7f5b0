"""APOLLO and APOLLO-Mini (Zhu et al., MLSys 2025, arXiv 2412.05270): AdamW-like scaling from a random sketch.

For a canonical gradient ``G`` (m, n), m <= n, and rank r:

1. every ``update_proj_gap`` steps draw a new integer seed; the projection ``P`` (r, m) with entries
   N(0, 1/r) is regenerated from that seed at each step (never stored);
2. ``R = P G`` (r, n); Adam moments live on ``R`` (state 2 n r floats) and give ``R~ = Adam(R)``;
3. scaling: channel-wise ``s_j = ||R~[:, j]|| / ||R[:, j]||`` (one per column of the long side), or
   tensor-wise ``s = ||R~|| / ||R||``; the full-rank update is ``G~ = G diag(s)`` (or ``s G``);
4. norm-growth limiter (from Fira): if ``||G~_t|| > gamma ||G~_{t-1}||`` rescale ``G~_t`` to
   ``gamma ||G~_{t-1}||``; gamma = 1.01;
5. ``W <- W (1 - lr wd) - lr * alpha * G~`` with ``alpha = sqrt(scale)``.

``scale`` follows the authors' release, which multiplies the gradient by ``sqrt(scale)``: APOLLO uses
``scale=1`` (alpha = 1), APOLLO-Mini ``rank=1``, tensor-wise scaling and ``scale=128``, i.e. the paper's
heuristic gradient scale factor alpha = sqrt(128) that compensates the rank-1 estimate's systematically
small scaling factor (the paper motivates alpha ~ sqrt(n / r)).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dptrain.validation import check_choice, check_int, check_number, check_positive, check_positive_int

from ._base import LowMemoryOptimizer, check_rank, resolve_rank
from ._common import adam_direction, derive_seed, gaussian_projection

__all__ = ["Apollo", "ApolloMini"]

_SCALE_TYPES = ("channel", "tensor")
_TINY = 1e-8


class Apollo(LowMemoryOptimizer):
    """APOLLO: AdamW-level updates with 2 n r floats of state per m x n matrix (m <= n).

    Args:
        params: parameters or param groups (each group may override every option below).
        lr: learning rate (> 0).
        betas, eps: Adam coefficients of the low-rank moments.
        weight_decay: decoupled weight decay.
        rank: projection rank r; None = ceil(m / 4) per matrix. Must be <= m for every matrix.
        update_proj_gap: steps between new projection seeds.
        scale: gradient scale; the update is multiplied by sqrt(scale) (see the module docstring).
        scale_type: "channel" (APOLLO) or "tensor" (APOLLO-Mini).
        norm_growth_limit: gamma of the norm-growth limiter (>= 1; inf disables it).
        seed: base seed from which each parameter's projection seeds are derived.

    Non-matrix parameters get full-rank AdamW with the same betas/eps.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, rank: int | None = None, update_proj_gap: int = 200,
                 scale: float = 1.0, scale_type: str = "channel", norm_growth_limit: float = 1.01,
                 seed: int = 0) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, scale_type=scale_type,
                        norm_growth_limit=norm_growth_limit, seed=seed)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_rank(group)
        check_positive_int("update_proj_gap", group["update_proj_gap"])
        check_positive("scale", group["scale"])
        check_choice("scale_type", group["scale_type"], _SCALE_TYPES)
        if group["norm_growth_limit"] != math.inf:  # inf disables the limit
            check_number("norm_growth_limit", group["norm_growth_limit"], low=1.0)
        check_int("seed", group["seed"])

    def _matrix_direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> Tensor:
        m, n = grad.shape
        r = resolve_rank(group["rank"], m)
        step = state["step"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(r, n, dtype=grad.dtype, device=grad.device)  # (r, n)
            state["exp_avg_sq"] = torch.zeros(r, n, dtype=grad.dtype, device=grad.device)  # (r, n)
        if (step - 1) % group["update_proj_gap"] == 0:
            state["seed"] = derive_seed(group["seed"], index, (step - 1) // group["update_proj_gap"])
        proj = gaussian_projection(state["seed"], r, m, device=grad.device, dtype=grad.dtype)  # (r, m)
        low = proj @ grad  # (r, n)
        beta1, beta2 = group["betas"]
        low_adam = adam_direction(state["exp_avg"], state["exp_avg_sq"], low, beta1=beta1, beta2=beta2,
                                  eps=group["eps"], step=step)  # (r, n)
        if group["scale_type"] == "channel":
            factor = low_adam.norm(dim=0) / (low.norm(dim=0) + _TINY)  # (n,)
            update = grad * factor.unsqueeze(0)  # (m, n)
        else:
            factor = low_adam.norm() / (low.norm() + _TINY)  # ()
            update = grad * factor  # (m, n)
        update = self._limit_norm_growth(update, state, group["norm_growth_limit"])
        return update * math.sqrt(group["scale"])

    @staticmethod
    def _limit_norm_growth(update: Tensor, state: dict[str, Any], gamma: float) -> Tensor:
        """Cap ``||update_t|| <= gamma ||update_{t-1}||`` (the previous, limited norm is kept in state).

        A previous norm of 0 (an all-zero gradient) sets no cap, so one empty step cannot freeze the updates.
        """
        norm = update.norm()
        if "prev_norm" in state and math.isfinite(gamma):
            prev = state["prev_norm"]
            cap = torch.where(prev > 0, gamma * prev, torch.full_like(prev, math.inf))
            shrink = torch.clamp(cap / (norm + _TINY), max=1.0)  # 1 unless the norm grew too fast
            update = update * shrink
            norm = torch.minimum(norm, cap)
        state["prev_norm"] = norm.detach().clone()
        return update


class ApolloMini(Apollo):
    """APOLLO-Mini: rank 1, tensor-wise scaling, scale 128 (alpha = sqrt(128)); state 2 n floats per matrix."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, rank: int = 1, update_proj_gap: int = 200, scale: float = 128.0,
                 scale_type: str = "tensor", norm_growth_limit: float = 1.01, seed: int = 0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                         update_proj_gap=update_proj_gap, scale=scale, scale_type=scale_type,
                         norm_growth_limit=norm_growth_limit, seed=seed)
