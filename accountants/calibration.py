"""Pure functions over fresh accountants: epsilon of a run, the noise for a target epsilon, the step budget."""

from __future__ import annotations

import logging
import math
import warnings

from ._base import Accountant
from ._validation import check_delta, check_epsilon, check_noise_multiplier, check_sample_rate, check_steps
from .pld import PLDAccountant
from .rdp import RDPAccountant

__all__ = ["ACCOUNTANTS", "make_accountant", "compute_epsilon", "calibrate_noise", "max_steps"]

logger = logging.getLogger(__name__)

ACCOUNTANTS = {"rdp": RDPAccountant, "pld": PLDAccountant}
_SIGMA_MAX = 1e6


def make_accountant(name: str, **kwargs) -> Accountant:
    """A fresh accountant by name: ``"rdp"`` or ``"pld"`` (keyword arguments go to its constructor)."""
    if not isinstance(name, str) or name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, found {name!r}")
    return ACCOUNTANTS[name](**kwargs)


def _epsilon(name: str, q: float, sigma: float, steps: int, delta: float, **kwargs) -> float:
    if steps == 0:
        return 0.0
    with warnings.catch_warnings():  # searches probe extreme sigmas; the RDP grid-edge warning is noise there
        warnings.simplefilter("ignore", RuntimeWarning)
        acc = make_accountant(name, **kwargs).step(noise_multiplier=sigma, sample_rate=q, steps=steps)
        return acc.get_epsilon(delta)


def compute_epsilon(*, sample_rate, noise_multiplier, steps, delta, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``steps`` Poisson-subsampled Gaussian steps (inf when sigma = 0)."""
    q, sigma = check_sample_rate(sample_rate), check_noise_multiplier(noise_multiplier)
    steps, delta = check_steps(steps), check_delta(delta)
    make_accountant(accountant)  # validates the name
    if steps == 0:
        return 0.0
    return make_accountant(accountant).step(noise_multiplier=sigma, sample_rate=q, steps=steps).get_epsilon(delta)


def _bracketed_root(f, lo: float, hi: float, f_lo: float, f_hi: float, rtol: float) -> float:
    """Smallest-ish x in [lo, hi] with f(x) <= 0 given f(lo) > 0 >= f(hi), f decreasing; returns a point
    with f <= 0 within relative ``rtol`` of the root. Illinois regula falsi in log x, keeping the bracket."""
    side = 0
    while hi / lo - 1 > rtol:
        u_lo, u_hi = math.log(lo), math.log(hi)
        u = u_lo + (u_hi - u_lo) * f_lo / (f_lo - f_hi) if f_lo != f_hi else 0.5 * (u_lo + u_hi)
        # keep the step inside the bracket and never closer than rtol/4 to an end
        margin = min(0.25 * rtol, 0.25 * (u_hi - u_lo))
        u = min(max(u, u_lo + margin), u_hi - margin)
        x = math.exp(u)
        fx = f(x)
        if fx > 0:
            lo, f_lo = x, fx
            if side == -1:
                f_hi *= 0.5
            side = -1
        else:
            hi, f_hi = x, fx
            if side == 1:
                f_lo *= 0.5
            side = 1
    return hi


def _log_gap(eps: float, target: float) -> float:
    """log(eps / target), finite for eps in [0, inf]."""
    if math.isinf(eps):
        return 50.0
    return math.log(max(eps, 1e-300) / target)


def _calibrate(name, q, steps, delta, target, rtol, lo=None, hi=None, **kwargs) -> float:
    f = lambda sigma: _log_gap(_epsilon(name, q, sigma, steps, delta, **kwargs), target)  # noqa: E731
    hi = hi or 1.0
    f_hi = f(hi)
    while f_hi > 0:
        lo, f_lo = hi, f_hi
        hi *= 2.0
        if hi > _SIGMA_MAX:
            raise ValueError(
                f"target_epsilon={target!r} is unreachable with the {name} accountant at delta={delta!r} "
                f"(epsilon is still above it at noise_multiplier={_SIGMA_MAX:g})"
            )
        f_hi = f(hi)
    if lo is None or lo >= hi:
        lo = hi / 2
    f_lo = f(lo)
    while f_lo <= 0:
        hi, f_hi = lo, f_lo
        lo /= 2.0
        if lo < 1e-4:
            return hi
        f_lo = f(lo)
    return _bracketed_root(f, lo, hi, f_lo, f_hi, rtol)


def calibrate_noise(*, target_epsilon, sample_rate, steps, delta, accountant: str = "rdp", rtol: float = 1e-4) -> float:
    """Smallest noise multiplier (to relative ``rtol``) whose epsilon at ``delta`` is <= ``target_epsilon``.

    The returned sigma always satisfies compute_epsilon(sigma) <= target_epsilon. For ``"pld"`` the root is
    first located with a coarse grid (bracketed by RDP, which never gives a smaller epsilon), then refined.
    Raises ValueError if the target cannot be reached.
    """
    target = check_epsilon(target_epsilon, "target_epsilon")
    if target == 0:
        raise ValueError("target_epsilon=0 is unreachable: every noise multiplier gives epsilon > 0")
    q, steps, delta = check_sample_rate(sample_rate), check_steps(steps), check_delta(delta)
    make_accountant(accountant)
    if steps == 0:
        return 0.0
    if accountant == "rdp":
        return _calibrate("rdp", q, steps, delta, target, rtol)
    return _calibrate_pld(q, steps, delta, target, rtol)


def _calibrate_pld(q: float, steps: int, delta: float, target: float, rtol: float) -> float:
    """PLD calibration in few evaluations: Newton/secant steps on log eps vs log sigma, first on a coarse grid
    (started from RDP's sigma and slope), then on the default grid, ending with a two-point bracket check."""
    try:
        sigma_rdp = _calibrate("rdp", q, steps, delta, target, 1e-3)
    except ValueError:  # RDP cannot reach the target (its orders grid bounds epsilon below); PLD may
        return _calibrate("pld", q, steps, delta, target, rtol)
    f_rdp = lambda sigma: _log_gap(_epsilon("rdp", q, sigma, steps, delta), target)  # noqa: E731
    slope = (f_rdp(sigma_rdp * 1.01) - f_rdp(sigma_rdp)) / math.log(1.01)  # d log eps / d log sigma (< 0)
    if not (math.isfinite(slope) and slope < 0):
        slope = -1.0
    f_coarse = lambda sigma: _log_gap(_epsilon("pld", q, sigma, steps, delta, resolution=0.25), target)  # noqa: E731
    u, fu = math.log(sigma_rdp), f_coarse(sigma_rdp)
    for _ in range(8):  # secant on the coarse grid
        u_new = u - fu / slope
        f_new = f_coarse(math.exp(u_new))
        if abs(u_new - u) < 1e-3:
            u, fu = u_new, f_new
            break
        if f_new != fu:
            slope = min((f_new - fu) / (u_new - u), -1e-3)
        u, fu = u_new, f_new
    f_fine = lambda sigma: _log_gap(_epsilon("pld", q, sigma, steps, delta), target)  # noqa: E731
    fu = f_fine(math.exp(u))
    lo = hi = None
    f_lo = f_hi = None
    for _ in range(6):  # Newton on the default grid, then confirm a bracket of relative width rtol
        if fu > 0:
            lo, f_lo = math.exp(u), fu
        else:
            hi, f_hi = math.exp(u), fu
        if lo is not None and hi is not None and hi / lo - 1 <= rtol:
            return hi
        root = u - fu / slope
        half = 0.5 * math.log1p(rtol) * 0.999
        a, b = math.exp(root - half), math.exp(root + half)
        f_a, f_b = f_fine(a), f_fine(b)
        if f_a > 0 >= f_b:
            return b
        if f_a != f_b:
            slope = min((f_b - f_a) / (math.log(b) - math.log(a)), -1e-3)
        for x, fx in ((a, f_a), (b, f_b)):
            if fx > 0 and (lo is None or x > lo):
                lo, f_lo = x, fx
            if fx <= 0 and (hi is None or x < hi):
                hi, f_hi = x, fx
        u, fu = (math.log(b), f_b) if abs(f_b) < abs(f_a) else (math.log(a), f_a)
        if lo is not None and hi is not None:
            return _bracketed_root(f_fine, lo, hi, f_lo, f_hi, rtol)
    return _calibrate("pld", q, steps, delta, target, rtol, lo=lo, hi=hi)


def max_steps(*, target_epsilon, sample_rate, noise_multiplier, delta, accountant: str = "rdp") -> int:
    """Largest number of steps whose epsilon at ``delta`` is <= ``target_epsilon`` (0 if even one step is over).

    Raises ValueError when sigma = 0 (no step is private). Capped at 10^12 steps.
    """
    target = check_epsilon(target_epsilon, "target_epsilon")
    q, sigma, delta = check_sample_rate(sample_rate), check_noise_multiplier(noise_multiplier), check_delta(delta)
    make_accountant(accountant)
    if sigma == 0:
        raise ValueError("noise_multiplier=0 gives epsilon = inf: no step fits any target_epsilon")
    fits = lambda steps: _epsilon(accountant, q, sigma, steps, delta) <= target  # noqa: E731
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
