"""Budget guard for adaptive noise: a privacy filter (Feldman & Zrnic 2021) over the accountant's ledger.

The controller may change sigma between steps. Whatever it picks, the run must end at or under the target
epsilon. Before each choice the guard asks: with the ledger spent so far, plus the remaining planned gradient
steps all at sigma and the remaining planned statistic releases, what epsilon does the accountant certify?
The smallest sigma that keeps this at or under the target is the *sigma floor*; the controller never goes
below it. Choosing sigma >= floor keeps the next floor feasible too (fewer epsilon spent than planned), so
by induction the planned run ends within budget. The accountant composes the heterogeneous ledger exactly
(RDP adds per order; PLD convolves).
"""

from __future__ import annotations

import warnings
from typing import Optional

from dptrain.accountants import ComposedEvent, PrivacyEvent, SelfComposedEvent, TargetUnreachableError, calibrate
from dptrain.accountants import sampled_gaussian
from dptrain.mechanism import joint_noise_multiplier

__all__ = ["BudgetExhaustedError", "planned_event", "planned_epsilon", "sigma_floor"]


class BudgetExhaustedError(RuntimeError):
    """The next private step (or the planned rest of the run) does not fit in the privacy budget."""


def planned_event(
    *, sample_rate: float, noise_multiplier: float, steps: int, release_noise_multiplier: float = 0.0,
    releases: int = 0,
) -> PrivacyEvent:
    """``steps`` gradient steps, ``releases`` of which also release statistics of their batch (one joint subsampled
    Gaussian each, as ``StepMechanism`` ledgers them)."""
    if releases > max(steps, 0):
        raise ValueError(f"releases ({releases}) ride on gradient steps, so at most steps={steps}")
    plain = SelfComposedEvent(sampled_gaussian(sample_rate, noise_multiplier), max(steps, 0) - releases)
    if releases == 0:
        return plain
    joint = joint_noise_multiplier(noise_multiplier, release_noise_multiplier)
    return ComposedEvent((plain, SelfComposedEvent(sampled_gaussian(sample_rate, joint), releases)))


def planned_epsilon(
    accountant, delta: float, *, sample_rate: float, noise_multiplier: float, steps: int,
    release_noise_multiplier: float = 0.0, releases: int = 0,
) -> float:
    """Epsilon of the ledger so far plus the ``planned_event`` (on a copy: the accountant is left unchanged)."""
    plan = planned_event(sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=steps,
                         release_noise_multiplier=release_noise_multiplier, releases=releases)
    with warnings.catch_warnings():  # probing tiny sigmas makes the RDP optimum sit at the grid edge
        warnings.simplefilter("ignore", RuntimeWarning)
        return accountant.copy().compose(plan).get_epsilon(delta)


def sigma_floor(
    accountant, *, target_epsilon: float, delta: float, sample_rate: float, steps: int, sigma_max: float,
    release_noise_multiplier: float = 0.0, releases: int = 0, rtol: float = 1e-2, guess: Optional[float] = None,
) -> float:
    """Smallest sigma (to relative precision ``rtol``, rounded up) such that the planned rest fits the target.

    Searched in [min(sigma_max, 1) / 1000, sigma_max] (below that nothing is private anyway) from ``guess``
    (default ``sigma_max``). Returns 0.0 when nothing remains to plan and the ledger fits. Raises
    ``BudgetExhaustedError`` when even ``sigma_max`` does not fit.
    """
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be > 0, found {sigma_max}")
    plan = dict(sample_rate=sample_rate, steps=steps, release_noise_multiplier=release_noise_multiplier,
                releases=releases)
    if steps <= 0:
        if planned_epsilon(accountant, delta, noise_multiplier=sigma_max, **plan) > target_epsilon:
            raise BudgetExhaustedError(
                f"the ledger and {releases} planned release(s) already exceed target_epsilon={target_epsilon}"
            )
        return 0.0
    try:
        return calibrate(lambda sigma: planned_event(noise_multiplier=sigma, **plan), target_epsilon=target_epsilon,
                         delta=delta, accountant=accountant.copy, lower=min(sigma_max, 1.0) * 1e-3, upper=sigma_max,
                         rtol=rtol, guess=sigma_max if guess is None else guess)
    except TargetUnreachableError:
        eps = planned_epsilon(accountant, delta, noise_multiplier=sigma_max, **plan)
        raise BudgetExhaustedError(
            f"{steps} remaining step(s) at sigma_max={sigma_max:.4g} (plus {releases} release(s)) would end at "
            f"epsilon={eps:.4g} > target_epsilon={target_epsilon}: the budget cannot cover the planned run"
        ) from None
