"""Empirical privacy auditing: lower bounds on epsilon from attack outcomes (numpy/scipy only).

One-run audit (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run"): m canaries are each
included in training with probability 1/2; the auditor guesses "in" for the k+ highest scores and "out" for the
k- lowest. With r = k+ + k- guesses of which v are correct, an (eps, delta)-DP algorithm makes the p-value

    q = e^eps / (1 + e^eps),  beta = P[Bin(r, q) >= v],
    alpha = max_{1 <= i <= v} P[v - i <= Bin(r, q) < v] / i,
    p(eps) = min(1, beta + 2 m delta alpha),

and the audited epsilon is the largest eps with p(eps) < 1 - confidence. The guess counts (k+, k-) must be fixed
before looking at the scores; choosing them by scanning inflates the result unless corrected
(:func:`scan_one_run_audit`).

Multi-run audit: from member/non-member scores of many runs, any threshold t gives TPR <= e^eps FPR + delta for an
(eps, delta)-DP mechanism, so eps >= log((TPR_lo - delta) / FPR_hi) with one-sided Clopper-Pearson bounds. Trying
several thresholds needs a correction: Bonferroni over the thresholds given, or (default) a split of the data into
a half that picks the threshold and a half that audits it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from dptrain.validation import check_choice, check_int, check_number, check_probability

from ._validate import as_bool_mask, as_scores

__all__ = [
    "one_run_audit_epsilon",
    "one_run_audit_p_value",
    "OneRunAuditResult",
    "one_run_audit",
    "sample_inclusion_mask",
    "run_one_run_audit",
    "scan_one_run_audit",
    "MultiRunAuditResult",
    "multi_run_audit",
    "multi_run_audit_epsilon",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
]

logger = logging.getLogger(__name__)

_EPS_MAX = 100.0  # q = e^100/(1+e^100) rounds to 1 in float64: no finite r can audit beyond this
_EPS_TOL = 1e-9


# ----------------------------------------------------------------------------------------------- one-run audit
def one_run_audit_p_value(eps: float, *, num_canaries: int, num_guesses: int, num_correct: int, delta: float = 0.0) -> float:
    """p(eps) of Steinke et al. 2023: a bound on the chance that an (eps, delta)-DP run gives ``num_correct``
    or more correct guesses out of ``num_guesses``. A small p rejects (eps, delta)-DP."""
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, found {eps}")
    return _p_value(float(eps), m, r, v, check_number("delta", delta, low=0.0, high=1.0, high_open=True))


def _p_value(eps: float, m: int, r: int, v: int, delta: float) -> float:
    q = 1.0 / (1.0 + math.exp(-eps))  # e^eps / (1 + e^eps), stable for large eps
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta == 0.0 or v == 0:
        return min(1.0, beta)
    i = np.arange(1, v + 1)
    # P[v - i <= Bin < v] = cdf(v - 1) - cdf(v - i - 1)
    mass = stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - i - 1, r, q)
    alpha = float(np.max(mass / i))
    return min(1.0, beta + 2.0 * m * delta * alpha)


def _check_counts(num_canaries, num_guesses, num_correct) -> tuple[int, int, int]:
    m = check_int("num_canaries", num_canaries, minimum=1)
    r = check_int("num_guesses", num_guesses, minimum=0)
    v = check_int("num_correct", num_correct, minimum=0)
    if r > m:
        raise ValueError(f"num_guesses must be <= num_canaries ({m}), found {r}")
    if v > r:
        raise ValueError(f"num_correct must be <= num_guesses ({r}), found {v}")
    return m, r, v


def one_run_audit_epsilon(
    *, num_canaries: int, num_guesses: int, num_correct: int, delta: float = 0.0, confidence: float = 0.95
) -> float:
    """Largest eps that the one-run audit rejects at ``confidence``: the audited lower bound on epsilon.

    Found by bisection on p(eps) (increasing in eps) to 1e-9; 0.0 when even eps = 0 is not rejected.
    Golden values (delta = 0, 95%): 100/100 -> 3.49, 90/100 -> 1.63, 1000/1000 -> 5.81.
    """
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    delta = check_number("delta", delta, low=0.0, high=1.0, high_open=True)
    threshold = 1.0 - check_probability("confidence", confidence)

    def rejected(eps: float) -> bool:
        return _p_value(eps, m, r, v, delta) < threshold

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):  # bracket: p(eps) -> 1 as eps grows when v <= r
        lo, hi = hi, 2.0 * hi
        if hi > _EPS_MAX:
            return _EPS_MAX
    while hi - lo > _EPS_TOL:
        mid = 0.5 * (lo + hi)
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class OneRunAuditResult:
    """Outcome of a one-run audit: the audited epsilon and the counts it came from."""

    epsilon: float
    num_canaries: int
    num_guesses_pos: int
    num_guesses_neg: int
    num_correct: int
    confidence: float
    delta: float

    @property
    def num_guesses(self) -> int:
        return self.num_guesses_pos + self.num_guesses_neg


def _guess_outcome(scores: np.ndarray, members: np.ndarray, k_pos: int, k_neg: int, rng: np.random.Generator) -> int:
    """Number of correct guesses when "in" is guessed for the top ``k_pos`` and "out" for the bottom ``k_neg``.

    Ties are broken uniformly at random (a fixed order could correlate with how canaries were laid out).
    """
    tie_break = rng.permutation(scores.size)
    order = np.lexsort((tie_break, scores))  # ascending by score, ties by random key
    correct = int(members[order[scores.size - k_pos :]].sum()) if k_pos else 0
    correct += int((~members[order[:k_neg]]).sum())
    return correct


def sample_inclusion_mask(num_canaries: int, *, seed: int | None = 0) -> np.ndarray:
    """Which of ``num_canaries`` canaries go into training: independent fair coins, as the one-run audit's
    analysis assumes (draw this BEFORE training; train on the canaries marked True, score all of them)."""
    m = check_int("num_canaries", num_canaries, minimum=1)
    return np.random.default_rng(seed).random(m) < 0.5


def _check_audit_inputs(scores, inclusion_mask) -> tuple[np.ndarray, np.ndarray]:
    s = as_scores(scores, "scores")
    mask = as_bool_mask(inclusion_mask, "inclusion_mask", shape=s.shape)
    return s, mask


def one_run_audit(
    scores,
    inclusion_mask,
    *,
    num_guesses_pos: int,
    num_guesses_neg: int = 0,
    delta: float = 0.0,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> OneRunAuditResult:
    """One-run audit from canary scores (higher = more likely included) and the true inclusion mask.

    Guess "in" on the ``num_guesses_pos`` top scores and "out" on the ``num_guesses_neg`` bottom scores; abstain
    on the rest. The two counts must be chosen in advance (not by looking at the scores); see
    :func:`scan_one_run_audit` for a corrected search.
    """
    s, mask = _check_audit_inputs(scores, inclusion_mask)
    k_pos = check_int("num_guesses_pos", num_guesses_pos, minimum=0)
    k_neg = check_int("num_guesses_neg", num_guesses_neg, minimum=0)
    if k_pos + k_neg > s.size:
        raise ValueError(
            f"num_guesses_pos + num_guesses_neg must be <= the number of canaries ({s.size}), found {k_pos + k_neg}"
        )
    correct = _guess_outcome(s, mask, k_pos, k_neg, np.random.default_rng(seed))
    eps = one_run_audit_epsilon(
        num_canaries=s.size, num_guesses=k_pos + k_neg, num_correct=correct, delta=delta, confidence=confidence
    )
    return OneRunAuditResult(eps, s.size, k_pos, k_neg, correct, float(confidence), float(delta))


def run_one_run_audit(
    train_and_score,
    *,
    num_canaries: int,
    num_guesses_pos: int,
    num_guesses_neg: int = 0,
    delta: float = 0.0,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> OneRunAuditResult:
    """The whole one-run audit: draw each canary's inclusion by a fair coin, call
    ``train_and_score(inclusion_mask) -> scores`` (train with the included canaries only, then score ALL
    ``num_canaries``; higher = more likely included), and audit with guess counts fixed here, in advance."""
    mask = sample_inclusion_mask(num_canaries, seed=seed)
    k_pos = check_int("num_guesses_pos", num_guesses_pos, minimum=0)
    k_neg = check_int("num_guesses_neg", num_guesses_neg, minimum=0)
    if k_pos + k_neg > mask.size:
        raise ValueError(f"num_guesses_pos + num_guesses_neg must be <= num_canaries ({mask.size}), found {k_pos + k_neg}")
    scores = as_scores(train_and_score(mask.copy()), "scores returned by train_and_score")
    if scores.shape != mask.shape:
        raise ValueError(f"train_and_score must return one score per canary ({mask.size}), found shape {scores.shape}")
    return one_run_audit(
        scores, mask, num_guesses_pos=k_pos, num_guesses_neg=k_neg, delta=delta, confidence=confidence, seed=seed
    )


def scan_one_run_audit(
    scores,
    inclusion_mask,
    *,
    guesses,
    delta: float = 0.0,
    confidence: float = 0.95,
    method: str = "bonferroni",
    seed: int | None = 0,
) -> OneRunAuditResult:
    """One-run audit that searches over a grid of ``guesses`` = [(k+, k-), ...] without inflating the result.

    - ``method="bonferroni"``: audit every grid point at confidence ``1 - (1 - confidence) / len(guesses)`` and
      report the best. By the union bound, the chance that any of them overstates epsilon is at most
      ``1 - confidence``.
    - ``method="split"``: a random half of the canaries picks the grid point (at the nominal confidence); the
      other half is audited once with it (counts scaled to that half's size, rounded down). The search sees
      none of the audited canaries, so no correction is needed, at the cost of half the canaries.
    """
    s, mask = _check_audit_inputs(scores, inclusion_mask)
    grid = [(check_int("k+", kp, minimum=0), check_int("k-", kn, minimum=0)) for kp, kn in guesses]
    if not grid:
        raise ValueError("guesses must hold at least one (k+, k-) pair, found none")
    check_choice("method", method, ("bonferroni", "split"))
    rng = np.random.default_rng(seed)
    if method == "bonferroni":
        level = 1.0 - (1.0 - check_probability("confidence", confidence)) / len(grid)
        results = [
            one_run_audit(s, mask, num_guesses_pos=kp, num_guesses_neg=kn, delta=delta, confidence=level, seed=rng.integers(2**32))
            for kp, kn in grid
        ]
        best = max(results, key=lambda res: res.epsilon)
        logger.info("Bonferroni scan over %d guess pairs: best (k+, k-) = (%d, %d)", len(grid), best.num_guesses_pos, best.num_guesses_neg)
        return OneRunAuditResult(
            best.epsilon, best.num_canaries, best.num_guesses_pos, best.num_guesses_neg, best.num_correct, float(confidence), float(delta)
        )
    if s.size < 2:
        raise ValueError(f"method='split' needs at least 2 canaries, found {s.size}")
    perm = rng.permutation(s.size)
    half = s.size // 2
    pick, audit = perm[:half], perm[half:]
    scale = audit.size / pick.size
    candidates = []
    for kp, kn in grid:
        if kp + kn > pick.size:
            continue
        res = one_run_audit(s[pick], mask[pick], num_guesses_pos=kp, num_guesses_neg=kn, delta=delta, confidence=confidence, seed=rng.integers(2**32))
        candidates.append(res)
    if not candidates:
        raise ValueError(f"every (k+, k-) in guesses exceeds the selection half ({pick.size} canaries)")
    chosen = max(candidates, key=lambda res: res.epsilon)
    kp = min(int(chosen.num_guesses_pos * scale), audit.size)
    kn = min(int(chosen.num_guesses_neg * scale), audit.size - kp)
    logger.info("split scan: chose (k+, k-) = (%d, %d) on %d canaries, auditing %d", kp, kn, pick.size, audit.size)
    return one_run_audit(s[audit], mask[audit], num_guesses_pos=kp, num_guesses_neg=kn, delta=delta, confidence=confidence, seed=rng.integers(2**32))


# --------------------------------------------------------------------------------------------- multi-run audit
def clopper_pearson_lower(successes, trials, alpha: float):
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion (0 when successes = 0)."""
    k, n = np.asarray(successes, dtype=float), np.asarray(trials, dtype=float)
    with np.errstate(invalid="ignore"):
        bound = stats.beta.ppf(alpha, k, n - k + 1)
    return np.where(k > 0, bound, 0.0)


def clopper_pearson_upper(successes, trials, alpha: float):
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion (1 when successes = trials)."""
    k, n = np.asarray(successes, dtype=float), np.asarray(trials, dtype=float)
    with np.errstate(invalid="ignore"):
        bound = stats.beta.ppf(1.0 - alpha, k + 1, n - k)
    return np.where(k < n, bound, 1.0)


@dataclass(frozen=True)
class MultiRunAuditResult:
    """Outcome of a multi-run audit: the lower bound and the threshold and rates it came from."""

    epsilon: float
    threshold: float
    tpr_lower: float
    fpr_upper: float
    num_thresholds: int
    method: str
    confidence: float
    delta: float


def _eps_bounds(member: np.ndarray, nonmember: np.ndarray, thresholds: np.ndarray, delta: float, alpha: float):
    """eps lower bound at each threshold (score >= t guesses member), with each of TPR_lo/FPR_hi at level alpha/2."""
    m_sorted, n_sorted = np.sort(member), np.sort(nonmember)
    tp = member.size - np.searchsorted(m_sorted, thresholds, side="left")  # (K,) members with score >= t
    fp = nonmember.size - np.searchsorted(n_sorted, thresholds, side="left")  # (K,)
    tpr_lo = clopper_pearson_lower(tp, member.size, alpha / 2.0)
    fpr_hi = clopper_pearson_upper(fp, nonmember.size, alpha / 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.log(np.maximum(tpr_lo - delta, 0.0) / fpr_hi)
    eps = np.where(np.isfinite(eps), np.maximum(eps, 0.0), 0.0)
    return eps, tpr_lo, fpr_hi


def multi_run_audit(
    member_scores,
    nonmember_scores,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
    thresholds=None,
    seed: int | None = 0,
) -> MultiRunAuditResult:
    """Multi-run audit: eps_LB = max over thresholds of log((TPR_lo - delta) / FPR_hi), clamped at 0.

    TPR_lo and FPR_hi are one-sided Clopper-Pearson bounds, each at level (1 - confidence) / 2 so both hold
    together. ``thresholds`` given: Bonferroni over them (each pair at (1 - confidence) / (2 K)). ``thresholds``
    None: a random half of each score set picks the threshold (all its unique scores tried), the other half
    audits it uncorrected.
    """
    member = as_scores(member_scores, "member_scores")
    nonmember = as_scores(nonmember_scores, "nonmember_scores")
    delta = check_number("delta", delta, low=0.0, high=1.0, high_open=True)
    alpha = 1.0 - check_probability("confidence", confidence)
    if thresholds is not None:
        t = as_scores(thresholds, "thresholds")
        eps, tpr_lo, fpr_hi = _eps_bounds(member, nonmember, t, delta, alpha / t.size)
        best = int(np.argmax(eps))
        return MultiRunAuditResult(float(eps[best]), float(t[best]), float(tpr_lo[best]), float(fpr_hi[best]), t.size, "bonferroni", 1.0 - alpha, delta)
    if member.size < 2 or nonmember.size < 2:
        raise ValueError(
            f"the split audit needs at least 2 member and 2 non-member scores, found {member.size} and {nonmember.size}"
        )
    rng = np.random.default_rng(seed)
    pm, pn = rng.permutation(member.size), rng.permutation(nonmember.size)
    hm, hn = member.size // 2, nonmember.size // 2
    sel_m, sel_n = member[pm[:hm]], nonmember[pn[:hn]]
    candidates = np.unique(np.concatenate([sel_m, sel_n]))
    eps_sel, _, _ = _eps_bounds(sel_m, sel_n, candidates, delta, alpha)
    threshold = candidates[int(np.argmax(eps_sel))]
    eps, tpr_lo, fpr_hi = _eps_bounds(member[pm[hm:]], nonmember[pn[hn:]], np.array([threshold]), delta, alpha)
    return MultiRunAuditResult(float(eps[0]), float(threshold), float(tpr_lo[0]), float(fpr_hi[0]), 1, "split", 1.0 - alpha, delta)


def multi_run_audit_epsilon(
    member_scores, nonmember_scores, *, delta: float = 0.0, confidence: float = 0.95, thresholds=None, seed: int | None = 0
) -> float:
    """The epsilon lower bound of :func:`multi_run_audit` (a float, >= 0)."""
    return multi_run_audit(
        member_scores, nonmember_scores, delta=delta, confidence=confidence, thresholds=thresholds, seed=seed
    ).epsilon
