"""ROC metrics against closed forms (two normals) and brute-force oracles (ties, thresholds)."""

import math

import numpy as np
import pytest
from scipy import stats

from dptrain.attacks import roc_auc, roc_curve, roc_metrics, tpr_at_fpr


def _brute_auc(member, nonmember):
    diff = np.subtract.outer(np.asarray(member, float), np.asarray(nonmember, float))
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _brute_rates(member, nonmember):
    """(fpr, tpr) for +inf then every distinct score, decreasing, predicting member at score >= t."""
    thresholds = np.r_[np.inf, np.unique(np.r_[member, nonmember])[::-1]]
    return np.array([(np.mean(nonmember >= t), np.mean(member >= t)) for t in thresholds])


def test_two_normals_closed_forms():
    d, n = 1.0, 200_000
    rng = np.random.default_rng(0)
    member, nonmember = rng.normal(d, 1, n), rng.normal(0, 1, n)
    res = roc_metrics(member, nonmember)
    assert res["auc"] == pytest.approx(stats.norm.cdf(d / math.sqrt(2)), abs=0.004)
    for f in (1e-3, 1e-2):
        expected = stats.norm.cdf(d + stats.norm.ppf(f))
        assert res[f"tpr_at_fpr_{f}"] == pytest.approx(expected, abs=max(0.004, 0.15 * expected))
    # best balanced accuracy of two unit normals: threshold at d/2, (Phi(d/2) + Phi(d/2)) / 2
    assert res["balanced_accuracy"] == pytest.approx(stats.norm.cdf(d / 2), abs=0.004)


def test_auc_with_ties_matches_pairwise_oracle():
    rng = np.random.default_rng(1)
    member, nonmember = rng.integers(0, 5, 300), rng.integers(0, 4, 250)  # many ties, integer dtype
    assert roc_auc(member, nonmember) == pytest.approx(_brute_auc(member, nonmember), abs=1e-12)
    assert roc_auc([1, 1, 1], [1, 1]) == 0.5


def test_roc_curve_and_tpr_at_fpr_match_brute_force():
    rng = np.random.default_rng(2)
    member, nonmember = np.round(rng.normal(0.5, 1, 400), 1), np.round(rng.normal(0, 1, 900), 1)
    fpr, tpr, thresholds = roc_curve(member, nonmember)
    brute = _brute_rates(member, nonmember)
    np.testing.assert_allclose(np.c_[fpr, tpr], brute)
    assert np.all(np.diff(thresholds) < 0) and thresholds[0] == np.inf
    for f in (0.0, 1e-3, 0.01, 0.1, 0.5):
        expected = brute[brute[:, 0] <= f, 1].max()
        assert tpr_at_fpr(member, nonmember, f) == expected
    bal = roc_metrics(member, nonmember)["balanced_accuracy"]
    assert bal == pytest.approx(np.max((brute[:, 1] + 1 - brute[:, 0]) / 2))


def test_tpr_at_low_fpr_is_zero_without_a_clean_threshold():
    # the highest score belongs to a non-member: no threshold above 'predict nobody' has FPR <= 0.001
    member, nonmember = np.arange(10.0), np.r_[100.0, np.zeros(9)]
    assert roc_metrics(member, nonmember)["tpr_at_fpr_0.001"] == 0.0


def test_null_scores_give_auc_half():
    rng = np.random.default_rng(3)
    res = roc_metrics(rng.normal(size=20_000), rng.normal(size=20_000))
    assert res["auc"] == pytest.approx(0.5, abs=0.01)
    assert res["tpr_at_fpr_0.01"] < 0.02


def test_bootstrap_intervals_cover_and_have_plausible_width():
    d, n = 1.0, 500
    rng = np.random.default_rng(4)
    member, nonmember = rng.normal(d, 1, n), rng.normal(0, 1, n)
    res = roc_metrics(member, nonmember, bootstrap=300, seed=0)
    lo, hi = res["auc_ci"]
    assert lo < res["auc"] < hi
    assert lo < stats.norm.cdf(d / math.sqrt(2)) < hi
    # Hanley-McNeil standard error of the AUC
    a = res["auc"]
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + (n - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (n * n))
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.3)
    for key in ("tpr_at_fpr_0.001", "tpr_at_fpr_0.01", "balanced_accuracy"):
        k_lo, k_hi = res[f"{key}_ci"]
        assert 0 <= k_lo <= k_hi <= 1
    assert roc_metrics(member, nonmember, bootstrap=50, seed=7) == roc_metrics(member, nonmember, bootstrap=50, seed=7)


@pytest.mark.parametrize(
    "member, nonmember, exc, match",
    [
        ([], [0.1], ValueError, "member_scores must not be empty"),
        ([0.1], np.array([]), ValueError, "nonmember_scores must not be empty"),
        ([0.1, np.nan], [0.1], ValueError, "member_scores must be finite"),
        ([0.1], [np.inf], ValueError, "nonmember_scores must be finite"),
        (["a", "b"], [0.1], TypeError, "member_scores must hold real numbers"),
        ([0.1], np.array([1 + 2j]), TypeError, "nonmember_scores must hold real numbers"),
        ([True, False], [0.1], TypeError, "found dtype bool"),
        ([[0.1, 0.2]], [0.1], ValueError, "must be a 1-D array"),
    ],
)
def test_bad_scores(member, nonmember, exc, match):
    with pytest.raises(exc, match=match):
        roc_metrics(member, nonmember)
