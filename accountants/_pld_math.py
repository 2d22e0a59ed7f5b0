"""Discretised privacy-loss distributions (PLDs) of the Poisson-subsampled Gaussian and their composition.

A PLD here is the distribution of the privacy loss L = log(dP/dQ) under P for a dominating pair (P, Q);
delta(eps) = E_P[(1 - e^(eps - L))_+] + P(L = inf). Losses live on the grid L = i * h. Two directions:
- ``remove``: P = (1-q) N(0, s^2) + q N(1, s^2), Q = N(0, s^2);
- ``add``:    P = N(0, s^2),                     Q = (1-q) N(0, s^2) + q N(1, s^2).

Discretisation ("connect the dots", pessimistic): the P-mass of each loss interval (e_j, e_j+1] is split
between its two end points so that the Q-mass is split linearly in e^L. The discrete PLD then has exactly the
true delta(eps) at every grid point and, delta being convex in e^eps, at least the true delta in between: it is
a dominating pair, and so is any composition of such pairs. Mass below the lowest grid point goes to it;
mass above the highest goes to +inf (both keep domination). Composition is by FFT.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from scipy import fft as sfft
from scipy import signal, special

__all__ = ["DiscretePLD", "step_pld", "self_compose", "convolve", "loss_std"]


@dataclasses.dataclass
class DiscretePLD:
    """P-masses ``probs`` at losses ``(offset + arange(len(probs))) * h``, plus an atom at +inf.

    ``slack``: a bound on delta the array misses (tail mass outside an FFT window), added to delta.
    ``moved``: lower-tail mass moved up to the lowest grid point during truncation (pessimistic; reported).
    """

    probs: np.ndarray
    offset: int
    h: float
    inf_mass: float = 0.0
    slack: float = 0.0
    moved: float = 0.0

    @property
    def losses(self) -> np.ndarray:
        return (self.offset + np.arange(len(self.probs))) * self.h  # (N,)

    def get_delta(self, epsilon: float) -> float:
        """delta(eps) = inf_mass + slack + sum_{L_j > eps} p_j (1 - e^(eps - L_j))."""
        losses = self.losses
        above = losses > epsilon
        tail = float(np.dot(self.probs[above], -np.expm1(epsilon - losses[above])))
        return min(1.0, self.inf_mass + self.slack + tail)

    def get_epsilon(self, delta: float) -> float:
        """Smallest eps >= 0 with delta(eps) <= delta (exact on the piecewise form; inf if unreachable)."""
        const = self.inf_mass + self.slack
        if const >= delta:
            return math.inf
        p = self.probs
        rev = p[::-1]
        mass_from = np.cumsum(rev)[::-1]  # (N,) A_k = sum_{j>=k} p_j
        decay_from = signal.lfilter([1.0], [1.0, -math.exp(-self.h)], rev)[::-1]  # (N,) D_k = sum p_j e^{-(j-k)h}
        # delta at grid point k: sum_{j>k} p_j (1 - e^{-(j-k)h}) = A_{k+1} - e^{-h} D_{k+1}
        a_next = np.append(mass_from[1:], 0.0)
        d_next = np.append(decay_from[1:], 0.0)
        delta_at = const + a_next - math.exp(-self.h) * d_next  # (N,)
        above = np.nonzero(delta_at > delta)[0]
        if len(above) == 0:  # the root lies below the lowest grid point
            a, d, top = mass_from[0], decay_from[0], self.offset * self.h
        else:
            k = above[-1]
            if k == len(p) - 1:  # cannot happen when const < delta; keep for safety
                return math.inf
            a, d, top = a_next[k], d_next[k], (self.offset + k + 1) * self.h
        if d <= 0:
            return max(0.0, top)
        eps = top + math.log(max(const + a - delta, 1e-300) / d)
        return max(0.0, eps)


# ---------------------------------------------------------------------------------------------------------
# one step


def _log_expm1_plus(eps: np.ndarray, q: float) -> np.ndarray:
    """log(e^eps - (1 - q)) for e^eps > 1 - q, stable for large eps."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        small = np.log(np.expm1(np.minimum(eps, 30.0)) + q)
        large = eps + np.log1p(-(1 - q) * np.exp(-np.maximum(eps, 30.0)))
    return np.where(eps > 30.0, large, small)


def _loss_of_x(x: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """log((1-q) + q e^{(2x-1)/(2 s^2)}): the remove-direction loss at x (the add loss is its negative)."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(math.log1p(-q) if q < 1 else -np.inf, math.log(q) + (2 * x - 1) / (2 * sigma**2))


def _cdfs(eps: np.ndarray, q: float, sigma: float, direction: str):
    """(P(L <= eps), P(L > eps), Q(L <= eps), Q(L > eps)) at losses eps (M,)."""
    nd = special.ndtr
    if direction == "remove":  # L increasing in x; L <= eps <=> x <= x(eps)
        with np.errstate(invalid="ignore"):
            x = sigma**2 * (_log_expm1_plus(eps, q) - math.log(q)) + 0.5
        x = np.where(np.isnan(x), -np.inf, x)  # eps <= log(1-q): no mass below
        q_cdf, q_sf = nd(x / sigma), nd(-x / sigma)
        p_cdf = (1 - q) * q_cdf + q * nd((x - 1) / sigma)
        p_sf = (1 - q) * q_sf + q * nd((1 - x) / sigma)
    else:  # add: L = -loss(x), decreasing in x; L <= eps <=> x >= x_a(-eps)
        with np.errstate(invalid="ignore"):
            x = sigma**2 * (_log_expm1_plus(-eps, q) - math.log(q)) + 0.5
        x = np.where(np.isnan(x), -np.inf, x)  # eps >= -log(1-q): every x qualifies
        p_cdf, p_sf = nd(-x / sigma), nd(x / sigma)
        q_cdf = (1 - q) * p_cdf + q * nd((1 - x) / sigma)
        q_sf = (1 - q) * p_sf + q * nd((x - 1) / sigma)
    return p_cdf, p_sf, q_cdf, q_sf


def _interval_mass(cdf: np.ndarray, sf: np.ndarray) -> np.ndarray:
    """Masses of consecutive intervals from cdf/sf at their end points, using whichever is more precise."""
    return np.where(cdf[1:] < 0.5, cdf[1:] - cdf[:-1], sf[:-1] - sf[1:]).clip(min=0.0)


def true_delta(epsilon: float, q: float, sigma: float, direction: str) -> float:
    """delta(eps) of ONE step, from the closed form (used to check the discretisation)."""
    eps = np.array([float(epsilon)])
    _, p_sf, _, q_sf = _cdfs(eps, q, sigma, direction)
    return float(p_sf[0] - math.exp(epsilon) * q_sf[0])


@functools.lru_cache(maxsize=64)
def step_pld(q: float, sigma: float, h: float, direction: str, tail: float = 1e-16) -> DiscretePLD:
    """Dominating discrete PLD of one Poisson-subsampled Gaussian step on the grid i * h.

    The grid covers the losses between the ``tail`` quantiles of P (in x); outside mass is handled as in
    the module docstring, so the result dominates exactly (no added slack).
    """
    z = -special.ndtri(tail)
    if direction == "remove":
        lo, hi = _loss_of_x(np.array([-sigma * z, 1 + sigma * z]), q, sigma)
    else:
        lo, hi = -_loss_of_x(np.array([sigma * z, -sigma * z]), q, sigma)
    i_lo, i_hi = math.floor(lo / h), max(math.ceil(hi / h), math.floor(lo / h) + 1)
    eps = np.arange(i_lo, i_hi + 1) * h  # (n+1,) grid points
    p_cdf, p_sf, q_cdf, q_sf = _cdfs(eps, q, sigma, direction)
    pm = _interval_mass(p_cdf, p_sf)  # (n,) P((e_j, e_j+1])
    qm = _interval_mass(q_cdf, q_sf)  # (n,) Q((e_j, e_j+1])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = np.exp(eps[:-1] + np.log(qm))  # (n,) e^{e_j} Q(I_j) <= P(I_j)
        up_fraction = np.where(pm > 0, (1 - r / pm) * (math.exp(h) / math.expm1(h)), 0.0)
    up = pm * np.clip(np.nan_to_num(up_fraction, nan=1.0), 0.0, 1.0)  # (n,) P-mass sent to e_{j+1}
    probs = np.zeros(len(eps))
    probs[:-1] += pm - up
    probs[1:] += up
    probs[0] += p_cdf[0]
    with np.errstate(over="ignore", invalid="ignore"):
        top_to_grid = min(p_sf[-1], float(np.exp(eps[-1] + np.log(q_sf[-1])))) if q_sf[-1] > 0 else 0.0
    probs[-1] += top_to_grid
    pld = DiscretePLD(probs=probs, offset=i_lo, h=h, inf_mass=max(0.0, float(p_sf[-1] - top_to_grid)))
    pld.probs.setflags(write=False)
    return pld


def loss_std(q: float, sigma: float) -> float:
    """Standard deviation under P of one step's privacy loss (the smaller of the two directions)."""
    if q == 1:
        return 1 / sigma
    x = np.linspace(-14 * sigma, 1 + 14 * sigma, 8001)  # (X,)
    loss = _loss_of_x(x, q, sigma)  # remove-direction loss at x
    phi0, phi1 = special.ndtr((x[1:] - 0.0) / sigma) - special.ndtr((x[:-1]) / sigma), None
    phi1 = special.ndtr((x[1:] - 1) / sigma) - special.ndtr((x[:-1] - 1) / sigma)
    mid = 0.5 * (loss[1:] + loss[:-1])
    stds = []
    for w, sign in (((1 - q) * phi0 + q * phi1, 1.0), (phi0, -1.0)):  # remove: x ~ mixture; add: x ~ N(0)
        w = w / w.sum()
        mean = np.dot(w, sign * mid)
        stds.append(math.sqrt(max(np.dot(w, (sign * mid - mean) ** 2), 0.0)))
    return max(min(stds), 1e-300)


# ---------------------------------------------------------------------------------------------------------
# composition


def truncate(pld: DiscretePLD, tail: float) -> DiscretePLD:
    """Drop at most ``tail`` mass from each end: lower tail moved up to the new first point, upper to +inf."""
    p = np.clip(pld.probs, 0.0, None)
    cum = np.cumsum(p)
    lo = int(np.searchsorted(cum, tail, side="right"))  # first index whose cumulative mass exceeds tail
    rcum = np.cumsum(p[::-1])
    hi = len(p) - 1 - int(np.searchsorted(rcum, tail, side="right"))
    lo = min(lo, len(p) - 1)
    hi = max(hi, lo)
    below = float(cum[lo - 1]) if lo > 0 else 0.0
    above = float(rcum[len(p) - 2 - hi]) if hi < len(p) - 1 else 0.0
    kept = p[lo : hi + 1].copy()
    kept[0] += below
    return DiscretePLD(
        probs=kept, offset=pld.offset + lo, h=pld.h, inf_mass=min(1.0, pld.inf_mass + above),
        slack=pld.slack, moved=pld.moved + below,
    )


def _chernoff_window(pld: DiscretePLD, count: int, tail: float) -> tuple[int, int, float]:
    """Index range [lo, hi] holding all but a proven <= ``tail`` mass at each end of the count-fold sum.

    Chernoff: mu^{*T}(S >= b) <= exp(T K(t) - t b) for t > 0, K(t) = log sum_i p_i e^{t L_i}, and likewise
    for the lower tail with -t; b is minimised over t by a bounded scalar search on log t.
    Returns (lo, hi, proven tail bound).
    """
    p, n, h = pld.probs, len(pld.probs), pld.h
    keep = p > 0
    log_p = np.log(p[keep])  # (N',)
    idx = (pld.offset + np.nonzero(keep)[0]).astype(float)  # (N',) loss / h
    w = np.exp(log_p)
    mean = float(np.dot(w, idx) / w.sum())
    spread = math.sqrt(max(float(np.dot(w, (idx - mean) ** 2) / w.sum()), 1e-12))
    scale = spread * math.sqrt(count) + 1.0  # in grid units
    log_tail = math.log(tail)

    centred = idx - mean  # (N',) centring keeps the exponents small
    t_all = np.exp(np.linspace(-0.5, 3.0, 8)) / scale  # (K,) any t > 0 gives a valid bound; take the best
    log_mgf = {1.0: [], -1.0: []}
    exponent = np.empty_like(log_p)  # (N',) reused buffer
    for t in t_all:
        for sign in (1.0, -1.0):
            np.multiply(centred, sign * t, out=exponent)
            exponent += log_p
            peak = exponent.max()
            exponent -= peak
            np.exp(exponent, out=exponent)
            log_mgf[sign].append(peak + math.log(exponent.sum()) + sign * t * mean)
    b = float(np.min((count * np.array(log_mgf[1.0]) - log_tail) / t_all))
    a = float(np.max((log_tail - count * np.array(log_mgf[-1.0])) / t_all))
    natural_lo, natural_hi = count * pld.offset, count * (pld.offset + n - 1)
    lo = max(natural_lo, math.floor(a))
    hi = min(natural_hi, math.ceil(b))
    proven = (tail if lo > natural_lo else 0.0) + (tail if hi < natural_hi else 0.0)
    return lo, max(hi, lo), proven


def self_compose(pld: DiscretePLD, count: int, tail: float = 1e-14) -> DiscretePLD:
    """``count``-fold composition by one FFT power on a window proven (Chernoff) to miss <= 2 tail mass."""
    if count == 1:
        return pld
    lo, hi, bound = _chernoff_window(pld, count, tail)
    n = len(pld.probs)
    expected = n + 40 * _spread(pld) * math.sqrt(count)  # what a light-tailed sum would need
    if hi - lo + 1 > 4 * expected:  # heavy tail: Chernoff is loose, square with exact truncation instead
        return _self_compose_by_squaring(pld, count, tail)
    size = sfft.next_fast_len(max(hi - lo + 1, n), real=True)
    spectrum = sfft.rfft(pld.probs, size)  # (size//2+1,)
    circ = sfft.irfft(spectrum**count, size)  # (size,) circular count-fold convolution
    out = np.roll(np.clip(circ, 0.0, None), (count * pld.offset - lo) % size)
    inf_mass = -math.expm1(count * math.log1p(-min(pld.inf_mass, 1 - 1e-16))) if pld.inf_mass > 0 else 0.0
    composed = DiscretePLD(
        probs=out, offset=lo, h=pld.h, inf_mass=inf_mass, slack=count * pld.slack + bound, moved=count * pld.moved
    )
    return truncate(composed, tail)


def _spread(pld: DiscretePLD) -> float:
    """Standard deviation of the (normalised) PLD, in grid units."""
    p = pld.probs / pld.probs.sum()
    idx = np.arange(len(p), dtype=float)
    mean = float(np.dot(p, idx))
    return math.sqrt(max(float(np.dot(p, (idx - mean) ** 2)), 1.0))


def _self_compose_by_squaring(pld: DiscretePLD, count: int, tail: float) -> DiscretePLD:
    """``count``-fold composition by repeated squaring, truncating (exactly accounted) after each product."""
    result, base = None, pld
    while count:
        if count & 1:
            result = base if result is None else convolve(result, base, tail)
        count >>= 1
        if count:
            base = convolve(base, base, tail)
    return result


def convolve(a: DiscretePLD, b: DiscretePLD, tail: float = 1e-14) -> DiscretePLD:
    """Composition of two PLDs on the same grid (linear FFT convolution, then tail truncation)."""
    if a.h != b.h:
        raise ValueError(f"PLDs on different grids: h={a.h} and h={b.h}")
    n = len(a.probs) + len(b.probs) - 1
    size = sfft.next_fast_len(n, real=True)
    spectrum = sfft.rfft(a.probs, size)
    spectrum = spectrum * spectrum if b is a else spectrum * sfft.rfft(b.probs, size)
    out = sfft.irfft(spectrum, size)[:n]  # (n,) linear convolution
    composed = DiscretePLD(
        probs=np.clip(out, 0.0, None), offset=a.offset + b.offset, h=a.h,
        inf_mass=1 - (1 - a.inf_mass) * (1 - b.inf_mass), slack=a.slack + b.slack, moved=a.moved + b.moved,
    )
    return truncate(composed, tail)
