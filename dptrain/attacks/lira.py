"""Likelihood-ratio attack (LiRA, Carlini et al. 2022, "Membership Inference Attacks From First Principles").

Each example j has a statistic phi (logit-scaled confidence for classifiers, e.g. -loss for LMs) measured on
S shadow models, some trained with j (IN) and some without (OUT). For a target model's statistic phi_j:

- online:  score = log N(phi_j; mu_in_j, s_in_j^2) - log N(phi_j; mu_out_j, s_out_j^2)
- offline: score = -log P[Z > phi_j], Z ~ N(mu_out_j, s_out_j^2)   (one-sided test against OUT only; the
  log survival function keeps resolution deep in the upper tail where members sit)

Per-example variances need >= 2 IN/OUT shadows per example; with few shadows use ``fix_variance=True``: one
global standard deviation per side, pooled over all examples from the deviations around each example's mean.

The scoring functions are numpy only; :func:`train_shadow_models` (torch) is imported lazily.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from dptrain.validation import check_int, check_probability

from ._validate import as_bool_mask, as_scores

__all__ = ["lira_online", "lira_offline", "ShadowModels", "train_shadow_models", "inclusion_masks"]

logger = logging.getLogger(__name__)


def _check(target_stats, shadow_stats, in_mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shadow = as_scores(shadow_stats, "shadow_stats", ndim=2)  # (S, N)
    mask = as_bool_mask(in_mask, "in_mask", shape=shadow.shape)  # (S, N)
    ndim = np.ndim(target_stats)
    if ndim not in (1, 2):
        raise ValueError(f"target_stats must be (N,) or (Q, N), found shape {np.shape(target_stats)}")
    target = as_scores(target_stats, "target_stats", ndim=ndim)  # (N,) or (Q, N)
    if target.shape[-1] != shadow.shape[1]:
        raise ValueError(
            f"target_stats must end with the number of examples ({shadow.shape[1]}), found shape {target.shape}"
        )
    return target, shadow, mask


def _side_stats(shadow: np.ndarray, side: np.ndarray, fix_variance: bool, min_std: float, name: str):
    """Per-example mean and std of the shadow statistics where ``side`` is True."""
    counts = side.sum(axis=0)  # (N,)
    need = 1 if fix_variance else 2
    if (counts < need).any():
        hint = "" if fix_variance else " (use fix_variance=True with few shadow models)"
        raise ValueError(
            f"every example needs >= {need} {name} shadow model(s), found {int((counts < need).sum())} example(s) "
            f"with fewer (min count {int(counts.min())}){hint}"
        )
    values = np.where(side, shadow, 0.0)
    mean = values.sum(axis=0) / counts  # (N,)
    dev2 = np.where(side, (shadow - mean) ** 2, 0.0)  # (S, N)
    if fix_variance:
        dof = side.sum() - shadow.shape[1]  # pooled variance: one mean estimated per example
        if dof < 1:
            raise ValueError(f"a global {name} variance needs more {name} statistics than examples, found {int(side.sum())}")
        std = np.full_like(mean, np.sqrt(dev2.sum() / dof))
    else:
        std = np.sqrt(dev2.sum(axis=0) / (counts - 1))  # unbiased per-example variance
    return mean, np.maximum(std, min_std)


def lira_online(target_stats, shadow_stats, in_mask, *, fix_variance: bool = False, min_std: float = 1e-6) -> np.ndarray:
    """Online LiRA scores (higher = more likely member).

    target_stats: (N,) or (Q, N) statistics of Q target models; shadow_stats and in_mask: (S, N).
    """
    target, shadow, mask = _check(target_stats, shadow_stats, in_mask)
    mu_in, s_in = _side_stats(shadow, mask, fix_variance, min_std, "IN")
    mu_out, s_out = _side_stats(shadow, ~mask, fix_variance, min_std, "OUT")
    return stats.norm.logpdf(target, mu_in, s_in) - stats.norm.logpdf(target, mu_out, s_out)


def lira_offline(target_stats, shadow_stats, in_mask, *, fix_variance: bool = False, min_std: float = 1e-6) -> np.ndarray:
    """Offline LiRA scores from OUT shadows only: -log P[Z > phi], Z ~ N(mu_out, s_out^2)."""
    target, shadow, mask = _check(target_stats, shadow_stats, in_mask)
    mu_out, s_out = _side_stats(shadow, ~mask, fix_variance, min_std, "OUT")
    return -stats.norm.logsf(target, mu_out, s_out)


def inclusion_masks(num_shadow: int, num_examples: int, *, pkeep: float = 0.5, seed: int | None = 0) -> np.ndarray:
    """(S, N) bool mask where every example is IN for exactly round(pkeep * S) shadows, chosen at random."""
    s = check_int("num_shadow", num_shadow, minimum=2)
    n = check_int("num_examples", num_examples, minimum=1)
    keep = int(round(check_probability("pkeep", pkeep) * s))
    if not 0 < keep < s:
        raise ValueError(f"pkeep * num_shadow must round to 1..{s - 1} so each example has IN and OUT shadows, found {keep}")
    rng = np.random.default_rng(seed)
    return rng.random((s, n)).argsort(axis=0) < keep


@dataclass
class ShadowModels:
    """Shadow-model outcome: in_mask[s, j] says whether shadow s trained on example j; stats[s, j] its statistic."""

    in_mask: np.ndarray
    stats: np.ndarray
    models: list = field(default_factory=list)


def _phi_statistic(model, dataset, batch_size: int) -> np.ndarray:
    """Logit-scaled confidence of every (x, y) example of ``dataset`` under ``model`` (torch)."""
    import torch

    from .scores import logit_confidence

    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for x, y in loader:
            logits = model(x.to(device))  # (B, C)
            logits = logits if isinstance(logits, torch.Tensor) else logits.logits
            out.append(logit_confidence(logits.double().cpu().numpy(), y.cpu().numpy()))
    model.train(was_training)
    return np.concatenate(out)


def train_shadow_models(
    *,
    model_fn,
    train_fn,
    dataset,
    num_shadow: int,
    pkeep: float = 0.5,
    seed: int = 0,
    statistic_fn=None,
    batch_size: int = 256,
    keep_models: bool = False,
) -> ShadowModels:
    """Train ``num_shadow`` shadow models on random halves of ``dataset`` and measure every example on each.

    - ``model_fn(s) -> nn.Module``: a fresh model for shadow s (torch is seeded with ``seed + s`` first).
    - ``train_fn(model, subset) -> model | None``: trains on a ``torch.utils.data.Subset`` (in place or returned).
    - ``statistic_fn(model, dataset) -> (N,) array``: the per-example statistic; default: logit-scaled
      confidence phi for a classifier whose items are ``(x, y)`` and whose output is (B, C) logits. For an LM
      pass e.g. ``lambda m, ds: dptrain.attacks.lm.loss_scores(m, ids, mask)``.
    """
    import torch

    n = len(dataset)
    mask = inclusion_masks(num_shadow, n, pkeep=pkeep, seed=seed)  # (S, N)
    stats_rows, models = [], []
    for s in range(mask.shape[0]):
        torch.manual_seed(seed + s)
        model = model_fn(s)
        subset = torch.utils.data.Subset(dataset, np.flatnonzero(mask[s]).tolist())
        trained = train_fn(model, subset)
        model = model if trained is None else trained
        row = statistic_fn(model, dataset) if statistic_fn is not None else _phi_statistic(model, dataset, batch_size)
        stats_rows.append(as_scores(row, f"statistic of shadow {s}"))
        if keep_models:
            models.append(model)
        logger.info("shadow model %d/%d trained on %d of %d examples", s + 1, mask.shape[0], int(mask[s].sum()), n)
    stats_matrix = np.stack(stats_rows)  # (S, N)
    if stats_matrix.shape != mask.shape:
        raise ValueError(f"statistic_fn must return one value per example ({n}), found shape {stats_matrix.shape[1:]}")
    return ShadowModels(in_mask=mask, stats=stats_matrix, models=models)
