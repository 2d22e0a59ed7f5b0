"""LDAdam (Robert, Safaryan, Modoranu, Alistarh, ICLR 2025, arXiv 2410.16103): Adam on low-dimensional statistics.

For a canonical gradient ``G`` (m, n), m <= n, rank r, at step t (Algorithm 1 of the paper, left projection):

1. ``A = G + E`` (``E``: the error-feedback buffer, zero at first);
2. subspace ``P_t`` (m, r): at t = 1 the top-r left singular vectors of A; afterwards one power-iteration
   step warm-started at ``P_{t-1}`` on ``B = rho P_{t-1} m_{t-1} / (1 - b1^(t-1)) + (1 - rho) A``:
   ``P_t = orth(B B^T P_{t-1})`` (QR);
3. ``a = P_t^T A`` (r, n);
4. projection-aware moments with ``R = P_t^T P_{t-1}`` (r, r): ``m' = R m``; the centred second moment is
   moved with ``R o R``: ``v' = |((R o R)(v / c2 - m^2 / c1^2) + m'^2 / c1^2) c2|``, ``c_i = 1 - b_i^(t-1)``;
5. generalized error feedback: ``E = A - P_t a + b1 / (1 - b1) (P_{t-1} m - P_t m')``;
6. Adam: ``m = b1 m' + (1 - b1) a``, ``v = b2 v' + (1 - b2) a^2``, update ``P_t (m / (1 - b1^t)) /
   (sqrt(v / (1 - b2^t)) + eps)``; ``p <- p (1 - lr wd) - lr * update``.

The authors keep ``E`` in ``p.grad`` (their ``zero_grad`` leaves it there and backward adds the next
gradient). Under DP the engine writes a fresh privatised gradient to ``.grad`` every step, so ``E`` is kept
here as optimizer state (m n floats, counted by ``optimizer_state_bytes``) and ``.grad`` is only read. State
per matrix: ``P`` m r, moments 2 n r (+ ``E`` m n with error feedback). QR and SVD run in float32 or wider.
Non-matrix parameters get full-rank AdamW.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import LowMemoryOptimizer
from ._common import adam_compute_dtype, adam_direction, check_fraction, check_positive_int

__all__ = ["LDAdam"]


class LDAdam(LowMemoryOptimizer):
    """LDAdam: state ``m r + 2 n r`` floats per m x n matrix (m <= n), plus ``m n`` with error feedback.

    Args:
        lr, betas, eps, weight_decay: AdamW options (decoupled weight decay); paper betas (0.908, 0.99).
        rank: subspace rank r (clamped to the smaller side of each matrix).
        rho: weight of the projected momentum against the gradient in the power-iteration target.
        error_feedback: keep the generalized error-feedback buffer (m n floats per matrix).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.908, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, rank: int = 16, rho: float = 0.908, error_feedback: bool = True) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, rho=rho,
                        error_feedback=error_feedback)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_positive_int("rank", group["rank"])
        check_fraction("rho", group["rho"], closed_right=False)
        if not isinstance(group["error_feedback"], bool):
            raise TypeError(f"error_feedback must be a bool, found {group['error_feedback']!r}")

    def _matrix_direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> Tensor:
        m, n = grad.shape
        r, t, rho = min(group["rank"], m), state["step"], group["rho"]
        beta1, beta2 = group["betas"]
        wide = adam_compute_dtype(grad.dtype)  # QR / SVD precision
        acc = grad.clone()  # (m, n), A = G + E
        if group["error_feedback"]:
            if "error" not in state:
                state["error"] = torch.zeros_like(grad)  # (m, n)
            acc += state["error"]
        prev = state.get("projector")  # (m, r), None at the first step
        if prev is None:
            proj = torch.linalg.svd(acc.to(wide), full_matrices=False)[0][:, :r].to(grad.dtype)  # (m, r)
            state["exp_avg"] = torch.zeros(r, n, dtype=grad.dtype, device=grad.device)  # (r, n)
            state["exp_avg_sq"] = torch.zeros(r, n, dtype=grad.dtype, device=grad.device)  # (r, n)
        else:
            target = rho / (1 - beta1 ** (t - 1)) * (prev @ state["exp_avg"]) + (1 - rho) * acc  # (m, n)
            proj = torch.linalg.qr((target @ (target.t() @ prev)).to(wide))[0].to(grad.dtype)  # (m, r)
        low = proj.t() @ acc  # (r, n)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        ef = group["error_feedback"]
        if ef:
            error = acc - proj @ low  # (m, n), what the projection drops
        if prev is not None:
            change = proj.t() @ prev  # (r, r)
            moved = change @ exp_avg  # (r, n)
            c1, c2 = 1 - beta1 ** (t - 1), 1 - beta2 ** (t - 1)
            centred = exp_avg_sq / c2 - exp_avg * exp_avg / c1**2  # (r, n)
            exp_avg_sq.copy_((((change * change) @ centred + moved * moved / c1**2) * c2).abs_())
            if ef:  # what moving the momentum drops
                error += beta1 / (1 - beta1) * (prev @ exp_avg - proj @ moved)
            exp_avg.copy_(moved)
        if ef:
            state["error"].copy_(error)
        state["projector"] = proj
        direction = adam_direction(exp_avg, exp_avg_sq, low, beta1=beta1, beta2=beta2, eps=group["eps"], step=t)
        return proj @ direction  # (m, n)
