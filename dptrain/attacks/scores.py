"""Membership-inference scores from losses, token log-probs and logits (numpy only; higher = more likely member).

- LOSS (Yeom et al. 2018): -loss.
- Reference model (Carlini et al. 2021; Mireshghallah et al. 2022): loss_ref - loss, the target's loss measured
  against a model that never saw the data (e.g. the base checkpoint before fine-tuning).
- zlib ratio (Carlini et al. 2021, "Extracting Training Data"): -NLL / zlib length, NLL the mean per-token
  negative log-likelihood (log-perplexity) and the length that of zlib.compress(text as UTF-8 bytes).
- Min-K% Prob (Shi et al. 2024): mean of the lowest k fraction of the target-token log-probs,
  max(1, floor(k * n)) tokens of n.
- Logit-scaled confidence (Carlini et al. 2022, LiRA): phi = log p_y - log(1 - p_y) = z_y - logsumexp_{j != y} z_j,
  computed from logits without forming 1 - p_y (no cancellation when p_y is near 1).
"""

from __future__ import annotations

import zlib

import numpy as np
from scipy.special import logsumexp

from ._validate import as_bool_mask, as_scores

__all__ = [
    "loss_score",
    "reference_score",
    "zlib_length",
    "zlib_score",
    "min_k_score",
    "logit_confidence",
]


def loss_score(losses) -> np.ndarray:
    """LOSS attack score: -loss per example."""
    return -as_scores(losses, "losses")


def reference_score(losses, reference_losses) -> np.ndarray:
    """Reference-model score: loss_ref - loss (large when the target fits an example better than the reference)."""
    loss = as_scores(losses, "losses")
    ref = as_scores(reference_losses, "reference_losses")
    if ref.shape != loss.shape:
        raise ValueError(f"reference_losses must have the shape of losses {loss.shape}, found {ref.shape}")
    return ref - loss


def zlib_length(text: str | bytes) -> int:
    """Length in bytes of the zlib-compressed UTF-8 encoding of ``text`` (its zlib "entropy")."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    elif not isinstance(text, (bytes, bytearray)):
        raise TypeError(f"text must be str or bytes, found {type(text).__name__}")
    return len(zlib.compress(bytes(text)))


def zlib_score(nll, texts) -> np.ndarray:
    """zlib-ratio score: -NLL / zlib_length(text), NLL the mean token negative log-likelihood of each text."""
    nll = as_scores(nll, "nll")
    texts = list(texts)
    if len(texts) != nll.size:
        raise ValueError(f"texts must hold one text per nll value ({nll.size}), found {len(texts)}")
    lengths = np.array([zlib_length(t) for t in texts], dtype=np.float64)
    return -nll / lengths


def _min_k_one(logprobs: np.ndarray, k: float) -> float:
    n = logprobs.size
    if n == 0:
        raise ValueError("min_k_score needs at least one target token per example, found an example with none")
    count = max(1, int(np.floor(k * n)))
    return float(np.mean(np.partition(logprobs, count - 1)[:count]))


def min_k_score(token_logprobs, mask=None, *, k: float = 0.2) -> np.ndarray:
    """Min-K% Prob score per example: mean of its max(1, floor(k n)) lowest target-token log-probs.

    ``token_logprobs``: a (N, T) array with a (N, T) bool ``mask`` of real target tokens, or a sequence of
    N 1-D arrays (one per example, no mask).
    """
    if not 0.0 < float(k) <= 1.0:
        raise ValueError(f"k must be in (0, 1], found {k}")
    if mask is None:
        rows = [as_scores(row, f"token_logprobs[{i}]") for i, row in enumerate(token_logprobs)]
        if not rows:
            raise ValueError("token_logprobs must hold at least one example, found none")
    else:
        lp = np.asarray(token_logprobs)
        m = as_bool_mask(mask, "mask", shape=lp.shape)
        if lp.ndim != 2:
            raise ValueError(f"token_logprobs must be (N, T) when a mask is given, found shape {lp.shape}")
        lp = np.where(m, lp, 0.0)  # masked slots may hold anything (even -inf); only real tokens are checked
        lp = as_scores(lp, "token_logprobs", ndim=2)
        rows = [lp[i][m[i]] for i in range(lp.shape[0])]
    return np.array([_min_k_one(row, float(k)) for row in rows])


def logit_confidence(logits, labels) -> np.ndarray:
    """phi = log p_y - log(1 - p_y) per example from (N, C) logits and (N,) integer labels.

    Stable form: z_y - logsumexp(z_j, j != y); the 1 - p_y term never appears.
    """
    z = as_scores(logits, "logits", ndim=2)  # (N, C)
    y = np.asarray(labels)
    if y.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, found dtype {y.dtype}")
    if y.shape != (z.shape[0],):
        raise ValueError(f"labels must have shape ({z.shape[0]},), found {y.shape}")
    if z.shape[1] < 2:
        raise ValueError(f"logits need at least 2 classes, found {z.shape[1]}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must be in [0, {z.shape[1]}), found range [{y.min()}, {y.max()}]")
    rows = np.arange(z.shape[0])
    z_y = z[rows, y]  # (N,)
    others = z.copy()
    others[rows, y] = -np.inf  # exclude the true class
    return z_y - logsumexp(others, axis=1)
