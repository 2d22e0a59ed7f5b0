"""Pure functions over fresh accountants: epsilon of a run, the noise for a target epsilon, the step budget.

``calibrate`` is the one noise calibration: the smallest noise multiplier sigma whose ``make_event(sigma)``
fits a target epsilon, for any accountant. ``calibrate_noise`` and the controller's budget planning use it.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Union

from scipy import optimize

from dptrain.validation import check_number, check_positive

from ._base import Accountant
from ._validation import check_delta, check_epsilon, check_noise_multiplier, check_sample_rate, check_steps
from .events import PrivacyEvent, SelfComposedEvent, sampled_gaussian
from .registry import check_accountant, make_accountant

__all__ = ["TargetUnreachableError", "calibrate", "calibrate_noise", "compute_epsilon", "max_steps"]

_SIGMA_MIN, _SIGMA_MAX = 1e-4, 1e6
_LOG_STEP = math.log(2.0)  # bracket search: sigma doubles or halves per probe

AccountantSource = Union[str, Callable[[], Accountant]]


class TargetUnreachableError(ValueError):
    """Even the largest noise multiplier searched gives an epsilon above the target."""


def _fresh(accountant: AccountantSource) -> Callable[[], Accountant]:
    if isinstance(accountant, str):
        name = check_accountant(accountant)
        return lambda: make_accountant(name)
    if not callable(accountant):
        raise TypeError(f"accountant must be a name or a callable returning an Accountant, found {accountant!r}")
    return accountant


class _LogGap:
    """u = log sigma -> log(epsilon / target) (> 0: over the target), remembering every probe."""

    def __init__(self, epsilon_of: Callable[[float], float], target: float):
        self.epsilon_of, self.target, self.probes = epsilon_of, target, {}

    def __call__(self, u: float) -> float:
        if u not in self.probes:
            eps = self.epsilon_of(math.exp(u))
            self.probes[u] = 50.0 if math.isinf(eps) else math.log(max(eps, 1e-300) / self.target)
        return self.probes[u]

    def smallest_fitting(self) -> float:
        """The smallest probe that fits above every probe that does not (the upper end of the final bracket)."""
        above = max((u for u, gap in self.probes.items() if gap > 0), default=-math.inf)
        return math.exp(min(u for u, gap in self.probes.items() if gap <= 0 and u > above))


def _bracket(gap: _LogGap, u: float, u_min: float, u_max: float):
    """(u_lo, u_hi) with gap(u_lo) > 0 >= gap(u_hi), doubling or halving sigma from u; u_lo is None when u_min fits."""
    u = min(max(u, u_min), u_max)
    if gap(u) > 0:
        while gap(u) > 0:
            if u >= u_max:
                return u, None
            u_lo, u = u, min(u + _LOG_STEP, u_max)
        return u_lo, u
    while u > u_min:
        u_next = max(u - _LOG_STEP, u_min)
        if gap(u_next) > 0:
            return u_next, u
        u = u_next
    return None, u


def calibrate(
    make_event: Callable[[float], PrivacyEvent], *, target_epsilon: float, delta: float,
    accountant: AccountantSource = "rdp", lower: float = _SIGMA_MIN, upper: float = _SIGMA_MAX,
    rtol: float = 1e-4, guess: float = 1.0,
) -> float:
    """Smallest sigma in [lower, upper] (to relative ``rtol``, rounded up) with epsilon(make_event(sigma)) <= target.

    ``accountant``: a registered name, or a callable returning the accountant to compose onto (``ledger.copy``
    plans the rest of a run). Epsilon must not increase with sigma. Returns ``lower`` when it fits already;
    raises ``TargetUnreachableError`` when ``upper`` does not. The root is bracketed from ``guess`` by doubling
    or halving, then found by Brent's method on log epsilon against log sigma.
    """
    target, delta = check_epsilon(target_epsilon, "target_epsilon"), check_delta(delta)
    if target == 0:
        raise TargetUnreachableError("target_epsilon=0 is unreachable: every noise multiplier gives epsilon > 0")
    if not check_positive("lower", lower) < check_positive("upper", upper):
        raise ValueError(f"need 0 < lower < upper < inf, found lower={lower!r}, upper={upper!r}")
    check_number("rtol", rtol, low=0.0, high=1.0, low_open=True, high_open=True)
    check_positive("guess", guess)
    fresh = _fresh(accountant)
    gap = _LogGap(lambda sigma: fresh().compose(make_event(sigma)).get_epsilon(delta), target)
    with warnings.catch_warnings():  # probes at extreme sigmas put the RDP optimum at the grid edge: noise here
        warnings.simplefilter("ignore", RuntimeWarning)
        u_lo, u_hi = _bracket(gap, math.log(guess), math.log(lower), math.log(upper))
        if u_hi is None:
            raise TargetUnreachableError(
                f"target_epsilon={target!r} is unreachable with the {fresh().name} accountant at delta={delta!r} "
                f"(epsilon is still above it at noise_multiplier={upper:g})"
            )
        if u_lo is not None:  # Brent stops when its bracket of probed points is narrower than xtol
            optimize.brentq(gap, u_lo, u_hi, xtol=0.999 * math.log1p(rtol), rtol=1e-15)
    return gap.smallest_fitting()


def compute_epsilon(*, sample_rate, noise_multiplier, steps, delta, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``steps`` Poisson-subsampled Gaussian steps (inf when sigma = 0)."""
    q, sigma = check_sample_rate(sample_rate), check_noise_multiplier(noise_multiplier)
    steps, delta = check_steps(steps), check_delta(delta)
    return make_accountant(accountant).step(noise_multiplier=sigma, sample_rate=q, steps=steps).get_epsilon(delta)


def calibrate_noise(*, target_epsilon, sample_rate, steps, delta, accountant: str = "rdp", rtol: float = 1e-4) -> float:
    """Smallest noise multiplier (to relative ``rtol``) whose epsilon at ``delta`` is <= ``target_epsilon``.

    The returned sigma always satisfies compute_epsilon(sigma) <= target_epsilon. Other accountants start from
    RDP's sigma (cheap, and RDP never gives a smaller epsilon). Raises ValueError if the target cannot be reached.
    """
    if check_epsilon(target_epsilon, "target_epsilon") == 0:
        raise TargetUnreachableError("target_epsilon=0 is unreachable: every noise multiplier gives epsilon > 0")
    q, steps, delta = check_sample_rate(sample_rate), check_steps(steps), check_delta(delta)
    check_accountant(accountant)
    if steps == 0:
        return 0.0

    def run(sigma: float) -> PrivacyEvent:
        return SelfComposedEvent(sampled_gaussian(q, sigma), steps)

    guess = 1.0
    if accountant != "rdp":
        try:
            guess = calibrate(run, target_epsilon=target_epsilon, delta=delta, rtol=1e-3)
        except TargetUnreachableError:  # RDP's orders grid bounds its epsilon below; this accountant may reach it
            pass
    return calibrate(run, target_epsilon=target_epsilon, delta=delta, accountant=accountant, rtol=rtol, guess=guess)


def max_steps(*, target_epsilon, sample_rate, noise_multiplier, delta, accountant: str = "rdp") -> int:
    """Largest number of steps whose epsilon at ``delta`` is <= ``target_epsilon`` (0 if even one step is over).

    Raises ValueError when sigma = 0 (no step is private). Capped at 10^12 steps.
    """
    target = check_epsilon(target_epsilon, "target_epsilon")
    q, sigma, delta = check_sample_rate(sample_rate), check_noise_multiplier(noise_multiplier), check_delta(delta)
    check_accountant(accountant)
    if sigma == 0:
        raise ValueError("noise_multiplier=0 gives epsilon = inf: no step fits any target_epsilon")

    def fits(steps: int) -> bool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return compute_epsilon(sample_rate=q, noise_multiplier=sigma, steps=steps, delta=delta,
                                   accountant=accountant) <= target

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 10**12:
            return lo
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
