"""Clipping error feedback (DiceSGD; Zhang, Bu, Wu, Hong, ICLR 2024, arXiv 2311.14632) under a privacy bound
proven in docs/error_feedback.md.

The buffer E keeps, on the SUM scale of a logical batch, what clipping removed, and feeds it back clipped::

    V_t     = sum_{i in S_t} clip(g_i, C1) + clip(E_t, C2)          (the released sum, before noise)
    E_{t+1} = E_t + sum_{i in S_t} g_i - V_t,        E_0 = 0

``clip(E, C2)`` acts on the norm of the whole buffer; C1 is the total per-sample sensitivity of the clipped sum
(``tracker.total_max_norm``). Default C2 = C1. Accounting (``"worst_case"``, the only bound offered): noise std on
the sum z * (C1 + 2 C2) (Poisson, add/remove) or z * (2 C1 + 2 C2) (fixed batches, replace-one), and every step
recorded as a full-batch Gaussian with multiplier z: no amplification by subsampling. The buffer is SECRET (it
is in ``engine.state_dict()``). When feedback pays and when plain DP-SGD is better: docs/error_feedback.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Dict, List, Optional

import torch

from dptrain import distributed
from dptrain.mechanism import StepMechanism
from dptrain.validation import check_choice, check_positive

logger = logging.getLogger(__name__)

__all__ = ["ACCOUNTING_METHODS", "ErrorFeedback", "check_accounting", "dice_noise_scale", "sensitivity"]

ACCOUNTING_METHODS = ("worst_case",)


def check_accounting(name) -> str:
    """Validates ``error_feedback_accounting``; only the bound proven in docs/error_feedback.md is offered."""
    return check_choice("error_feedback_accounting", name, ACCOUNTING_METHODS)


def sensitivity(max_grad_norm: float, error_max_grad_norm: float, *, poisson_sampling: bool = True) -> float:
    """L2 sensitivity of the released sum V = sum_i clip(g_i, C1) + clip(E, C2) given the history and sampling.

    C1 + 2 C2 for add/remove adjacency (Poisson sampling), 2 C1 + 2 C2 for replace-one (fixed batches).
    """
    _check_thresholds(max_grad_norm, error_max_grad_norm)
    per_sample = max_grad_norm if poisson_sampling else 2.0 * max_grad_norm
    return per_sample + 2.0 * error_max_grad_norm


def dice_noise_scale(max_grad_norm: float, error_max_grad_norm: float, *, poisson_sampling: bool = True) -> float:
    """Factor on DP-SGD's noise std z * C1 that the bound needs: sensitivity / C1 (3 for C2 = C1 with Poisson sampling)."""
    return sensitivity(max_grad_norm, error_max_grad_norm, poisson_sampling=poisson_sampling) / max_grad_norm


def _check_thresholds(c1: float, c2: float) -> None:
    check_positive("max_grad_norm (C1)", c1)
    check_positive("error_max_grad_norm (C2)", c2)
    if c2 < c1:
        raise ValueError(
            f"error_max_grad_norm (C2) must be >= max_grad_norm (C1): C2 is the feedback per logical batch, "
            f"found C2={c2!r} < C1={c1!r}"
        )


class ErrorFeedback:
    """Gradient transform of a ``DPOptimizer``: DiceSGD's clipped error feedback, once per logical step.

    Registers two hooks on the optimizer: a mechanism hook making each step a full-batch Gaussian of sensitivity
    ``sensitivity(C1, C2)`` and noise std z times that, and a pre-noise hook that rewrites
    ``tracker.clipped_sum[p]`` to V (the sum above) and updates the fp32 sum-scale error buffer E (one per
    trainable parameter, SECRET) from ``tracker.unclipped_sum``. ``error_max_grad_norm=None`` means C2 = C1 (the
    current total threshold, also after C1 changes): the floor, never much worse than DP-SGD.
    """

    def __init__(self, optimizer, error_max_grad_norm: Optional[float] = None, *, poisson_sampling: bool = True,
                 accounting: str = "worst_case"):
        tracker = optimizer.tracker
        if not getattr(tracker, "track_unclipped", False):
            raise ValueError(
                "error feedback needs the unclipped per-sample gradient sum: build the tracker with "
                "track_unclipped=True (make_private(..., error_feedback=True) does)"
            )
        self.accounting = check_accounting(accounting)
        self.poisson_sampling = bool(poisson_sampling)
        self.error_max_grad_norm = None
        if error_max_grad_norm is not None:
            _check_thresholds(tracker.total_max_norm, error_max_grad_norm)
            self.error_max_grad_norm = float(error_max_grad_norm)
        self.params: List[torch.nn.Parameter] = [p for p in optimizer.params if p.requires_grad]
        self.error: Dict[torch.nn.Parameter, torch.Tensor] = {
            p: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params
        }  # sum scale
        self.steps = 0
        c1, c2 = self.thresholds(optimizer)
        logger.info("error feedback (DiceSGD): C1=%.4g, C2=%.4g per logical batch, noise std on the sum "
                    "z * %.4g (%s adjacency), ledger: full-batch Gaussian steps", c1, c2, c1 * self.noise_scale(optimizer),
                    "add/remove" if self.poisson_sampling else "replace-one")
        optimizer.mechanism_hooks.append(self.mechanism)
        optimizer.pre_noise_hooks.append(self)

    def thresholds(self, optimizer) -> tuple:
        """(C1, C2) at this step; C2 on the sum scale (feedback per logical batch)."""
        c1 = optimizer.tracker.total_max_norm
        c2 = c1 if self.error_max_grad_norm is None else self.error_max_grad_norm
        return c1, c2

    def noise_scale(self, optimizer) -> float:
        """Factor on z * C1 giving the noise std the bound needs at this step (raises if C1 > C2)."""
        return dice_noise_scale(*self.thresholds(optimizer), poisson_sampling=self.poisson_sampling)

    def error_norm(self) -> float:
        """Norm of the whole (sum-scale) buffer (private: for tests and debugging only, never release it)."""
        return math.sqrt(sum(float(e.double().pow(2).sum()) for e in self.error.values()))

    def mechanism(self, optimizer, mechanism: StepMechanism) -> StepMechanism:
        """Every step a full-batch Gaussian with the step's multiplier z at this bound's sensitivity."""
        bound = sensitivity(*self.thresholds(optimizer), poisson_sampling=self.poisson_sampling)  # raises if C1 > C2
        return dataclasses.replace(mechanism, noise_std=optimizer.noise_multiplier * bound, sensitivity=bound,
                                   sample_rate=1.0, sampling="full")

    @torch.no_grad()
    def __call__(self, optimizer, mechanism: StepMechanism) -> None:
        c1, c2 = self.thresholds(optimizer)
        tracker = optimizer.tracker
        clipped, full = [], []
        for p in self.params:
            cs, us = tracker.clipped_sum.get(p), tracker.unclipped_sum.get(p)
            if (cs is None) != (us is None):
                found, missing = ("clipped", "unclipped") if us is None else ("unclipped", "clipped")
                raise RuntimeError(
                    f"tracker holds the {found} sum of a parameter of shape {tuple(p.shape)} but not its {missing} "
                    "sum; error feedback needs both from the same backward"
                )
            zeros = None if cs is not None else torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            clipped.append(zeros if cs is None else cs.float())  # (*p.shape,) sum_i clip(g_i, C1)
            full.append(zeros if us is None else us.float())  # (*p.shape,) sum_i g_i
        world = distributed.rank_and_world()[1]
        if world > 1:  # the buffer follows the GLOBAL batch: identical on every rank
            reduced = distributed.all_reduce_sum(clipped + full)
            clipped, full = reduced[: len(self.params)], reduced[len(self.params):]
        errors = [self._error_on(p) for p in self.params]
        norm = torch.sqrt(sum(e.pow(2).sum() for e in errors))  # () whole-buffer norm
        factor = (c2 / norm.clamp_min(1e-30)).clamp(max=1.0)  # () min(1, C2 / ||E||), no host sync
        for p, e, cs, us in zip(self.params, errors, clipped, full):
            fed_back = factor * e  # clip(E, C2) restricted to p
            new_sum = cs + fed_back  # V
            e.add_(us - cs - fed_back)  # E + sum_i g_i - V
            tracker.clipped_sum[p] = new_sum / world  # ranks' shares all-reduce to V
        self.steps += 1

    def _error_on(self, p: torch.nn.Parameter) -> torch.Tensor:
        e = self.error[p]
        if e.device != p.device:
            e = self.error[p] = e.to(p.device)
        return e

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The error buffer (PRIVATE: the checkpoint must be protected like the data), C2 and the accounting."""
        return {
            "error": [self.error[p].detach().cpu().clone() for p in self.params],
            "error_scale": "sum",
            "error_max_grad_norm": self.error_max_grad_norm,
            "accounting": self.accounting,
            "poisson_sampling": self.poisson_sampling,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("error_scale") != "sum":
            raise ValueError(
                f"checkpoint holds an error buffer on the {state.get('error_scale', 'mean')!r} scale (older dptrain, "
                "other privacy accounting); this version keeps it on the 'sum' scale and cannot resume that run"
            )
        errors = state["error"]
        if len(errors) != len(self.params):
            raise ValueError(
                f"checkpoint has error buffers for {len(errors)} parameters, this model {len(self.params)}"
            )
        for i, (p, e) in enumerate(zip(self.params, errors)):
            if tuple(e.shape) != tuple(p.shape):
                raise ValueError(f"error buffer {i} has shape {tuple(e.shape)}, parameter {tuple(p.shape)}")
        for key, now in (("error_max_grad_norm", self.error_max_grad_norm), ("accounting", self.accounting),
                         ("poisson_sampling", self.poisson_sampling)):
            if state.get(key) != now:
                raise ValueError(f"checkpoint used {key}={state.get(key)!r}, this run {now!r}")
        for p, e in zip(self.params, errors):
            self.error[p] = e.to(device=p.device, dtype=torch.float32).clone()
        self.steps = int(state.get("steps", 0))
