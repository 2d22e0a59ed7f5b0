"""Renyi-DP accounting of the Poisson-subsampled Gaussian mechanism, in log space.

RDP at order a of one step with sample rate q and noise multiplier sigma is log(A_a)/(a-1), with
A_a = E_{z~N(0, sigma^2)}[((1-q) + q exp((2z-1)/(2 sigma^2)))^a] (Mironov, Talwar, Zhang 2019):
- integer a: the finite binomial sum sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k)/(2 sigma^2)) (Sec. 3.2);
- fractional a: the two-series expansion of Sec. 3.3 with signed generalised binomials C(a, i), summed
  with signed log-sum-exp; the alternating tails are summed by repeated averaging of partial sums.
RDP composes by addition; (epsilon, delta) comes from Balle et al. 2020, Thm 21, minimised over orders.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
from scipy import special

from ._base import Accountant
from ._validation import check_noise_multiplier, check_sample_rate
from .registry import register_accountant

__all__ = ["DEFAULT_ORDERS", "RDPAccountant", "compute_rdp", "rdp_to_epsilon"]


def _default_orders() -> np.ndarray:
    fine = np.round(np.arange(1.1, 11.0, 0.1), 10)  # 1.1 .. 10.9, step 0.1
    integers = np.arange(11, 65, dtype=float)  # 11 .. 64
    geometric = np.unique(np.round(np.geomspace(64, 4096, 45)))[1:]  # 66 .. 4096, ratio ~1.1
    return np.unique(np.concatenate([fine, integers, geometric]))


DEFAULT_ORDERS = _default_orders()

_N_TERMS = 160  # terms of each fractional-order series before the tail is extrapolated
_N_AVERAGE = 24  # rounds of partial-sum averaging (Euler transform) on the alternating tail


def _log_a_integer(orders: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """log A_a at integer orders (A,) by the exact binomial sum, vectorised with a (A, a_max+1) matrix."""
    a = orders.astype(np.int64)  # (A,)
    log_fact = special.gammaln(np.arange(a.max() + 1, dtype=float) + 1)  # (a_max+1,) log k!
    lengths = a + 1  # terms k = 0..a of each order
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # (A,) segment starts in the flat arrays
    order_of = np.repeat(np.arange(len(a)), lengths)  # (S,) ragged layout: sum(a+1) terms in all
    k = np.arange(lengths.sum()) - starts[order_of]  # (S,)
    kf = k.astype(float)
    log_terms = (
        -log_fact[k] - log_fact[a[order_of] - k]
        + kf * (math.log(q) - math.log1p(-q)) + (kf * kf - kf) / (2 * sigma**2)
    )  # (S,)
    peak = np.maximum.reduceat(log_terms, starts)  # (A,)
    log_sum = peak + np.log(np.add.reduceat(np.exp(log_terms - peak[order_of]), starts))
    return log_sum + log_fact[a] + a * math.log1p(-q)


def _log_a_fractional(orders: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """log A_a at fractional orders (A,) by the two-series expansion of MTZ 2019, Sec. 3.3.

    A_a = sum_i C(a,i) [ (1-q)^(a-i) q^i e^{(i^2-i)/(2s^2)} Phi((z0-i)/s)
                        + (1-q)^i q^(a-i) e^{(j^2-j)/(2s^2)} Phi((j-z0)/s) ],  j = a - i,
    z0 = s^2 log(1/q - 1) + 1/2. C(a, i) changes sign for i > a + 1, so terms are summed with signs; the
    alternating tail (terms decay only polynomially when q is large) is extrapolated by averaging.
    """
    n = _N_TERMS
    i = np.arange(n, dtype=float)  # (N,)
    a = orders[:, None]  # (A, 1)
    factors = a - i[None, :-1]  # (A, N-1): C(a, i) = prod_{j<i} (a - j) / (j + 1)
    log_abs_binom = np.concatenate(
        [np.zeros((len(orders), 1)), np.cumsum(np.log(np.abs(factors)) - np.log(i[1:]), axis=1)], axis=1
    )  # (A, N)
    negatives = np.concatenate([np.zeros((len(orders), 1)), np.cumsum(factors < 0, axis=1)], axis=1)
    sign = np.where(negatives % 2 == 1, -1.0, 1.0)  # (A, N)
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = sigma**2 * (log_1mq - log_q) + 0.5
    j = a - i[None, :]  # (A, N)
    log_s1 = (j * log_1mq + i * log_q + (i * i - i) / (2 * sigma**2) + special.log_ndtr((z0 - i) / sigma))
    log_s2 = (i * log_1mq + j * log_q + (j * j - j) / (2 * sigma**2) + special.log_ndtr((j - z0) / sigma))
    log_terms = log_abs_binom + np.logaddexp(log_s1, log_s2)  # (A, N)
    shift = log_terms.max(axis=1, keepdims=True)  # (A, 1)
    partial = np.cumsum(sign * np.exp(log_terms - shift), axis=1)  # (A, N) partial sums, scaled
    tail = partial[:, -(_N_AVERAGE + 1):]  # (A, K+1)
    for _ in range(_N_AVERAGE):  # Euler transform of the alternating tail: average neighbouring partial sums
        tail = 0.5 * (tail[:, 1:] + tail[:, :-1])
    total = tail[:, 0]
    if np.any(total <= 0):
        raise FloatingPointError(f"fractional-order series did not converge for q={q}, sigma={sigma}")
    return np.log(total) + shift[:, 0]


@functools.lru_cache(maxsize=256)
def _rdp_cached(q: float, sigma: float, orders: tuple) -> np.ndarray:
    orders_arr = np.asarray(orders, dtype=float)
    if sigma == 0:
        return np.full(len(orders_arr), np.inf)
    if q == 1.0:
        return orders_arr / (2 * sigma**2)
    out = np.empty(len(orders_arr))
    is_int = orders_arr == np.round(orders_arr)
    if is_int.any():
        out[is_int] = _log_a_integer(orders_arr[is_int], q, sigma)
    if (~is_int).any():
        out[~is_int] = _log_a_fractional(orders_arr[~is_int], q, sigma)
    rdp = out / (orders_arr - 1)
    rdp.setflags(write=False)
    return rdp


def compute_rdp(*, sample_rate: float, noise_multiplier: float, orders=None) -> np.ndarray:
    """RDP (one value per order) of ONE Poisson-subsampled Gaussian step; multiply by the step count."""
    orders = DEFAULT_ORDERS if orders is None else _check_orders(orders)
    q = check_sample_rate(sample_rate)
    sigma = check_noise_multiplier(noise_multiplier)
    return np.array(_rdp_cached(q, sigma, tuple(float(o) for o in orders)))


def rdp_to_epsilon(orders, rdp, delta: float, *, warn: bool = True) -> tuple[float, float]:
    """(epsilon, optimal order) from composed RDP values (Balle et al. 2020, Thm 21), clamped at 0.

    eps(a) = rdp(a) + log((a-1)/a) - (log(delta) + log(a)) / (a-1), minimised over the orders. Warns when
    the minimum sits at the first or last order (a wider grid could give a smaller epsilon).
    """
    orders = np.asarray(orders, dtype=float)
    rdp = np.asarray(rdp, dtype=float)
    with np.errstate(invalid="ignore", over="ignore"):
        eps = rdp + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    if not np.isfinite(eps[best]):
        return math.inf, float("nan")
    if warn and eps[best] > 0 and best in (0, len(orders) - 1):
        warnings.warn(
            f"RDP optimum at the edge of the orders grid (order {orders[best]:g} of "
            f"[{orders[0]:g}, {orders[-1]:g}]); epsilon may be loose, extend the orders",
            RuntimeWarning,
            stacklevel=3,
        )
    return max(0.0, float(eps[best])), float(orders[best])


def _check_orders(orders) -> np.ndarray:
    arr = np.asarray(orders, dtype=float)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 1):
        raise ValueError(f"orders must be a non-empty 1-D list of finite numbers > 1, found {orders!r}")
    return np.unique(arr)


@register_accountant("rdp")
class RDPAccountant(Accountant):
    """Renyi-DP accountant of Poisson-subsampled Gaussian steps (log space, exact at fractional orders).

    ``orders``: RDP orders (> 1); default :data:`DEFAULT_ORDERS`, 1.1..10.9 by 0.1, integers to 64, then
    geometric to 4096. Composition adds RDP per order; ``get_epsilon`` converts with Balle et al. 2020.
    """

    def __init__(self, orders=None) -> None:
        super().__init__()
        self.orders = DEFAULT_ORDERS.copy() if orders is None else _check_orders(orders)
        self._orders_key = tuple(float(o) for o in self.orders)

    def _config(self) -> dict:
        return {"orders": list(self._orders_key)}

    def rdp(self) -> np.ndarray:
        """Composed RDP of the ledger, one value per order."""
        total = np.zeros(len(self.orders))
        for sigma, q, steps in self.history:
            total = total + steps * _rdp_cached(q, sigma, self._orders_key)
        return total

    def get_epsilon_and_order(self, delta: float) -> tuple[float, float]:
        """(epsilon, optimal RDP order) at ``delta``; order is nan when nothing or no privacy was composed."""
        delta = self._check_delta(delta)
        if not self._ledger:
            return 0.0, float("nan")
        if self._no_privacy():
            return math.inf, float("nan")
        return rdp_to_epsilon(self.orders, self.rdp(), delta)

    def get_epsilon(self, delta: float) -> float:
        return self.get_epsilon_and_order(delta)[0]
