"""Base class of the low-memory optimizers: the step loop, decoupled weight decay, AdamW fallback.

A subclass supplies the update *direction* for one canonical matrix ``(m, n)``, ``m <= n`` (see
:mod:`dptrain.optim._common`); the base class turns parameters into that view and back, applies
``p <- p * (1 - lr * weight_decay) - lr * direction`` and gives non-matrix parameters (bias, norm weights)
full-rank AdamW. Only ``p.grad`` is read, so under DP (the engine writes the privatised gradient to
``.grad``) every optimizer here is post-processing.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from dptrain.validation import check_nonnegative, check_positive, check_positive_int

from ._common import adam_direction, canonical_matrix, canonical_shape, check_betas, from_canonical, is_matrix

__all__ = ["LowMemoryOptimizer"]


class LowMemoryOptimizer(Optimizer):
    """Shared step loop; subclasses implement :meth:`_matrix_direction` and :meth:`_check_group`."""

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)

    # -- validation -----------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group and validate its options (common ones here, method ones in :meth:`_check_group`)."""
        super().add_param_group(param_group)  # fills the defaults in
        group = self.param_groups[-1]
        try:
            group["lr"] = check_positive("lr", group["lr"])
            group["weight_decay"] = check_nonnegative("weight_decay", group["weight_decay"])
            if "betas" in group:
                group["betas"] = check_betas(group["betas"])
            if "eps" in group:
                group["eps"] = check_nonnegative("eps", group["eps"])
            self._check_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()  # a rejected group must not stay in the optimizer
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate method options of ``group`` (override)."""

    @staticmethod
    def _matrix_shapes(group: dict[str, Any]) -> list[tuple[int, int, tuple[int, ...]]]:
        """Canonical ``(m, n)`` and the original shape of each matrix parameter in ``group``."""
        return [(*canonical_shape(p.shape), tuple(p.shape)) for p in group["params"] if is_matrix(p)]

    # -- checkpoints ------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does, but keep each saved state tensor's dtype.

        torch casts every floating-point state tensor to its parameter's dtype; state kept on purpose in
        another dtype (MicroAdam's bf16 ring buffer, fp32 statistics of a bf16 model) must come back as saved.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                current = self.state[p].get(key)
                if isinstance(value, Tensor) and isinstance(current, Tensor) and current.dtype != value.dtype:
                    self.state[p][key] = value.to(device=current.device, copy=True)

    # -- the step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter with a ``.grad`` from that gradient only."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"{type(self).__name__} does not support sparse gradients (parameter {index - 1})")
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                direction = self._tensor_direction(p.grad, state, group, index - 1)
                if group["weight_decay"] != 0:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(direction.to(p.dtype), alpha=-group["lr"])
        return loss

    def _tensor_direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> Tensor:
        """Direction for one parameter: the matrix rule on the canonical view, the AdamW fallback otherwise."""
        if not is_matrix(grad):
            return self._vector_direction(grad, state, group, index)
        mat, transposed = canonical_matrix(grad)  # (m, n), m <= n
        direction = self._matrix_direction(mat, state, group, index)  # (m, n)
        return from_canonical(direction, transposed, grad.shape)

    def _matrix_direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> Tensor:
        """Direction for a canonical matrix gradient ``(m, n)``; ``state['step']`` is already incremented."""
        raise NotImplementedError

    def _vector_direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> Tensor:
        """Full-rank Adam direction for non-matrix parameters (the documented fallback)."""
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        beta1, beta2 = group["betas"]
        return adam_direction(state["exp_avg"], state["exp_avg_sq"], grad, beta1=beta1, beta2=beta2,
                              eps=group["eps"], step=state["step"])


def resolve_rank(rank: int | None, m: int, fraction: float = 0.25) -> int:
    """Rank for a canonical ``(m, n)`` matrix: ``rank`` if given, else ``ceil(fraction * m)``."""
    return rank if rank is not None else max(1, math.ceil(fraction * m))


def check_rank(group: dict[str, Any], name: str = "rank") -> None:
    """``rank`` (None = default) must be a positive int no larger than any matrix's smaller side."""
    rank = group[name]
    if rank is None:
        return
    rank = check_positive_int(name, rank)
    for m, n, shape in LowMemoryOptimizer._matrix_shapes(group):
        if rank > m:
            raise ValueError(f"{name}={rank} is larger than the smaller side {m} of a parameter of shape "
                             f"{'x'.join(map(str, shape))} (as a {m}x{n} matrix); expected {name} <= {m}")
