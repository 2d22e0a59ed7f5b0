"""``SACController``: a Soft Actor-Critic hyper-policy that sets clip thresholds and sigma during DP training.

Attach it with ``engine.make_private(..., controller=ctrl, target_epsilon=, target_delta=, epochs=)``. Every
``interval`` logical steps it releases noisy statistics of that step's batch (``release.py``: accounted jointly
with the step's gradient), observes, learns and acts (``policy.py``), within a budget plan whose sigma floor
keeps the planned rest of the run at or under ``target_epsilon`` (``planning.py``, ``budget.py``). A guard
before every step's noise raises ``BudgetExhaustedError`` (and drops the batch, nothing released or accounted)
if a step would not fit, e.g. training past the planned steps. Checkpoints: ``state.py``.

The loss signal is ``validation_loss()`` if given (the user promises it is PUBLIC data: not accounted), else with
``loss_bound=L`` a noisy mean of the batch's per-sample losses clipped to [0, L] (one more coordinate of the
accounted release), else none (reward 0). ``history[i]["epsilon"]`` is the planning epsilon (RDP).
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from dptrain import distributed
from dptrain.control.budget import BudgetExhaustedError
from dptrain.control.planning import BudgetPlan
from dptrain.control.policy import ActionSpace, HyperPolicy
from dptrain.control.release import StatisticReleases
from dptrain.control.sac import SAC
from dptrain.control.state import controller_state, history_entry, load_controller_state
from dptrain.validation import check_int, check_nonnegative, check_number, check_positive, check_positive_int, check_probability

logger = logging.getLogger(__name__)

__all__ = ["SACController"]

_SIGMA_CAP = 1e4  # search limit for the floor when the user gives no sigma_max


def _positive_or_none(value, name: str) -> Optional[float]:
    return None if value is None else check_positive(name, value)


def _check_bounds(low, high, what: str) -> None:
    if low is not None and high is not None and not low < high:
        raise ValueError(f"{what} bounds are inverted or empty: lower {low} must be < upper {high}")


def _check_loss_signal(validation_loss, loss_bound) -> None:
    if validation_loss is not None and not callable(validation_loss):
        raise TypeError(f"validation_loss must be a callable returning a float, found {type(validation_loss).__name__}")
    if validation_loss is not None and loss_bound is not None:
        raise ValueError("give validation_loss (public) or loss_bound (noisy training loss), not both")


def _first_floor(plan: BudgetPlan, releases: StatisticReleases, sigma_max: float, optimizer) -> float:
    """The floor at attach; a plan that cannot fit is a set-up error, with what to change."""
    try:
        return plan.floor(optimizer.steps_taken, sigma_max, optimizer.noise_multiplier)
    except BudgetExhaustedError as err:
        raise ValueError(
            f"the planned run does not fit the budget: {err}. Each of the {plan.releases_planned} statistic "
            f"releases has noise multiplier {releases.noise_multiplier:.4g} (release_noise_std="
            f"{releases.noise_std:.4g}); raise release_noise_std or interval, or target_epsilon"
        ) from None


def _check_run(engine, target_epsilon, target_delta, total_steps) -> None:
    """The engine and the run's budget are ones the controller can plan for."""
    check_positive("target_epsilon", target_epsilon)
    check_probability("target_delta", target_delta)
    check_positive_int("total_steps", total_steps)
    if engine.tracker.clipping == "automatic":
        raise ValueError("SACController needs clipping='flat' or 'per_layer' (automatic clipping clips nothing "
                         "to count), found 'automatic'")
    if distributed.rank_and_world()[1] > 1:
        raise ValueError("SACController does not support several ranks yet (its counts are not all-reduced)")


def _clip_bounds(min_clip: Optional[float], max_clip: Optional[float], norms: Sequence[float]) -> tuple:
    """(min_clip, max_clip), by default 1/100 of the smallest and 100 times the largest initial threshold."""
    low, high = min_clip or min(norms) / 100, max_clip or max(norms) * 100
    _check_bounds(low, high, "clip threshold (min_clip, max_clip)")
    outside = [c for c in norms if not low <= c <= high]
    if outside:
        raise ValueError(f"initial max_grad_norm {outside} outside [min_clip, max_clip] = [{low}, {high}]")
    return low, high


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
        quantile step). ``release_noise_std``: per-coordinate noise of the releases (default m/20).
        """
        self.interval = check_positive_int("interval (logical steps between actions)", interval)
        self.sigma_min = _positive_or_none(sigma_min, "sigma_min")
        self.sigma_max = _positive_or_none(sigma_max, "sigma_max")
        self.min_clip = _positive_or_none(min_clip, "min_clip")
        self.max_clip = _positive_or_none(max_clip, "max_clip")
        _check_bounds(self.sigma_min, self.sigma_max, "sigma (sigma_min, sigma_max)")
        _check_bounds(self.min_clip, self.max_clip, "clip threshold (min_clip, max_clip)")
        self.max_factor = check_number("max_factor (thresholds change by [1/f, f])", max_factor, low=1.0, low_open=True)
        self.release_noise_std = _positive_or_none(release_noise_std, "release_noise_std")
        self.loss_bound = _positive_or_none(loss_bound, "loss_bound")
        if quantile_target is not None:
            check_probability("quantile_target", quantile_target)
        self.quantile_target = quantile_target
        self.quantile_lr = check_nonnegative("quantile_lr", quantile_lr)
        _check_loss_signal(validation_loss, loss_bound)
        self.warmup = check_int("warmup", warmup, minimum=0)
        self.updates_per_action = check_int("updates_per_action", updates_per_action, minimum=0)
        self.seed, self.validation_loss, self.policy = seed, validation_loss, policy
        self.sac_kwargs = {"init_log_std": -1.0, **(sac_kwargs or {})}
        self.engine = None
        self.history: List[dict] = []

    # ------------------------------------------------------------------ set-up
    def attach(self, engine, *, target_epsilon: float, target_delta: float, total_steps: int) -> None:
        """Called by ``make_private``: plans the budget, installs the step guard and the step callback."""
        if self.engine is not None:
            raise ValueError("this SACController is already attached to an engine; create one per run")
        _check_run(engine, target_epsilon, target_delta, total_steps)
        tracker, optimizer = engine.tracker, engine.optimizer
        self.engine, self.num_groups = engine, len(tracker.groups)
        self.releases = StatisticReleases(num_groups=self.num_groups, expected_batch_size=optimizer.expected_batch_size,
                                          noise_std=self.release_noise_std, loss_bound=self.loss_bound)
        self.plan = BudgetPlan(engine.accountant, target_epsilon=target_epsilon, delta=target_delta,
                               total_steps=total_steps, interval=self.interval, sample_rate=engine.sample_rate,
                               release_sigma=self.releases.noise_multiplier)
        norms = [g.max_norm for g in tracker.groups]
        clip_bounds = _clip_bounds(self.min_clip, self.max_clip, norms)
        floor = _first_floor(self.plan, self.releases, self.sigma_max or _SIGMA_CAP, optimizer)
        self.actions = ActionSpace(self.max_factor, self.quantile_target, self.quantile_lr, *clip_bounds,
                                   sigma_min=self.sigma_min or floor / 2, sigma_max=self.sigma_max or 2 * floor)
        _check_bounds(self.actions.sigma_min, self.actions.sigma_max, "sigma (sigma_min, sigma_max)")
        if optimizer.noise_multiplier < floor:
            logger.info("controller: sigma %.4g -> %.4g so that the planned steps AND the statistic releases fit "
                        "target_epsilon=%g", optimizer.noise_multiplier, floor, target_epsilon)
            optimizer.noise_multiplier = floor
        self.plan.planned_sigma = optimizer.noise_multiplier
        agent = SAC(2 * self.num_groups + 5, self.num_groups + 1, seed=self.seed, **self.sac_kwargs)
        self.hyper = HyperPolicy(agent, fixed=self.policy, warmup=self.warmup,
                                 updates_per_action=self.updates_per_action, target_epsilon=self.plan.target_epsilon,
                                 intervals=total_steps // self.interval,
                                 sigma_ref=optimizer.noise_multiplier, initial_max_norms=norms)
        self._install(optimizer)
        self.history.append(history_entry(optimizer, optimizer.steps_taken, reward=None, epsilon=self.plan.epsilon(),
                                          floor=floor, released=None, loss=None, action=None))

    def _install(self, optimizer) -> None:
        """Hooks on the optimizer: the release joins the step's mechanism, the guard runs before its noise."""
        optimizer.tracker.reset_statistics()
        optimizer.mechanism_hooks.append(self._add_release)
        optimizer.pre_noise_hooks.insert(0, self._guard)  # before the noise: a refused step releases nothing
        optimizer.step_callbacks.append(self._on_step)
        if self.validation_loss is None and self.loss_bound is None and self.policy is None:
            logger.warning("SACController has no loss signal (give validation_loss or loss_bound and call "
                           "observe_losses): rewards are 0 and the policy only explores")

    # ------------------------------------------------------------------ what the parts know
    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    @property
    def releases_planned(self) -> int:
        """Statistic releases in the whole planned run (one per action)."""
        return self.plan.releases_planned

    @property
    def release_sigma(self) -> float:
        """Noise multiplier of one release (all its coordinates together)."""
        return self.releases.noise_multiplier

    @property
    def release_noise_std_used(self) -> float:
        return self.releases.noise_std

    @property
    def agent(self) -> SAC:
        return self.hyper.agent

    # ------------------------------------------------------------------ private inputs
    def observe_losses(self, losses: torch.Tensor) -> None:
        """Per-sample losses (B,) of the current micro-batch, for the noisy loss release (needs ``loss_bound``).

        Call it before ``optimizer.step()``; only the batch of a release step is used, clipped to [0, loss_bound].
        """
        if self.loss_bound is None:
            raise ValueError("observe_losses needs SACController(loss_bound=...) (the per-sample loss clip)")
        self.releases.observe_losses(losses)

    # ------------------------------------------------------------------ hooks on the optimizer
    def _add_release(self, optimizer, mechanism):
        """A release step's statistics come from the step's own batch: one joint mechanism with the gradient."""
        if self.plan.is_release_step(optimizer.steps_taken + 1):
            return self.releases.add_to(mechanism)
        return mechanism

    def _guard(self, optimizer, mechanism) -> None:
        """Refuses a step that would leave the budget (runs before the noise is drawn)."""
        try:
            self.plan.check_step(optimizer.steps_taken, optimizer.noise_multiplier)
        except BudgetExhaustedError:
            optimizer.tracker.reset()  # the dropped batch must not reach a later release either
            optimizer.tracker.reset_statistics()
            self.releases.reset()
            raise

    def _on_step(self, optimizer, mechanism) -> None:
        done = optimizer.steps_taken + 1  # this step is accounted, its inner update not yet applied
        try:
            if self.plan.is_release_step(done):
                self.releases.check_carried(mechanism, done)
                self._act(done)
        finally:
            self.engine.tracker.reset_statistics()
            self.releases.reset()

    # ------------------------------------------------------------------ one control step
    def _act(self, done: int) -> None:
        tracker, optimizer = self.engine.tracker, self.engine.optimizer
        released = self.releases.release(tracker, optimizer)  # accounted: this step's mechanism carries it
        loss = self._observe_loss(released)
        epsilon = self.plan.epsilon()
        floor = self.plan.floor(done, self.actions.sigma_max, optimizer.noise_multiplier)
        norms = [g.max_norm for g in tracker.groups]
        obs = self.hyper.observation(unclipped=released.unclipped_fraction, norms=norms,
                                     sigma=optimizer.noise_multiplier, floor=floor, epsilon=epsilon,
                                     progress=done / self.total_steps, loss=loss)
        action, reward = self.hyper.step(obs, loss, epsilon)
        tracker.set_max_norms(self.actions.thresholds(action, norms, released.unclipped_fraction))
        optimizer.noise_multiplier = self.plan.planned_sigma = self.actions.sigma(action, floor)
        self.history.append(history_entry(optimizer, done, reward=reward, epsilon=epsilon, floor=floor,
                                          released=released, loss=loss, action=action))
        logger.info("controller step %d: sigma=%.4g (floor %.4g), C=%s, eps=%.4g, reward=%s", done,
                    optimizer.noise_multiplier, floor, self.history[-1]["max_grad_norm"], epsilon, reward)

    def _observe_loss(self, released) -> Optional[float]:
        if self.validation_loss is not None:
            with torch.no_grad(), self.engine.tracker.capture_disabled():
                return float(self.validation_loss())
        return released.loss

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return controller_state(self)

    def load_state_dict(self, state: dict) -> None:
        load_controller_state(self, state)
