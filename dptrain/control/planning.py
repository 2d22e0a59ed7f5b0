"""The controller's budget plan: which steps release statistics, the sigma floor, and the guard before each step.

Planning uses the engine's accountant when it is RDP; with PLD it uses an RDP replay of the same ledger (an
upper bound: a plan that fits under RDP fits the true privacy loss, and PLD then reports at or below the target).
"""

from __future__ import annotations

from dptrain.accountants import RDPAccountant
from dptrain.control.budget import BudgetExhaustedError, planned_epsilon, sigma_floor

__all__ = ["BudgetPlan"]


class BudgetPlan:
    """``total_steps`` gradient steps at sample rate ``sample_rate``; every ``interval``-th one (but the last)
    also releases statistics with noise multiplier ``release_sigma``, jointly with its gradient."""

    def __init__(self, accountant, *, target_epsilon: float, delta: float, total_steps: int, interval: int,
                 sample_rate: float, release_sigma: float):
        self.accountant = accountant  # the engine's: read, never composed onto here
        self.target_epsilon, self.delta = float(target_epsilon), float(delta)
        self.total_steps, self.interval = total_steps, interval
        self.sample_rate, self.release_sigma = float(sample_rate), release_sigma
        self.planned_sigma = 0.0  # the sigma the last floor check approved: steps at or above it are covered

    @property
    def releases_planned(self) -> int:
        """Statistic releases in the whole planned run (one per action)."""
        return (self.total_steps - 1) // self.interval

    def is_release_step(self, done: int) -> bool:
        """Whether the step that brings the count to ``done`` ends with an action (and its release)."""
        return done < self.total_steps and done % self.interval == 0

    def releases_after(self, done: int) -> int:
        """Releases still planned once ``done`` steps are taken."""
        return self.releases_planned - min(done, self.total_steps - 1) // self.interval

    def planning_accountant(self):
        """The engine's accountant if it is RDP; else an RDP replay of its ledger.

        A PLD epsilon costs seconds to minutes and the floor search needs several per action; RDP bounds the
        same ledger from above (PLD is usually 5-80% tighter).
        """
        if isinstance(self.accountant, RDPAccountant):
            return self.accountant
        return RDPAccountant().replay(self.accountant.ledger)

    def epsilon(self) -> float:
        """Epsilon spent so far, as the planning accountant sees it."""
        return self.planning_accountant().get_epsilon(self.delta)

    def floor(self, done: int, sigma_max: float, guess: float) -> float:
        """The smallest sigma for the rest of the run after ``done`` steps, searched from ``guess`` (the sigma in
        force is a good one); ``BudgetExhaustedError`` if even ``sigma_max`` does not fit."""
        guess = guess if 0 < guess <= sigma_max else sigma_max
        return sigma_floor(
            self.planning_accountant(), target_epsilon=self.target_epsilon, delta=self.delta,
            sample_rate=self.sample_rate, steps=max(self.total_steps - done, 0), sigma_max=sigma_max,
            release_noise_multiplier=self.release_sigma, releases=self.releases_after(done), guess=guess,
        )

    def check_step(self, done: int, sigma: float) -> None:
        """Raises ``BudgetExhaustedError`` if step ``done + 1`` at ``sigma`` would take the plan over the target."""
        if done < self.total_steps and sigma >= self.planned_sigma:
            return  # the plan checked at the last action covers this step
        eps = planned_epsilon(self.planning_accountant(), self.delta, sample_rate=self.sample_rate,
                              noise_multiplier=sigma, steps=max(self.total_steps - done, 1),
                              release_noise_multiplier=self.release_sigma, releases=self.releases_after(done))
        if eps > self.target_epsilon:
            raise BudgetExhaustedError(
                f"step {done + 1} at sigma={sigma:.4g} would bring epsilon to {eps:.4g} > target_epsilon="
                f"{self.target_epsilon} (planned steps: {self.total_steps}); the batch was dropped, nothing released"
            )

    def state_dict(self) -> dict:
        return {"planned_sigma": self.planned_sigma}

    def load_state_dict(self, state: dict) -> None:
        self.planned_sigma = state["planned_sigma"]
