"""``SACController``: a Soft Actor-Critic hyper-policy that sets clip thresholds and sigma during DP training.

Attach it with ``engine.make_private(..., controller=ctrl, target_epsilon=, target_delta=, epochs=)``. Every
``interval`` logical steps it observes, acts and learns:

What it observes (obs vector, dim 2G + 5 for G clipping groups) and how each part is privatised:
- per-group unclipped fraction b_g of the LAST logical batch: PRIVATE, released with Gaussian noise from the
  optimizer's secret source (see ``release.py``; Andrew et al. 2021, s = m/20 by default). It is computed on
  the SAME Poisson batch as that step's gradient, so the step's ``StepMechanism`` carries it: the ledger
  records one subsampled Gaussian with z = (sigma^-2 + (s / sqrt(k))^-2)^(-1/2) (k released coordinates);
- loss: ``validation_loss()`` if given (the user promises it is PUBLIC data: not accounted), else with
  ``loss_bound=L`` a noisy mean of the batch's per-sample losses clipped to [0, L] (PRIVATE: one more
  coordinate of the same release, so it is in the same accounted event), else none (reward 0);
- log(C_g / C_g at attach), log(sigma / sigma_ref), log(sigma_floor / sigma_ref), epsilon spent / target,
  steps done / planned: PUBLIC (functions of the settings, the ledger and earlier releases).

What it does (action in [-1, 1]^(G+1)): C_g <- clip(C_g * q_g * max_factor^a_g, min_clip, max_clip), where
q_g = exp(-quantile_lr * (clip(b_g, 0, 1) - quantile_target)) is the geometric quantile step of Andrew et al.
computed from the released b_g (post-processing; q_g = 1 with ``quantile_target=None``), so the action is a
learned correction around private adaptive clipping; sigma <-
max(sigma_floor, exp(log sigma_min + (a_G + 1)/2 * log(sigma_max / sigma_min))). The floor comes from the
budget guard (``budget.py``): it makes the planned rest of the run, its releases included, end at or under
``target_epsilon``. A guard before every step's noise raises ``BudgetExhaustedError`` (and drops the batch,
nothing released or accounted) if a step would not fit, e.g. training past the planned steps.

Planning uses the engine's accountant when it is RDP; with PLD the floor, the guard and the observed
epsilon use an RDP replay of the same ledger (an upper bound, fast enough for ~15 probes per action). PLD is the
tighter bound, so the engine's PLD epsilon then ends at or below the target as well (up to PLD's reported
discretisation error); the price is a sigma ~5% above what PLD alone would allow. ``history[i]["epsilon"]``
is the planning epsilon.

Reward of the interval that just ended: loss improvement per unit of epsilon spent,
    r = clip( ((L_prev - L) / |L_first|) / max((eps - eps_prev) / (target_epsilon / K), 0.1), -10, 10 )
with K the planned number of intervals (spending the budget uniformly gives a denominator near 1).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from dptrain import distributed
from dptrain.accountants import RDPAccountant
from dptrain.control.budget import BudgetExhaustedError, planned_epsilon, sigma_floor
from dptrain.control.release import release_noise_multiplier, release_statistics
from dptrain.control.sac import SAC

logger = logging.getLogger(__name__)

__all__ = ["SACController"]

_SIGMA_CAP = 1e4  # search limit for the floor when the user gives no sigma_max


def _positive_or_none(value, name: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, found {value!r}")
    return float(value)


def _check_bounds(low, high, what: str) -> None:
    if low is not None and high is not None and not low < high:
        raise ValueError(f"{what} bounds are inverted or empty: lower {low} must be < upper {high}")


class SACController:
    """Adaptive per-group clip thresholds and noise multiplier chosen by an online SAC agent, within budget."""

    def __init__(
        self,
        interval: int = 10,
        *,
        seed: Optional[int] = None,
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        min_clip: Optional[float] = None,
        max_clip: Optional[float] = None,
        max_factor: float = 1.25,
        release_noise_std: Optional[float] = None,
        validation_loss: Optional[Callable[[], float]] = None,
        loss_bound: Optional[float] = None,
        quantile_target: Optional[float] = 0.5,
        quantile_lr: float = 0.2,
        warmup: int = 0,
        updates_per_action: int = 20,
        policy: Optional[Callable[[np.ndarray], Sequence[float]]] = None,
        sac_kwargs: Optional[dict] = None,
    ):
        """``policy``: optional fixed map obs -> action in [-1, 1]^(G+1) replacing the SAC agent (baselines, tests).

        ``warmup``: actions drawn uniformly before the replay buffer holds this many transitions;
        ``updates_per_action``: SAC gradient steps after each new transition; ``sac_kwargs``: passed to ``SAC``
        (default ``init_log_std=-1``: a narrow initial policy, so early exploration does not wreck the run).

        ``sigma_min``/``sigma_max`` default to 1/2 and 2 times the sigma floor at attach (action 0 then asks for
        the floor: the uniform schedule); ``min_clip``/``max_clip`` to 1/100 of the smallest and 100 times the
        largest initial threshold; ``max_factor``: thresholds change by at most [1/f, f] per action (besides the
        quantile step).
        """
        if isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0:
            raise ValueError(f"interval must be a positive integer (logical steps between actions), found {interval!r}")
        self.sigma_min = _positive_or_none(sigma_min, "sigma_min")
        self.sigma_max = _positive_or_none(sigma_max, "sigma_max")
        self.min_clip = _positive_or_none(min_clip, "min_clip")
        self.max_clip = _positive_or_none(max_clip, "max_clip")
        _check_bounds(self.sigma_min, self.sigma_max, "sigma (sigma_min, sigma_max)")
        _check_bounds(self.min_clip, self.max_clip, "clip threshold (min_clip, max_clip)")
        if isinstance(max_factor, bool) or not isinstance(max_factor, (int, float)) or not max_factor > 1:
            raise ValueError(f"max_factor must be a number > 1 (thresholds change by [1/f, f]), found {max_factor!r}")
        self.release_noise_std = _positive_or_none(release_noise_std, "release_noise_std")
        self.loss_bound = _positive_or_none(loss_bound, "loss_bound")
        if quantile_target is not None and not (isinstance(quantile_target, (int, float)) and 0 < quantile_target < 1):
            raise ValueError(f"quantile_target must be in (0, 1) or None, found {quantile_target!r}")
        if isinstance(quantile_lr, bool) or not isinstance(quantile_lr, (int, float)) or quantile_lr < 0:
            raise ValueError(f"quantile_lr must be a number >= 0, found {quantile_lr!r}")
        self.quantile_target, self.quantile_lr = quantile_target, float(quantile_lr)
        if validation_loss is not None and not callable(validation_loss):
            raise TypeError(f"validation_loss must be a callable returning a float, found {type(validation_loss).__name__}")
        if validation_loss is not None and loss_bound is not None:
            raise ValueError("give validation_loss (public) or loss_bound (noisy training loss), not both")
        for name, value in (("warmup", warmup), ("updates_per_action", updates_per_action)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, found {value!r}")
        self.interval, self.seed, self.max_factor = interval, seed, float(max_factor)
        self.validation_loss, self.warmup, self.updates_per_action = validation_loss, warmup, updates_per_action
        self.policy, self.sac_kwargs = policy, {"init_log_std": -1.0, **(sac_kwargs or {})}
        self.engine = None
        self.agent: Optional[SAC] = None
        self.history: List[dict] = []
        self._loss_sum = 0.0

    # ------------------------------------------------------------------ set-up
    def attach(self, engine, *, target_epsilon: float, target_delta: float, total_steps: int) -> None:
        """Called by ``make_private``: plans the budget, installs the step guard and the step callback."""
        if self.engine is not None:
            raise ValueError("this SACController is already attached to an engine; create one per run")
        if not (isinstance(target_epsilon, (int, float)) and math.isfinite(target_epsilon) and target_epsilon > 0):
            raise ValueError(f"target_epsilon must be a finite number > 0, found {target_epsilon!r}")
        if not (isinstance(target_delta, (int, float)) and 0 < target_delta < 1):
            raise ValueError(f"target_delta must be in (0, 1), found {target_delta!r}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive integer, found {total_steps!r}")
        tracker, optimizer = engine.tracker, engine.optimizer
        if tracker.clipping == "automatic":
            raise ValueError("SACController needs clipping='flat' or 'per_layer' (automatic clipping clips nothing "
                             "to count), found 'automatic'")
        if distributed.rank_and_world()[1] > 1:
            raise ValueError("SACController does not support several ranks yet (its counts are not all-reduced)")
        self.engine, self.target_epsilon, self.target_delta = engine, float(target_epsilon), float(target_delta)
        self.total_steps, self.sample_rate = total_steps, float(engine.sample_rate)
        self.num_groups = len(tracker.groups)
        self.expected_batch_size = optimizer.expected_batch_size
        noise_std = self.release_noise_std or self.expected_batch_size / 20
        self.release_coordinates = self.num_groups + (self.loss_bound is not None)
        self.release_noise_std_used = noise_std
        self.release_sigma = release_noise_multiplier(noise_std, self.release_coordinates)
        self.initial_max_norms = [g.max_norm for g in tracker.groups]
        self.min_clip_used = self.min_clip or min(self.initial_max_norms) / 100
        self.max_clip_used = self.max_clip or max(self.initial_max_norms) * 100
        _check_bounds(self.min_clip_used, self.max_clip_used, "clip threshold (min_clip, max_clip)")
        outside = [c for c in self.initial_max_norms if not self.min_clip_used <= c <= self.max_clip_used]
        if outside:
            raise ValueError(f"initial max_grad_norm {outside} outside [min_clip, max_clip] = "
                             f"[{self.min_clip_used}, {self.max_clip_used}]")

        done = optimizer.steps_taken
        try:
            floor = self._floor(done, self.sigma_max or _SIGMA_CAP)
        except BudgetExhaustedError as err:
            raise ValueError(
                f"the planned run does not fit the budget: {err}. Each of the {self.releases_planned} statistic "
                f"releases has noise multiplier {self.release_sigma:.4g} (release_noise_std={noise_std:.4g}); raise "
                "release_noise_std or interval, or target_epsilon"
            ) from None
        self.sigma_max_used = self.sigma_max or 2 * floor
        self.sigma_min_used = self.sigma_min or floor / 2
        _check_bounds(self.sigma_min_used, self.sigma_max_used, "sigma (sigma_min, sigma_max)")
        if optimizer.noise_multiplier < floor:
            logger.info("controller: sigma %.4g -> %.4g so that the planned steps AND the statistic releases fit "
                        "target_epsilon=%g", optimizer.noise_multiplier, floor, target_epsilon)
            optimizer.noise_multiplier = floor
        self.sigma_ref = optimizer.noise_multiplier
        self._planned_sigma = optimizer.noise_multiplier
        self._eps_fair = self.target_epsilon / max(1, total_steps // self.interval)

        self.agent = SAC(2 * self.num_groups + 5, self.num_groups + 1, seed=self.seed, **self.sac_kwargs)
        self._prev = None  # (obs, action, loss, epsilon) at the last action
        self._loss_scale = None
        tracker.reset_statistics()
        optimizer.mechanism_hooks.append(self._add_release)
        optimizer.pre_noise_hooks.insert(0, self._guard)  # before the noise: a refused step releases nothing
        optimizer.step_callbacks.append(self._on_step)
        self.history.append(self._entry(done, reward=None, epsilon=self._epsilon(),
                                        floor=floor, released=None, loss=None, action=None))
        if self.validation_loss is None and self.loss_bound is None and self.policy is None:
            logger.warning("SACController has no loss signal (give validation_loss or loss_bound and call "
                           "observe_losses): rewards are 0 and the policy only explores")

    @property
    def releases_planned(self) -> int:
        """Statistic releases in the whole planned run (one per action)."""
        return (self.total_steps - 1) // self.interval

    def _is_release_step(self, done: int) -> bool:
        """Whether the step that brings the count to ``done`` ends with an action (and its release)."""
        return done < self.total_steps and done % self.interval == 0

    def _releases_after(self, done: int) -> int:
        return (self.total_steps - 1) // self.interval - min(done, self.total_steps - 1) // self.interval

    def _planning_accountant(self):
        """The engine's accountant if it is RDP; else an RDP replay of its ledger.

        A PLD accountant composes exactly but one epsilon costs seconds to minutes, and the floor search needs
        ~15 of them per action. RDP bounds the same ledger from above (PLD is usually 5-80% tighter), so a plan
        that fits under RDP also fits the true privacy loss; PLD then reports a value at or below the target.
        """
        accountant = self.engine.accountant
        if isinstance(accountant, RDPAccountant):
            return accountant
        replay = RDPAccountant()
        for sigma, q, steps in accountant.history:
            replay.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
        return replay

    def _epsilon(self) -> float:
        """Epsilon spent so far, as the planning accountant sees it (the engine's own when it is RDP)."""
        return self._planning_accountant().get_epsilon(self.target_delta)

    def _floor(self, done: int, sigma_max: float) -> float:
        return sigma_floor(
            self._planning_accountant(), target_epsilon=self.target_epsilon, delta=self.target_delta,
            sample_rate=self.sample_rate, steps=max(self.total_steps - done, 0), sigma_max=sigma_max,
            release_noise_multiplier=self.release_sigma, releases=self._releases_after(done),
        )

    # ------------------------------------------------------------------ private inputs
    def observe_losses(self, losses: torch.Tensor) -> None:
        """Per-sample losses (B,) of the current micro-batch, for the noisy loss release (needs ``loss_bound``).

        Call it before ``optimizer.step()``; only the batch of a release step is used, clipped to [0, loss_bound].
        """
        if self.loss_bound is None:
            raise ValueError("observe_losses needs SACController(loss_bound=...) (the per-sample loss clip)")
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            raise ValueError(f"losses must be a 1-D tensor of per-sample losses, found "
                             f"{getattr(losses, 'shape', type(losses).__name__)}")
        self._loss_sum += float(losses.detach().float().clamp(0, self.loss_bound).sum())

    # ------------------------------------------------------------------ hooks on the optimizer
    def _add_release(self, optimizer, mechanism):
        """A release step's statistics come from the step's own batch: one joint mechanism with the gradient."""
        if self._is_release_step(optimizer.steps_taken + 1):
            return mechanism.with_release(self.release_sigma)
        return mechanism

    def _guard(self, optimizer, mechanism) -> None:
        """Refuses a step that would leave the budget (runs before the noise is drawn)."""
        done, sigma = optimizer.steps_taken, optimizer.noise_multiplier
        if done < self.total_steps and sigma >= self._planned_sigma:
            return  # the plan checked at the last action covers this step
        steps = max(self.total_steps - done, 1)
        eps = planned_epsilon(self._planning_accountant(), self.target_delta, sample_rate=self.sample_rate,
                              noise_multiplier=sigma, steps=steps, release_noise_multiplier=self.release_sigma,
                              releases=self._releases_after(done))
        if eps > self.target_epsilon:
            optimizer.tracker.reset()  # the dropped batch must not reach a later release either
            optimizer.tracker.reset_statistics()
            self._loss_sum = 0.0
            raise BudgetExhaustedError(
                f"step {done + 1} at sigma={sigma:.4g} would bring epsilon to {eps:.4g} > target_epsilon="
                f"{self.target_epsilon} (planned steps: {self.total_steps}); the batch was dropped, nothing released"
            )

    def _on_step(self, optimizer, mechanism) -> None:
        done = optimizer.steps_taken + 1  # this step is accounted, its inner update not yet applied
        try:
            if self._is_release_step(done):
                if len(mechanism.releases) != 1 or mechanism.releases[0] != self.release_sigma:
                    raise RuntimeError(f"step {done}'s mechanism does not carry the controller's release "
                                       f"({mechanism.releases}); refusing to release unaccounted statistics")
                self._act(done)
        finally:
            self.engine.tracker.reset_statistics()
            self._loss_sum = 0.0

    # ------------------------------------------------------------------ one control step
    def _release(self):
        tracker = self.engine.tracker
        counts = [tracker.num_samples - tracker.clipped_count[g.name] for g in tracker.groups]  # private
        noise = self.engine.optimizer.release_noise(self.release_coordinates, self.release_noise_std_used)
        return release_statistics(  # accounted with this step's gradient (its mechanism carries the release)
            counts, expected_batch_size=self.expected_batch_size, noise=noise,
            loss_sum=self._loss_sum if self.loss_bound is not None else None, loss_bound=self.loss_bound,
        )

    def _observe_loss(self, released) -> Optional[float]:
        if self.validation_loss is not None:
            with torch.no_grad(), self.engine.tracker.capture_disabled():
                return float(self.validation_loss())
        return released.loss

    def _act(self, done: int) -> None:
        released = self._release()
        loss = self._observe_loss(released)
        epsilon = self._epsilon()
        floor = self._floor(done, self.sigma_max_used)
        if loss is not None and self._loss_scale is None:
            self._loss_scale = max(abs(loss), 1e-8)
        obs = self._observation(released, loss, epsilon, done, floor)
        reward = None
        if self._prev is not None:
            reward = self._reward(self._prev[2], loss, self._prev[3], epsilon)
            self.agent.store(self._prev[0], self._prev[1], reward, obs, False)
            if len(self.agent.buffer) >= 1 and self.policy is None:
                for _ in range(self.updates_per_action):
                    self.agent.update()
        action = self._choose(obs)
        self._apply(action, floor, released.unclipped_fraction)
        self.history.append(self._entry(done, reward=reward, epsilon=epsilon, floor=floor, released=released,
                                        loss=loss, action=action))
        self._prev = (obs, action, loss, epsilon)
        logger.info("controller step %d: sigma=%.4g (floor %.4g), C=%s, eps=%.4g, reward=%s", done,
                    self.engine.optimizer.noise_multiplier, floor, self.history[-1]["max_grad_norm"], epsilon, reward)

    def _observation(self, released, loss, epsilon, done, floor) -> np.ndarray:
        norms = [g.max_norm for g in self.engine.tracker.groups]
        sigma = self.engine.optimizer.noise_multiplier
        loss_feature = 0.0 if loss is None or self._loss_scale is None else loss / self._loss_scale - 1
        obs = (
            [min(max(b, -0.5), 1.5) for b in released.unclipped_fraction]
            + [math.log(c / c0) for c, c0 in zip(norms, self.initial_max_norms)]
            + [math.log(sigma / self.sigma_ref), math.log(max(floor, 1e-3 * self.sigma_ref) / self.sigma_ref),
               epsilon / self.target_epsilon, done / self.total_steps, max(min(loss_feature, 5.0), -5.0)]
        )
        return np.asarray(obs, np.float64)

    def _reward(self, loss_prev, loss, eps_prev, eps) -> float:
        if loss is None or loss_prev is None:
            return 0.0
        improvement = (loss_prev - loss) / self._loss_scale
        spent = max(eps - eps_prev, 0.0) / self._eps_fair
        return float(np.clip(improvement / max(spent, 0.1), -10.0, 10.0))

    def _choose(self, obs: np.ndarray) -> np.ndarray:
        if self.policy is not None:
            action = np.asarray(self.policy(obs), np.float64).reshape(-1)
            if action.shape != (self.num_groups + 1,):
                raise ValueError(f"policy must return {self.num_groups + 1} values, found shape {action.shape}")
            return np.clip(action, -1.0, 1.0)
        if len(self.agent.buffer) < self.warmup:
            return self.agent.random_action()
        return self.agent.act(obs)

    def _apply(self, action: np.ndarray, floor: float, unclipped: Sequence[float]) -> None:
        tracker, optimizer = self.engine.tracker, self.engine.optimizer
        factors = self.max_factor ** action[: self.num_groups]
        if self.quantile_target is not None:  # Andrew et al.'s geometric step on the released fractions
            factors = factors * np.exp(-self.quantile_lr * (np.clip(unclipped, 0.0, 1.0) - self.quantile_target))
        norms = [float(np.clip(g.max_norm * f, self.min_clip_used, self.max_clip_used))
                 for g, f in zip(tracker.groups, factors)]
        tracker.set_max_norms(norms)
        lo, hi = math.log(self.sigma_min_used), math.log(self.sigma_max_used)
        requested = math.exp(lo + (float(action[-1]) + 1) / 2 * (hi - lo))
        optimizer.noise_multiplier = max(requested, floor)
        self._planned_sigma = optimizer.noise_multiplier

    def _entry(self, done, *, reward, epsilon, floor, released, loss, action) -> dict:
        return {
            "step": done,
            "noise_multiplier": self.engine.optimizer.noise_multiplier,
            "max_grad_norm": [g.max_norm for g in self.engine.tracker.groups],
            "reward": reward,
            "epsilon": epsilon,
            "sigma_floor": floor,
            "clip_fraction": None if released is None else [1 - b for b in released.unclipped_fraction],
            "loss": loss,
            "action": None if action is None else [float(a) for a in action],
        }

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        if self.engine is None:
            raise ValueError("state_dict() before attach(): nothing to save")
        return copy.deepcopy({
            "settings": {"interval": self.interval, "total_steps": self.total_steps, "num_groups": self.num_groups},
            "agent": self.agent.state_dict(), "history": self.history,
            "prev": self._prev, "loss_scale": self._loss_scale, "planned_sigma": self._planned_sigma,
            "sigma_ref": self.sigma_ref, "sigma_bounds": (self.sigma_min_used, self.sigma_max_used),
            "initial_max_norms": self.initial_max_norms,
        })

    def load_state_dict(self, state: dict) -> None:
        if self.engine is None:
            raise ValueError("load_state_dict() needs attach() first (make_private with this controller)")
        mine = {"interval": self.interval, "total_steps": self.total_steps, "num_groups": self.num_groups}
        if state["settings"] != mine:
            raise ValueError(f"checkpoint controller settings {state['settings']} differ from this run's {mine}")
        state = copy.deepcopy(state)
        self.agent.load_state_dict(state["agent"])
        self.history, self._prev, self._loss_scale = state["history"], state["prev"], state["loss_scale"]
        self._planned_sigma, self.sigma_ref = state["planned_sigma"], state["sigma_ref"]
        self.sigma_min_used, self.sigma_max_used = state["sigma_bounds"]
        self.initial_max_norms = state["initial_max_norms"]
