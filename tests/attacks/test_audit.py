"""One-run and multi-run audits: golden values, closed forms, null data, and the DP ceiling."""

import math

import numpy as np
import pytest
from scipy import stats

from dptrain.attacks import (
    clopper_pearson_lower,
    clopper_pearson_upper,
    multi_run_audit,
    multi_run_audit_epsilon,
    one_run_audit,
    one_run_audit_epsilon,
    one_run_audit_p_value,
    run_one_run_audit,
    scan_one_run_audit,
)


@pytest.mark.parametrize(
    "m, v, expected",
    [(100, 100, 3.49), (100, 90, 1.63), (1000, 1000, 5.81)],
)
def test_one_run_golden_values(m, v, expected):
    eps = one_run_audit_epsilon(num_canaries=m, num_guesses=m, num_correct=v, delta=0.0, confidence=0.95)
    assert round(eps, 2) == expected


@pytest.mark.parametrize("r", [1, 10, 100, 1000])
def test_one_run_all_correct_closed_form(r):
    # delta = 0, v = r: p(eps) = q^r, so q* = 0.05^(1/r) and eps = logit(q*)
    q = 0.05 ** (1.0 / r)
    expected = math.log(q / (1.0 - q))
    got = one_run_audit_epsilon(num_canaries=r, num_guesses=r, num_correct=r)
    assert got == pytest.approx(max(expected, 0.0), abs=1e-7)


def test_one_run_p_value_at_result_is_the_level():
    eps = one_run_audit_epsilon(num_canaries=500, num_guesses=200, num_correct=170, confidence=0.9)
    p = one_run_audit_p_value(eps, num_canaries=500, num_guesses=200, num_correct=170)
    assert p == pytest.approx(0.1, abs=1e-6)
    assert p < 0.1  # largest eps that is still rejected


def test_one_run_alpha_term_against_direct_formula():
    m, r, v, delta, eps = 1000, 100, 95, 1e-4, 2.0
    q = math.exp(eps) / (1 + math.exp(eps))
    beta = sum(stats.binom.pmf(j, r, q) for j in range(v, r + 1))
    alpha = max(sum(stats.binom.pmf(j, r, q) for j in range(v - i, v)) / i for i in range(1, v + 1))
    expected = min(1.0, beta + 2 * m * delta * alpha)
    got = one_run_audit_p_value(eps, num_canaries=m, num_guesses=r, num_correct=v, delta=delta)
    assert got == pytest.approx(expected, rel=1e-9)


def test_one_run_monotone_in_delta_confidence_and_correct():
    base = dict(num_canaries=1000, num_guesses=200)
    e0 = one_run_audit_epsilon(**base, num_correct=180)
    assert one_run_audit_epsilon(**base, num_correct=180, delta=1e-5) < e0
    assert one_run_audit_epsilon(**base, num_correct=180, confidence=0.99) < e0
    assert one_run_audit_epsilon(**base, num_correct=190) > e0


def test_one_run_chance_level_is_zero():
    # half right: not even eps = 0 is rejected
    assert one_run_audit_epsilon(num_canaries=1000, num_guesses=1000, num_correct=500) == 0.0
    assert one_run_audit_epsilon(num_canaries=10, num_guesses=0, num_correct=0) == 0.0


def test_one_run_audit_on_shuffled_scores_is_zero():
    rng = np.random.default_rng(1)
    mask = rng.random(2000) < 0.5
    scores = rng.normal(size=2000)  # independent of membership
    res = one_run_audit(scores, mask, num_guesses_pos=100, num_guesses_neg=100)
    assert res.epsilon == 0.0
    assert res.num_guesses == 200


def test_one_run_audit_counts_correct_guesses():
    mask = np.array([1, 1, 1, 0, 0, 0, 1, 0], bool)
    scores = np.array([9, 8, 1, 0, 2, 7, 5, 3], float)  # top3: 9,8,7 -> two members; bottom2: 0,1 -> one non-member
    res = one_run_audit(scores, mask, num_guesses_pos=3, num_guesses_neg=2)
    assert res.num_correct == 2 + 1


def _rr_scores(eps, m, rng):
    """eps-DP randomized response on each canary's inclusion bit; score = the released bit."""
    include = rng.random(m) < 0.5
    keep = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
    released = np.where(keep, include, ~include)
    return released.astype(float), include


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_one_run_audit_respects_dp_ceiling(eps):
    # For an eps-DP mechanism the audit exceeds eps with probability <= 1 - confidence; here we count how often
    # across 200 independent runs (exceeding 5% + 3 binomial standard errors fails). The mechanism is exactly
    # tight for these guesses (correct ~ Bin(600, q)), so about 5% of runs are expected to land above eps.
    rng = np.random.default_rng(0)
    results = []
    for _ in range(200):
        scores, include = _rr_scores(eps, 1000, rng)
        # guess on released-1 canaries first (ties broken at random inside one_run_audit)
        res = one_run_audit(scores, include, num_guesses_pos=300, num_guesses_neg=300, seed=int(rng.integers(2**31)))
        results.append(res.epsilon)
    results = np.array(results)
    exceed = np.mean(results > eps)
    assert exceed <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 200)
    assert results.max() < eps + 0.5  # and never far above
    assert np.median(results) > 0.5 * eps  # the audit is not vacuous: it gets close to the tight mechanism


def test_scan_bonferroni_is_more_conservative_than_its_best_single_audit():
    rng = np.random.default_rng(2)
    scores, include = _rr_scores(2.0, 2000, rng)
    scores = scores + 0.01 * rng.normal(size=scores.size)
    grid = [(k, k) for k in (50, 100, 200, 400)]
    scanned = scan_one_run_audit(scores, include, guesses=grid, method="bonferroni")
    single = one_run_audit(
        scores, include, num_guesses_pos=scanned.num_guesses_pos, num_guesses_neg=scanned.num_guesses_neg
    )
    assert 0 < scanned.epsilon < single.epsilon
    split = scan_one_run_audit(scores, include, guesses=grid, method="split")
    assert split.num_canaries == 1000
    assert 0 <= split.epsilon <= 2.0 + 0.5


def test_clopper_pearson_closed_forms():
    # k = 0: upper = 1 - alpha^(1/n); k = n: lower = alpha^(1/n)
    n, a = 50, 0.05
    assert clopper_pearson_upper(0, n, a) == pytest.approx(1 - a ** (1 / n))
    assert clopper_pearson_lower(n, n, a) == pytest.approx(a ** (1 / n))
    assert clopper_pearson_lower(0, n, a) == 0.0
    assert clopper_pearson_upper(n, n, a) == 1.0
    # the lower bound is the p where P[Bin(n, p) >= k] = alpha
    lo = float(clopper_pearson_lower(20, n, a))
    assert stats.binom.sf(19, n, lo) == pytest.approx(a, rel=1e-6)


def test_multi_run_audit_null_is_zero_and_dp_ceiling_holds():
    rng = np.random.default_rng(3)
    assert multi_run_audit_epsilon(rng.normal(size=5000), rng.normal(size=5000)) == 0.0
    eps = 1.0
    exceed = 0
    for _ in range(40):
        m_scores, include = _rr_scores(eps, 4000, rng)
        member, nonmember = m_scores[include], m_scores[~include]
        got = multi_run_audit_epsilon(member, nonmember, thresholds=[0.5])
        exceed += got > eps
        assert multi_run_audit_epsilon(member, nonmember) <= eps + 0.3
    assert exceed <= 5  # 5% level: expect ~0-2 of 40


def test_multi_run_audit_bonferroni_bound_by_hand():
    member = np.r_[np.ones(900), np.zeros(100)]
    nonmember = np.r_[np.ones(100), np.zeros(900)]
    res = multi_run_audit(member, nonmember, thresholds=[0.5], confidence=0.9, delta=0.01)
    lo = stats.beta.ppf(0.05, 900, 101)
    hi = stats.beta.ppf(0.95, 101, 900)
    assert res.epsilon == pytest.approx(math.log((lo - 0.01) / hi))
    assert res.method == "bonferroni" and res.threshold == 0.5
    # adding useless thresholds only tightens the per-threshold level, never raises the bound
    worse = multi_run_audit(member, nonmember, thresholds=[0.5, -1.0, 2.0], confidence=0.9, delta=0.01)
    assert worse.epsilon < res.epsilon


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_canaries=10, num_guesses=5, num_correct=6), "num_correct must be <= num_guesses"),
        (dict(num_canaries=10, num_guesses=11, num_correct=3), "num_guesses must be <= num_canaries"),
        (dict(num_canaries=10, num_guesses=5, num_correct=3, confidence=1.0), "confidence must be a number in"),
        (dict(num_canaries=10, num_guesses=5, num_correct=3, confidence=0.0), "confidence must be a number in"),
        (dict(num_canaries=10, num_guesses=5, num_correct=3, delta=1.0), "delta must be a number in"),
        (dict(num_canaries=10, num_guesses=5, num_correct=3, delta=-0.1), "delta must be a number in"),
        (dict(num_canaries=0, num_guesses=0, num_correct=0), "num_canaries must be an integer >= 1"),
        (dict(num_canaries=10, num_guesses=-1, num_correct=0), "num_guesses must be an integer >= 0"),
    ],
)
def test_one_run_bad_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        one_run_audit_epsilon(**kwargs)


def test_one_run_bad_types_and_scores():
    with pytest.raises(TypeError, match="num_correct must be an integer"):
        one_run_audit_epsilon(num_canaries=10, num_guesses=5, num_correct=2.5)
    with pytest.raises(ValueError, match="non-finite"):
        one_run_audit([0.1, np.nan, 0.3], [1, 0, 1], num_guesses_pos=1)
    with pytest.raises(ValueError, match="inclusion_mask must have shape"):
        one_run_audit([0.1, 0.2, 0.3], [1, 0], num_guesses_pos=1)
    with pytest.raises(ValueError, match="must be <= the number of canaries"):
        one_run_audit([0.1, 0.2, 0.3], [1, 0, 1], num_guesses_pos=2, num_guesses_neg=2)
    with pytest.raises(ValueError, match="must not be empty"):
        multi_run_audit_epsilon([], [0.1])
    with pytest.raises(TypeError, match="real numbers"):
        multi_run_audit_epsilon(["a", "b"], [0.1, 0.2])


def test_run_one_run_audit_end_to_end_with_a_perfect_and_a_blind_model():
    seen = {}

    def memorise(mask):  # a model that fully memorises: included canaries score 1, others 0
        seen["mask"] = mask
        return mask.astype(float)

    res = run_one_run_audit(memorise, num_canaries=200, num_guesses_pos=50, num_guesses_neg=50, seed=1)
    assert res.num_correct == 100
    assert res.epsilon == pytest.approx(one_run_audit_epsilon(num_canaries=200, num_guesses=100, num_correct=100))
    assert abs(seen["mask"].mean() - 0.5) < 0.1
    blind = run_one_run_audit(lambda mask: np.zeros(mask.size), num_canaries=200, num_guesses_pos=50, seed=1)
    assert blind.epsilon == 0.0
    with pytest.raises(ValueError, match="one score per canary"):
        run_one_run_audit(lambda mask: np.zeros(3), num_canaries=200, num_guesses_pos=50)
