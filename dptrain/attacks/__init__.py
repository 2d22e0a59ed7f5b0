"""Membership inference, canary exposure and privacy auditing.

Submodules, each with one job:

- ``scores``   membership scores from losses, token log-probs and logits (LOSS, reference, zlib, Min-K%, phi)
- ``lm``       the same scores computed from a causal LM on ``input_ids`` / ``attention_mask`` (torch)
- ``metrics``  ROC curve, exact AUC, TPR at low FPR, balanced accuracy, bootstrap intervals
- ``lira``     LiRA online/offline and a shadow-model training helper
- ``canaries`` canary templates, insertion and exposure (exact, interpolated, skew-normal)
- ``audit``    one-run (Steinke et al. 2023) and multi-run (Clopper-Pearson) lower bounds on epsilon
- ``plots``    ROC (log-log) and exposure histogram PNGs

``import dptrain.attacks`` needs only numpy/scipy; ``lm`` (torch) and ``plots`` (matplotlib) load on first use.
"""

from importlib import import_module

from .audit import (
    MultiRunAuditResult,
    OneRunAuditResult,
    clopper_pearson_lower,
    clopper_pearson_upper,
    multi_run_audit,
    multi_run_audit_epsilon,
    one_run_audit,
    one_run_audit_epsilon,
    one_run_audit_p_value,
    run_one_run_audit,
    sample_inclusion_mask,
    scan_one_run_audit,
)
from .canaries import (
    CHANCE_EXPOSURE_BITS,
    Canary,
    CanaryTemplate,
    estimate_exposure,
    exposure_exact,
    exposure_interpolated,
    exposure_skewnorm,
    insert_canaries,
    make_canaries,
)
from .lira import ShadowModels, inclusion_masks, lira_offline, lira_online, train_shadow_models
from .metrics import roc_auc, roc_curve, roc_metrics, tpr_at_fpr
from .scores import logit_confidence, loss_score, min_k_score, reference_score, zlib_length, zlib_score

_LAZY = {
    "token_log_probs": "dptrain.attacks.lm",
    "sequence_nll": "dptrain.attacks.lm",
    "lm_scores": "dptrain.attacks.lm",
    "tokenize_texts": "dptrain.attacks.lm",
    "plot_roc": "dptrain.attacks.plots",
    "plot_exposure_histogram": "dptrain.attacks.plots",
}

__all__ = [
    # scores
    "loss_score",
    "reference_score",
    "zlib_length",
    "zlib_score",
    "min_k_score",
    "logit_confidence",
    # metrics
    "roc_curve",
    "roc_auc",
    "tpr_at_fpr",
    "roc_metrics",
    # lira
    "lira_online",
    "lira_offline",
    "inclusion_masks",
    "ShadowModels",
    "train_shadow_models",
    # canaries
    "CHANCE_EXPOSURE_BITS",
    "Canary",
    "CanaryTemplate",
    "make_canaries",
    "insert_canaries",
    "exposure_exact",
    "exposure_interpolated",
    "exposure_skewnorm",
    "estimate_exposure",
    # audit
    "one_run_audit_epsilon",
    "one_run_audit_p_value",
    "one_run_audit",
    "sample_inclusion_mask",
    "run_one_run_audit",
    "scan_one_run_audit",
    "OneRunAuditResult",
    "multi_run_audit",
    "multi_run_audit_epsilon",
    "MultiRunAuditResult",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    # lazy (torch / matplotlib)
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dptrain.attacks' has no attribute {name!r}")
