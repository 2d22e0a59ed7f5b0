"""DCT-AdamW (Modoranu, Safaryan, Schultheis, Ryabinin, Chumachenko, Alistarh 2025, arXiv 2505.17967): SVD-free
low-rank Adam by dynamic column selection from a fixed DCT basis.

For a canonical gradient ``G`` (m, n), m <= n, rank r, with ``Q`` the (m, m) orthogonal DCT matrix
``Q[i, j] = sqrt(2/m) c_i cos(pi i (2j + 1) / (2m))`` (``c_0 = 1/sqrt(2)``, else 1), computed once per size
and shared by every matrix with that side, and ``Q_I`` its columns ``I``:

1. ``A = G + E`` with error feedback (``E``: m n floats), else ``A = G``;
2. at t = 1 and every t with ``t % update_proj_gap == 0``: ``S = Q^T A`` (m, n); ``I`` = the r rows of S of
   largest L1 norm, in decreasing norm order (only these indices are stored); ``a = S[I]``; with
   ``rotate_subspace`` the moments move to the new columns: ``R = Q_I^T Q_{I_old}``, ``m <- R m``,
   ``v <- |R v|``; otherwise ``a = Q_I^T A`` (r, n);
3. error feedback: ``E = A - Q_I a``;
4. Adam on ``a`` (moments (r, n)); update ``Q_I Adam(a)``; ``p <- p (1 - lr wd) - lr * update``.

Matrices with a side >= ``max_shape`` (token embeddings, LM heads) and non-matrix parameters get full-rank
AdamW, as in the authors' release. State per low-rank matrix: 2 n r floats + r int32 indices (+ m n with error
feedback); the shared bases (m^2 floats per distinct m) are counted by ``optimizer_state_bytes`` through
:meth:`DCTAdamW.shared_state_bytes`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dptrain.validation import check_bool, check_positive_int

from ._base import LowMemoryOptimizer, resolve_rank
from ._common import adam_direction

__all__ = ["DCTAdamW", "dct_basis"]


def dct_basis(size: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The orthogonal ``(size, size)`` DCT matrix whose columns are the basis (computed in float64)."""
    i = torch.arange(size, dtype=torch.float64, device=device)[:, None]  # (size, 1)
    j = torch.arange(size, dtype=torch.float64, device=device)[None, :]  # (1, size)
    basis = math.sqrt(2.0 / size) * torch.cos(math.pi * i * (2 * j + 1) / (2 * size))  # (size, size)
    basis[0] *= math.sqrt(0.5)
    return basis.to(dtype)


class DCTAdamW(LowMemoryOptimizer):
    """DCT-AdamW: Adam in the span of r DCT columns picked by alignment with the gradient.

    Args:
        lr, betas, eps, weight_decay: AdamW options (decoupled weight decay).
        rank: number r of DCT columns; None = ceil(m / 4) per matrix; clamped to m.
        update_proj_gap: the columns are re-selected at step 1 and at every multiple of this gap.
        rotate_subspace: move the moments into the new columns when they change.
        error_feedback: keep the part of the gradient outside the columns and add it to the next one.
        max_shape: matrices with a side >= this get full-rank AdamW.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, rank: int | None = None, update_proj_gap: int = 1,
                 rotate_subspace: bool = False, error_feedback: bool = False, max_shape: int = 32_000) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, rotate_subspace=rotate_subspace,
                        error_feedback=error_feedback, max_shape=max_shape)
        self._bases: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        if group["rank"] is not None:
            check_positive_int("rank", group["rank"])
        check_positive_int("update_proj_gap", group["update_proj_gap"])
        check_positive_int("max_shape", group["max_shape"])
        check_bool("rotate_subspace", group["rotate_subspace"])
        check_bool("error_feedback", group["error_feedback"])

    def shared_state_bytes(self) -> int:
        """Bytes of the DCT bases shared by all matrices (one per distinct side m)."""
        return sum(q.numel() * q.element_size() for q in self._bases.values())

    def _basis(self, size: int, like: Tensor) -> Tensor:
        key = (size, like.dtype, like.device)
        if key not in self._bases:
            self._bases[key] = dct_basis(size, dtype=like.dtype, device=like.device)
        return self._bases[key]

    def _matrix_direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> Tensor:
        m, n = grad.shape
        beta1, beta2 = group["betas"]
        adam = dict(beta1=beta1, beta2=beta2, eps=group["eps"], step=state["step"])
        if n >= group["max_shape"]:  # the authors' full-rank fallback for embeddings / LM heads
            if "exp_avg" not in state:
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)  # (m, n)
            return adam_direction(state["exp_avg"], state["exp_avg_sq"], grad, **adam)
        r, t = min(resolve_rank(group["rank"], m), m), state["step"]
        basis = self._basis(m, grad)  # (m, m), columns = basis vectors
        acc = grad
        if group["error_feedback"]:
            if "error" not in state:
                state["error"] = torch.zeros_like(grad)  # (m, n)
            acc = grad + state["error"]
        if "indices" not in state:
            state["exp_avg"] = torch.zeros(r, n, dtype=grad.dtype, device=grad.device)  # (r, n)
            state["exp_avg_sq"] = torch.zeros(r, n, dtype=grad.dtype, device=grad.device)  # (r, n)
        if t == 1 or t % group["update_proj_gap"] == 0:
            sim = basis.t() @ acc  # (m, n), alignment of every column with A
            new = torch.topk(sim.abs().sum(dim=1), r, sorted=True).indices  # (r,)
            if group["rotate_subspace"] and "indices" in state:
                rot = basis[:, new].t() @ basis[:, state["indices"].long()]  # (r, r)
                state["exp_avg"].copy_(rot @ state["exp_avg"])
                state["exp_avg_sq"].copy_((rot @ state["exp_avg_sq"]).abs_())
            state["indices"] = new.to(torch.int32)  # (r,)
            low = sim[new]  # (r, n)
        else:
            low = basis[:, state["indices"].long()].t() @ acc  # (r, n)
        cols = basis[:, state["indices"].long()]  # (m, r)
        if group["error_feedback"]:
            state["error"].copy_(acc - cols @ low)
        return cols @ adam_direction(state["exp_avg"], state["exp_avg_sq"], low, **adam)  # (m, n)
