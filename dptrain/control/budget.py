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

import copy
import math
import warnings

from dptrain.accountants import GaussianEvent, PoissonSampledEvent
from dptrain.mechanism import joint_noise_multiplier

__all__ = ["BudgetExhaustedError", "planned_epsilon", "sigma_floor"]


class BudgetExhaustedError(RuntimeError):
    """The next private step (or the planned rest of the run) does not fit in the privacy budget."""


def planned_epsilon(
    accountant, delta: float, *, sample_rate: float, noise_multiplier: float, steps: int,
    release_noise_multiplier: float = 0.0, releases: int = 0,
) -> float:
    """Epsilon of the ledger so far plus ``steps`` gradient steps, ``releases`` of which also release statistics
    of their batch (one joint subsampled Gaussian each, as ``StepMechanism`` ledgers them).

    Works on a copy: the accountant itself is left unchanged.
    """
    if releases > max(steps, 0):
        raise ValueError(f"releases ({releases}) ride on gradient steps, so at most steps={steps}")
    trial = copy.deepcopy(accountant)

    def compose(multiplier: float, count: int) -> None:
        if count > 0:
            trial.compose(PoissonSampledEvent(sample_rate, GaussianEvent(multiplier)), count=int(count))

    compose(noise_multiplier, steps - releases)
    if releases > 0:
        compose(joint_noise_multiplier(noise_multiplier, release_noise_multiplier), releases)
    return trial.get_epsilon(delta)


def sigma_floor(
    accountant, *, target_epsilon: float, delta: float, sample_rate: float, steps: int, sigma_max: float,
    release_noise_multiplier: float = 0.0, releases: int = 0, rtol: float = 1e-2,
) -> float:
    """Smallest sigma (to relative precision ``rtol``, rounded up) such that the planned rest fits the target.

    Returns 0.0 when nothing remains to plan and the ledger fits. Raises ``BudgetExhaustedError`` when even
    ``sigma_max`` does not fit.
    """
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be > 0, found {sigma_max}")

    def fits(sigma: float) -> bool:
        with warnings.catch_warnings():  # probing tiny sigmas makes the RDP optimum sit at the grid edge
            warnings.simplefilter("ignore", RuntimeWarning)
            eps = planned_epsilon(accountant, delta, sample_rate=sample_rate, noise_multiplier=sigma, steps=steps,
                                  release_noise_multiplier=release_noise_multiplier, releases=releases)
        return eps <= target_epsilon

    if steps <= 0:
        if not fits(sigma_max):
            raise BudgetExhaustedError(
                f"the ledger and {releases} planned release(s) already exceed target_epsilon={target_epsilon}"
            )
        return 0.0
    if not fits(sigma_max):
        eps = planned_epsilon(accountant, delta, sample_rate=sample_rate, noise_multiplier=sigma_max, steps=steps,
                              release_noise_multiplier=release_noise_multiplier, releases=releases)
        raise BudgetExhaustedError(
            f"{steps} remaining step(s) at sigma_max={sigma_max:.4g} (plus {releases} release(s)) would end at "
            f"epsilon={eps:.4g} > target_epsilon={target_epsilon}: the budget cannot cover the planned run"
        )
    hi, lo = math.log(sigma_max), math.log(min(sigma_max, 1.0) * 1e-3)  # below 1e-3 nothing is private anyway
    if fits(math.exp(lo)):
        return math.exp(lo)
    while hi - lo > math.log1p(rtol):  # invariant: exp(hi) fits, exp(lo) does not
        mid = 0.5 * (hi + lo)
        if fits(math.exp(mid)):
            hi = mid
        else:
            lo = mid
    return math.exp(hi)
