"""Per-example membership scores of a causal language model (torch; the only LM-facing attack module).

Works with any ``transformers`` causal LM, or any module called as ``model(input_ids=..., attention_mask=...)``
that returns a tensor of logits or an object with ``.logits`` of shape (B, T, V). Position t's logits predict
token t + 1; a target token counts only when both it and its context position are real (attention_mask 1), so
padding (right or left) never enters a score. Right padding is recommended: with left padding the model must
handle position ids itself.

All functions run batched under ``torch.no_grad()`` in eval mode (the model's training flag is restored), and
return numpy arrays so :mod:`dptrain.attacks.metrics` can consume them directly.
"""

from __future__ import annotations

import numpy as np
import torch

from dptrain.validation import check_choice, check_positive_int

from . import scores as _scores

__all__ = [
    "token_log_probs",
    "sequence_nll",
    "loss_scores",
    "reference_scores",
    "min_k_scores",
    "zlib_scores",
    "lm_scores",
    "tokenize_texts",
]


def _check_inputs(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(np.asarray(input_ids))
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"input_ids must be an integer tensor, found dtype {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (N >= 1, T >= 2), found shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif not isinstance(attention_mask, torch.Tensor):
        attention_mask = torch.as_tensor(np.asarray(attention_mask))
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, found {tuple(attention_mask.shape)}"
        )
    return input_ids.long(), attention_mask.long()


def _logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None:
        raise TypeError(f"model output must be a logits tensor or have .logits, found {type(out).__name__}")
    return logits


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def token_log_probs(model, input_ids, attention_mask=None, *, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities of each target token and the mask of real targets.

    Returns ``(logprobs, mask)``, both (N, T - 1): logprobs[i, t] = log p(x_{t+1} | x_{<=t}) in float64
    (computed in float32 at least), 0.0 where ``mask`` is False.
    """
    ids, att = _check_inputs(input_ids, attention_mask)
    batch_size = check_positive_int("batch_size", batch_size)
    device = _model_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    lps, masks = [], []
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                b_ids = ids[start : start + batch_size].to(device)  # (B, T)
                b_att = att[start : start + batch_size].to(device)  # (B, T)
                logits = _logits(model, b_ids, b_att)[:, :-1].float()  # (B, T-1, V) predicts tokens 1..T-1
                target = b_ids[:, 1:]  # (B, T-1)
                # log p = z_target - logsumexp(z): no second (B, T-1, V) tensor for a full log_softmax
                lp = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, T-1)
                mask = (b_att[:, 1:] > 0) & (b_att[:, :-1] > 0)  # (B, T-1) real target with a real context
                lps.append(torch.where(mask, lp, torch.zeros_like(lp)).double().cpu())
                masks.append(mask.cpu())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return torch.cat(lps).numpy(), torch.cat(masks).numpy()


def _reduce_nll(logprobs: np.ndarray, mask: np.ndarray, reduction: str) -> np.ndarray:
    check_choice("reduction", reduction, ("mean", "sum"))
    counts = mask.sum(axis=1)
    if (counts == 0).any():
        raise ValueError(f"every example needs at least 2 real tokens, found {int((counts == 0).sum())} example(s) with fewer")
    total = -(logprobs * mask).sum(axis=1)
    return total if reduction == "sum" else total / counts


def sequence_nll(model, input_ids, attention_mask=None, *, reduction: str = "mean", batch_size: int = 16) -> np.ndarray:
    """Per-example negative log-likelihood over real target tokens: ``"mean"`` (the causal-LM loss; its exp is
    the perplexity) or ``"sum"`` (the total log-perplexity used to rank canaries)."""
    lp, mask = token_log_probs(model, input_ids, attention_mask, batch_size=batch_size)
    return _reduce_nll(lp, mask, reduction)


def loss_scores(model, input_ids, attention_mask=None, *, batch_size: int = 16) -> np.ndarray:
    """LOSS score: -mean token NLL per example."""
    return _scores.loss_score(sequence_nll(model, input_ids, attention_mask, batch_size=batch_size))


def reference_scores(model, reference_model, input_ids, attention_mask=None, *, batch_size: int = 16) -> np.ndarray:
    """Reference-model score: loss under ``reference_model`` minus loss under ``model`` (same tokenization)."""
    loss = sequence_nll(model, input_ids, attention_mask, batch_size=batch_size)
    ref = sequence_nll(reference_model, input_ids, attention_mask, batch_size=batch_size)
    return _scores.reference_score(loss, ref)


def min_k_scores(model, input_ids, attention_mask=None, *, k: float = 0.2, batch_size: int = 16) -> np.ndarray:
    """Min-K% Prob score: mean of the lowest k fraction of target-token log-probs per example."""
    lp, mask = token_log_probs(model, input_ids, attention_mask, batch_size=batch_size)
    return _scores.min_k_score(lp, mask, k=k)


def zlib_scores(model, input_ids, attention_mask, texts, *, batch_size: int = 16) -> np.ndarray:
    """zlib-ratio score: -mean token NLL / zlib length of each text (texts aligned with input_ids rows)."""
    return _scores.zlib_score(sequence_nll(model, input_ids, attention_mask, batch_size=batch_size), texts)


def lm_scores(
    model,
    input_ids,
    attention_mask=None,
    *,
    texts=None,
    reference_model=None,
    k: float = 0.2,
    batch_size: int = 16,
) -> dict[str, np.ndarray]:
    """All LM scores from one pass of ``model``: ``loss`` and ``min_k`` always, ``zlib`` when ``texts`` are
    given, ``reference`` when ``reference_model`` is given. Also returns ``nll`` (mean token NLL)."""
    lp, mask = token_log_probs(model, input_ids, attention_mask, batch_size=batch_size)
    nll = _reduce_nll(lp, mask, "mean")
    out = {"nll": nll, "loss": _scores.loss_score(nll), "min_k": _scores.min_k_score(lp, mask, k=k)}
    if texts is not None:
        out["zlib"] = _scores.zlib_score(nll, texts)
    if reference_model is not None:
        ref = sequence_nll(reference_model, input_ids, attention_mask, batch_size=batch_size)
        out["reference"] = _scores.reference_score(nll, ref)
    return out


def tokenize_texts(tokenizer, texts, *, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` for ``texts`` with a Hugging Face tokenizer.

    Texts are tokenized one by one and padded here (with the pad token, else EOS), so the tokenizer's own
    padding side and settings are neither read nor changed."""
    texts = list(texts)
    if not texts:
        raise ValueError("texts must hold at least one string, found none")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad token nor an EOS token to pad with")
    encoded = [tokenizer(t, truncation=max_length is not None, max_length=max_length)["input_ids"] for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(texts), width), pad_id, dtype=torch.long)  # (N, T)
    att = torch.zeros((len(texts), width), dtype=torch.long)  # (N, T)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
        att[i, : len(e)] = 1
    return ids, att
