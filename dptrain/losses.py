"""Per-sample losses for DP-SGD: each returns ONE loss per sample, shape (B,); call ``.sum()`` on it for backward.

dptrain clips each sample's gradient, so the loss you backpropagate must be the SUM of per-sample losses (the
engine's default ``loss_reduction="sum"``): sample i's gradient is then the gradient of its own loss, whoever
else is in the batch. (A mean divides by the batch's size, so with Poisson batches one sample more or less would
re-round every other sample's gradient; ``"mean"`` is for fixed batches only.)

    loss = dptrain.losses.cross_entropy(model(x), y).sum()                                # classification
    loss = dptrain.losses.causal_lm(model(input_ids=ids, attention_mask=mask).logits, ids, mask).sum()  # LM

Do not use Hugging Face's ``model(..., labels=...).loss``: it averages over all tokens of the batch, so a long
record weighs more than a short one and each sample's gradient is not its own loss's. ``check_model_call``
recognises that call (a ``labels`` argument and an output with ``.loss``) and warns.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F

__all__ = ["cross_entropy", "causal_lm", "check_model_call", "BATCH_LOSS_WARNING"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
BATCH_LOSS_WARNING = (
    "the model was called with labels=...: Hugging Face's output.loss is a token mean over the WHOLE batch, not a "
    "sum of per-sample losses as DP-SGD clips them (a long record weighs more than a short one); use "
    "dptrain.losses.causal_lm(output.logits, input_ids, attention_mask).sum() instead")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-sample cross-entropy, (B,). ``logits`` (B, C) with ``targets`` (B,), or token labels: logits (B, T, C)
    with targets (B, T), where each sample's loss is the mean over its own targets != ``ignore_index``."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), targets, reduction="none")  # (B,)
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, C) with targets (B,), or (B, T, C) with (B, T); found "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    mask = (targets != ignore_index).float()  # (B, T)
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp_min(0), reduction="none")  # (B, T)
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B,)


def causal_lm(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """Per-sample next-token loss of a causal LM, (B,): the mean NLL over each sample's own non-padding target
    tokens (targets are ``input_ids`` shifted left by one). A sample with no target counts 0."""
    targets = input_ids[:, 1:]  # (B, T-1)
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    return cross_entropy(logits[:, :-1], targets)  # (B,)


def check_model_call(module: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """A forward hook on ``module`` that warns once when it is called with ``labels=`` and returns an output with
    a ``loss`` (Hugging Face's batch-token-mean loss). Returns the hook's handle (``.remove()`` to drop it)."""
    warned = []

    def hook(mod, args, kwargs, output):
        if not warned and kwargs.get("labels") is not None and getattr(output, "loss", None) is not None:
            warned.append(True)
            warnings.warn(BATCH_LOSS_WARNING, UserWarning, stacklevel=2)

    return module.register_forward_hook(hook, with_kwargs=True)
