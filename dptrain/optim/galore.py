"""GaLore-AdamW (Zhao et al., ICML 2024, arXiv 2403.03507): Adam in the top-r singular subspace of G.

For a canonical gradient ``G`` (m, n), m <= n: every ``update_proj_gap`` steps ``P`` (m, r) is set to the
first r left singular vectors of the current G and stored (m r floats); Adam moments live on
``R = P^T G`` (r, n) (2 n r floats); the update is ``scale * P Adam(R)``. Moments are kept across
projector refreshes, as in the paper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dptrain.validation import check_positive, check_positive_int

from ._base import LowMemoryOptimizer, check_rank, resolve_rank
from ._common import adam_direction

__all__ = ["GaLoreAdamW", "top_left_singular_vectors"]


def top_left_singular_vectors(grad: Tensor, rank: int) -> Tensor:
    """First ``rank`` left singular vectors of ``grad`` (m, n) as an (m, r) matrix (SVD in float32)."""
    u, _, _ = torch.linalg.svd(grad.float(), full_matrices=False)  # (m, min(m, n))
    return u[:, :rank].to(grad.dtype).contiguous()  # (m, r)


class GaLoreAdamW(LowMemoryOptimizer):
    """GaLore with AdamW: state m r + 2 n r floats per m x n matrix (m <= n).

    Args:
        lr, betas, eps, weight_decay: as AdamW (decoupled weight decay).
        rank: subspace rank; None = ceil(m / 4) per matrix; must be <= m.
        update_proj_gap: steps between SVD refreshes of the projector.
        scale: GaLore's alpha multiplying the projected-back update (paper default 0.25).

    Non-matrix parameters get full-rank AdamW.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, rank: int | None = None, update_proj_gap: int = 200,
                 scale: float = 0.25) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_rank(group)
        check_positive_int("update_proj_gap", group["update_proj_gap"])
        check_positive("scale", group["scale"])

    def _matrix_direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> Tensor:
        m, n = grad.shape
        r = resolve_rank(group["rank"], m)
        if (state["step"] - 1) % group["update_proj_gap"] == 0:
            state["projector"] = top_left_singular_vectors(grad, r)  # (m, r)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(r, n, dtype=grad.dtype, device=grad.device)  # (r, n)
            state["exp_avg_sq"] = torch.zeros(r, n, dtype=grad.dtype, device=grad.device)  # (r, n)
        proj = state["projector"]  # (m, r)
        low = proj.t() @ grad  # (r, n)
        beta1, beta2 = group["betas"]
        low_adam = adam_direction(state["exp_avg"], state["exp_avg_sq"], low, beta1=beta1, beta2=beta2,
                                  eps=group["eps"], step=state["step"])  # (r, n)
        return (proj @ low_adam) * group["scale"]  # (m, n)
