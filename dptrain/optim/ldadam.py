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

The authors keep ``E`` in ``p.grad``: their ``zero_grad`` leaves it there and backward adds the next gradient,
so the buffer costs no memory beyond the gradient. ``error_storage="grad"`` does the same; the DP optimizer then
adds its privatised gradient into ``.grad`` instead of replacing it (``keeps_state_in_grad``), which is post-
processing. A ``.grad`` cleared in between (``model.zero_grad()``) is refused; one overwritten by assignment
cannot be seen, so loops that assign ``.grad`` use ``error_storage="state"`` (the default): ``E`` is then
optimizer state (m n floats, counted by ``optimizer_state_bytes``) and ``.grad`` is only read. State per matrix:
``P`` m r, moments 2 n r. QR and SVD run in float32 or wider. Non-matrix parameters get full-rank AdamW.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dptrain.validation import check_bool, check_fraction, check_positive_int

from ._base import LowMemoryOptimizer
from ._common import adam_compute_dtype, adam_direction, canonical_matrix, from_canonical

__all__ = ["LDAdam"]


class LDAdam(LowMemoryOptimizer):
    """LDAdam: state ``m r + 2 n r`` floats per m x n matrix (m <= n), plus ``m n`` with error feedback kept as
    state.

    Args:
        lr, betas, eps, weight_decay: AdamW options (decoupled weight decay); paper betas (0.908, 0.99).
        rank: subspace rank r (clamped to the smaller side of each matrix).
        rho: weight of the projected momentum against the gradient in the power-iteration target.
        error_feedback: keep the generalized error-feedback buffer (m n floats per matrix).
        error_storage: ``"state"`` (the buffer is optimizer state; ``.grad`` is only read) or ``"grad"`` (the
            authors' way: the buffer stays in ``.grad`` between steps and the next gradient is added to it).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.908, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, rank: int = 16, rho: float = 0.908, error_feedback: bool = True,
                 error_storage: str = "state") -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, rho=rho,
                        error_feedback=error_feedback, error_storage=error_storage)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_positive_int("rank", group["rank"])
        check_fraction("rho", group["rho"], closed_right=False)
        check_bool("error_feedback", group["error_feedback"])
        if group["error_storage"] not in ("state", "grad"):
            raise ValueError(f"error_storage must be 'state' or 'grad', found {group['error_storage']!r}")

    # -- the error buffer in .grad (error_storage="grad") -------------------------------------------------
    def keeps_state_in_grad(self, p: Tensor) -> bool:
        """True when ``p.grad`` holds this optimizer's error buffer: the next gradient must be added to it."""
        return bool(self.state.get(p, {}).get("error_in_grad"))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``, except that gradients holding the error buffer are kept."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or self.keeps_state_in_grad(p):
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().requires_grad_(False).zero_()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, p in enumerate(p for g in self.param_groups for p in g["params"]):
            if p.grad is None and self.keeps_state_in_grad(p):
                raise RuntimeError(
                    f"LDAdam keeps its error-feedback buffer in .grad (error_storage='grad'), but .grad of parameter "
                    f"{index} was cleared since the last step (model.zero_grad() or zero_grad on another object); "
                    "call zero_grad on this optimizer, which keeps it, or use error_storage='state'")
        super().step()
        return loss

    def _tensor_direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> Tensor:
        direction = super()._tensor_direction(grad, state, group, index)
        error = state.pop("error_out", None)  # (m, n) canonical, only with error_storage="grad"
        if error is not None:
            grad.copy_(from_canonical(error, canonical_matrix(grad)[1], grad.shape))  # .grad now holds E
            state["error_in_grad"] = True
        return direction

    def state_dict(self) -> dict[str, Any]:
        """As torch's, plus each error buffer held in ``.grad`` (key ``grad_error``), so a resume is exact."""
        saved = super().state_dict()
        for index, p in enumerate(p for g in self.param_groups for p in g["params"]):
            if self.keeps_state_in_grad(p):
                saved["state"][index] = {**saved["state"][index], "grad_error": p.grad.detach().clone()}
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as the base class does, and put each saved ``grad_error`` back into its parameter's ``.grad``."""
        state = {k: dict(v) for k, v in state_dict["state"].items()}
        errors = {k: v.pop("grad_error") for k, v in state.items() if "grad_error" in v}
        super().load_state_dict({**state_dict, "state": state})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            if saved_id in errors:
                p.grad = errors[saved_id].to(device=p.device, dtype=p.dtype, copy=True)

    def _matrix_direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> Tensor:
        m, n = grad.shape
        r, t, rho = min(group["rank"], m), state["step"], group["rho"]
        beta1, beta2 = group["betas"]
        wide = adam_compute_dtype(grad.dtype)  # QR / SVD precision
        acc = grad.clone()  # (m, n), A = G + E (with error_storage="grad", .grad already holds G + E)
        in_state = group["error_feedback"] and group["error_storage"] == "state"
        if in_state:
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
        if in_state:
            state["error"].copy_(error)
        elif ef:
            state["error_out"] = error  # written into .grad by _tensor_direction
        state["projector"] = proj
        direction = adam_direction(exp_avg, exp_avg_sq, low, beta1=beta1, beta2=beta2, eps=group["eps"], step=t)
        return proj @ direction  # (m, n)
