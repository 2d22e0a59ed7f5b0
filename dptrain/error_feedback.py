"""Clipping error feedback (DiceSGD; Zhang, Bu, Wu, Hong, ICLR 2024, arXiv 2311.14632), with a privacy bound
proven here.

Per-sample clipping biases DP-SGD towards a point that depends on the threshold C1. DiceSGD keeps the part
that clipping removed in a hidden error buffer and feeds it back, clipped. dptrain keeps the buffer ``E`` on
the SUM scale of a logical batch (B = the optimizer's expected batch size)::

    V_t     = sum_{i in S_t} clip(g_i, C1) + clip(E_t, C2)          (the released sum, before noise)
    E_{t+1} = E_t + sum_{i in S_t} g_i - V_t,        E_0 = 0
    x_{t+1} = inner_optimizer(x_t, (V_t + N(0, s^2 I)) / B)

``clip(E, C2)`` acts on the norm of the WHOLE buffer (all trainable parameters together); C1 is the total
per-sample sensitivity of the clipped sum (``tracker.total_max_norm``; per-layer: sqrt(sum_l C_l^2)).
Deviation from the paper's pseudo-code: the paper clips the MEAN-scale buffer e = E/B at C2; here the
sum-scale E is clipped at C2, i.e. e at C2/B (as the authors' fastDP-based code does), so C2 is the feedback's
budget per logical batch and enters the sensitivity as it is. Default C2 = C1 (the floor): the cheapest feedback,
noise 3x DP-SGD's at the same z instead of (2 B + 1)x. The paper's C2 = C1 on the mean scale is C2 = C1 * B here:
near an optimum sum_i g_i ~ 0, so the bias to feed back, ||sum_i (g_i - clip(g_i, C1))|| = ||sum_i clip(g_i, C1)||,
is at most C1 * B, and C2 >= C1 * B is the paper's convergence condition; but its noise made runs diverge (5-dim
mean estimation at eps 8, 5% outliers: 25 to 250 away from the optimum where DP-SGD ends 1.2; tests/error_feedback).
A C2 between C1 and C1 * B corrects part of the bias per step at proportionally more noise (below).

Privacy: the bound implemented (``error_feedback_accounting="worst_case"``, the only one offered).
Claim: with Poisson sampling and noise std on the sum s = z * (C1 + 2 C2), T logical steps satisfy, for
add/remove-one adjacency, the RDP curve (and the (eps, delta) trade-off) of T compositions of the Gaussian
mechanism with noise multiplier z, NO subsampling: the ledger records (noise_multiplier=z, sample_rate=1)
per logical step and ``target_epsilon`` calibrates z at sample rate 1.
Proof. Let D' = D + {x*}. Let R be all randomness independent of the data: the Poisson coins of every record
(x*'s included; the run on D ignores it), dropout, etc. Couple the runs on D and D' on the same R.
(1) Given R and the released history Y_<t, both runs hold the same x_t (x_t is a function of Y_<t, R and
    the public initialisation), the same batch up to x*, and hidden buffers E_t, E'_t that are functions of
    (Y_<t, R, data). So Y_t is N(V_t, s^2 I) vs N(V'_t, s^2 I) with
    ||V'_t - V_t|| <= ||clip(g*, C1)|| [x* in S_t] + ||clip(E'_t, C2)|| + ||clip(E_t, C2)|| <= C1 + 2 C2.
    Its Renyi divergence of order a > 1 is a ||V'_t - V_t||^2 / (2 s^2) <= a / (2 z^2), in both directions,
    whatever the history; its trade-off curve is at least the Gaussian one G_{1/z} (Dong, Roth, Su 2019).
(2) Adaptive composition (Mironov 2017, Prop. 1; for f-DP, Dong et al. Thm 3.2): given R, the transcript
    (Y_1..Y_T) satisfies a T / (2 z^2) at every order a, and the trade-off G_{sqrt(T)/z}.
(3) The released distributions are mixtures over R with the same weights for D and D'. For a > 1,
    exp((a-1) D_a(P||Q)) = int p^a q^(1-a) is jointly convex in (p, q) (perspective of the convex t^a), and
    the hockey-stick divergence behind (eps, delta) is an f-divergence, jointly convex too; Jensen over R
    keeps both bounds of (2). The inner optimizer, the iterates and anything computed from Y is
    post-processing. QED.
So the reported epsilon is that of T full-batch Gaussian steps with multiplier z; RDP and PLD accountants both
apply. It is CONSERVATIVE: no amplification by subsampling (the buffer carries x*'s past inclusions into every
later step, so conditioning on R is where the argument pays), and ||V' - V|| <= C1 + 2 C2 is a worst case.
A sharper bound also follows from (1)-(3) (steps before x*'s first inclusion have zero divergence, the first
one sensitivity C1), but it needs a custom ledger event and is not implemented.
With ``poisson_sampling=False`` (fixed batches from the loader's order, part of R) adding a record would move
the others between batches, so the proof is run for replace-one adjacency instead: the batches agree up to the
replaced record, ||V' - V|| <= 2 C1 + 2 C2, and the noise is s = z * (2 C1 + 2 C2); the reported epsilon is
then for replace-one adjacency.
Assumptions: the buffer E (and anything computed from it) is never released: it is in ``engine.state_dict()``,
so checkpoints must be protected like the data; sampling randomness independent of the data; every release in
the run goes through this ledger (a controller's subsampled statistic releases would not fit it: refused).
The floor C2 >= C1 is a sanity check (checked at every step, as C1 may change), not needed by this bound: it
holds for whatever C1, C2 and z each step uses, because the ledger records z per step and s is recomputed from
the current C1 and C2.

The paper's own privacy theorem is not offered as an option: its statement could not be checked here against
what this code does (the stored paper text lacks its formulas; the authors' public code variants use different
noise settings: 2*sigma*C on a sum-scale buffer in one, independent sigma*C1 and sigma*C2 noises on a
mean-scale buffer with sigma calibrated for epochs*int(log(epochs)) epochs in another), and no argument for the
hidden state's subsampling amplification was found.

When does it pay? DP-SGD's clipping bias does not shrink with more data or more privacy budget; DiceSGD's
price under this bound is noise of std z * (C1 + 2 C2) / B per coordinate and step on the mean scale (3 z C1 / B
at the default C2 = C1; about 2 z C1 at C2 = C1 * B, like DP-SGD with a batch of 1/2), z calibrated at sample rate
1 (with Poisson batches at rate q < 1 that z is larger than DP-SGD's, which is amplified by q), and the iterate can
move at most lr * (C1 + C2 / B) per step while that noise pushes it around. So DiceSGD wins only where DP-SGD's
bias is large next to the noise it must accept: full batches, low dimension, a small C1, a generous budget, and a
C2 well above the default (which is safe but removes little bias: at most C1 per step). Measured
(benchmarks/RESULTS.md, error_feedback; mean estimation, 5% of the points 25 away, d=2, delta=1e-5, best of a
small grid, full batch): eps=2: DiceSGD 1.22 +- 0.39 vs DP-SGD 1.18-1.23 (no gain); eps=8: 0.75 vs 1.23 (C1 =
0.1); eps=32: 0.44 vs 1.23, the issue's "at most half as far" holds (also in the test suite). On logistic
regression with a heavy-tailed feature DiceSGD loses at eps=2 and eps=8 (excess loss 1.32 / 0.32 vs 0.008).
In high dimension (language models) or at small epsilon, plain DP-SGD is better.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Dict, List, Optional

import torch

from dptrain import distributed
from dptrain.mechanism import StepMechanism

logger = logging.getLogger(__name__)

__all__ = ["ACCOUNTING_METHODS", "ErrorFeedback", "check_accounting", "dice_noise_scale", "sensitivity"]

ACCOUNTING_METHODS = ("worst_case",)


def check_accounting(name) -> str:
    """Validates ``error_feedback_accounting``; only the bound proven in this module's docstring is offered."""
    if name == "paper":
        raise ValueError(
            "error_feedback_accounting='paper' is not offered: the DiceSGD paper's privacy theorem could not be "
            "checked against this implementation (see dptrain.error_feedback); use 'worst_case'"
        )
    if name not in ACCOUNTING_METHODS:
        raise ValueError(f"error_feedback_accounting must be one of {ACCOUNTING_METHODS}, found {name!r}")
    return name


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
    if not (isinstance(c1, (int, float)) and math.isfinite(c1) and c1 > 0):
        raise ValueError(f"max_grad_norm (C1) must be a finite number > 0, found {c1!r}")
    if isinstance(c2, bool) or not isinstance(c2, (int, float)):
        raise TypeError(f"error_max_grad_norm (C2) must be a number, found {c2!r}")
    if not (math.isfinite(c2) and c2 > 0):
        raise ValueError(f"error_max_grad_norm (C2) must be a finite number > 0, found {c2!r}")
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
