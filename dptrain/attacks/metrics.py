"""Membership-inference metrics from attack scores (numpy/scipy only).

Convention everywhere: a HIGHER score means "more likely a member"; a threshold t predicts member when
score >= t. Metrics follow Carlini et al. 2022 ("Membership Inference Attacks From First Principles"): report the
full ROC, its AUC, and the TPR at low FPR.

- AUC is exact with ties: the Mann-Whitney statistic P[S_member > S_nonmember] + 0.5 P[S_member = S_nonmember].
- TPR at FPR f: the largest TPR among the ROC's thresholds whose empirical FPR is <= f (no interpolation, so
  it is 0 when no threshold reaches FPR <= f except "predict nobody").
- Balanced accuracy: max over thresholds of (TPR + 1 - FPR) / 2.
- Bootstrap confidence intervals resample members and non-members separately (percentile method, 95%).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from dptrain.validation import check_int, check_number

from ._validate import as_scores

__all__ = ["roc_curve", "roc_auc", "tpr_at_fpr", "roc_metrics", "METRIC_KEYS"]

_FPR_TARGETS = {"tpr_at_fpr_0.001": 1e-3, "tpr_at_fpr_0.01": 1e-2}
METRIC_KEYS = ("auc", *_FPR_TARGETS, "balanced_accuracy")


def _pair(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray]:
    return as_scores(member_scores, "member_scores"), as_scores(nonmember_scores, "nonmember_scores")


def _roc(member: np.ndarray, nonmember: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for validated arrays; first point (0, 0) at threshold +inf, last (1, 1)."""
    scores = np.concatenate([member, nonmember])
    is_member = np.concatenate([np.ones(member.size, bool), np.zeros(nonmember.size, bool)])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    # last index of each run of equal scores: a threshold there counts the whole tie group
    last = np.flatnonzero(np.diff(scores) != 0)
    last = np.append(last, scores.size - 1)
    tp = np.cumsum(is_member)[last]
    fp = np.cumsum(~is_member)[last]
    tpr = np.concatenate([[0.0], tp / member.size])
    fpr = np.concatenate([[0.0], fp / nonmember.size])
    thresholds = np.concatenate([[np.inf], scores[last]])
    return fpr, tpr, thresholds


def roc_curve(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)``, thresholds decreasing, one point per distinct score.

    Point j predicts member for score >= thresholds[j]; the first point is (0, 0) at threshold +inf.
    """
    return _roc(*_pair(member_scores, nonmember_scores))


def _auc(member: np.ndarray, nonmember: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted 1/2, via average ranks."""
    ranks = stats.rankdata(np.concatenate([member, nonmember]))  # average ranks for ties
    u = ranks[: member.size].sum() - member.size * (member.size + 1) / 2.0
    return float(u / (member.size * nonmember.size))


def roc_auc(member_scores, nonmember_scores) -> float:
    """Exact ROC AUC = P[member > nonmember] + 0.5 P[tie] (Mann-Whitney U / (n_member n_nonmember))."""
    return _auc(*_pair(member_scores, nonmember_scores))


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    return float(tpr[fpr <= target].max())  # (0, 0) is always eligible


def tpr_at_fpr(member_scores, nonmember_scores, target_fpr: float) -> float:
    """Largest TPR among thresholds whose empirical FPR is <= ``target_fpr``."""
    target = check_number("target_fpr", target_fpr, low=0.0, high=1.0)
    fpr, tpr, _ = _roc(*_pair(member_scores, nonmember_scores))
    return _tpr_at(fpr, tpr, target)


def _metrics(member: np.ndarray, nonmember: np.ndarray) -> dict[str, float]:
    fpr, tpr, _ = _roc(member, nonmember)
    out = {"auc": _auc(member, nonmember)}
    for key, target in _FPR_TARGETS.items():
        out[key] = _tpr_at(fpr, tpr, target)
    out["balanced_accuracy"] = float(np.max((tpr + 1.0 - fpr) / 2.0))
    return out


def roc_metrics(member_scores, nonmember_scores, *, bootstrap: int = 0, seed: int | None = None) -> dict:
    """AUC, TPR at 0.1% and 1% FPR, and best-threshold balanced accuracy of an attack.

    With ``bootstrap = B > 0`` also returns ``<key>_ci = (low, high)``: 95% percentile intervals over B
    resamples (members and non-members resampled separately, with replacement).
    """
    member, nonmember = _pair(member_scores, nonmember_scores)
    b = check_int("bootstrap", bootstrap, minimum=0)
    out: dict = _metrics(member, nonmember)
    if b:
        rng = np.random.default_rng(seed)
        samples = np.empty((b, len(METRIC_KEYS)))
        for i in range(b):
            res = _metrics(rng.choice(member, member.size), rng.choice(nonmember, nonmember.size))
            samples[i] = [res[k] for k in METRIC_KEYS]
        low, high = np.percentile(samples, [2.5, 97.5], axis=0)
        for j, key in enumerate(METRIC_KEYS):
            out[f"{key}_ci"] = (float(low[j]), float(high[j]))
    return out
