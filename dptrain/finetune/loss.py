"""Per-sample causal-LM loss and the tokenized text dataset it is computed on.

A sample's loss is the mean negative log-likelihood over its own non-padding target tokens (labels are the
inputs shifted left by one); the batch loss is the mean over samples. This is the loss DP-SGD clips per
sample. Hugging Face's built-in loss averages over all tokens of the batch instead, which couples samples
(a long record would weigh more than a short one), so it is never used here.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dptrain.losses import causal_lm
from dptrain.validation import check_int

__all__ = ["per_sample_lm_loss", "token_nll", "TokenizedTexts", "PadCollator", "perplexity"]


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Per-token NLL of the next token and the mask of real targets, both (B, T-1)."""
    logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    mask = attention_mask[:, 1:].to(logits.dtype)  # (B, T-1); 0 on padding
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
    return nll * mask, mask


def per_sample_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL over each sample's non-padding target tokens, (B,) (``dptrain.losses.causal_lm``)."""
    return causal_lm(logits, input_ids, attention_mask)  # (B,)


class TokenizedTexts(Dataset):
    """Texts tokenized once (truncated to ``max_length`` tokens); items are ``{"input_ids": (L,)}``. A record that
    fits ends with the tokenizer's EOS token (appended unless already there), so the model learns where records
    end and ``generate`` stops there."""

    def __init__(self, texts: Sequence[str], tokenizer, max_length: int):
        check_int("max_length", max_length, minimum=2)
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        eos = tokenizer.eos_token_id
        if eos is not None:
            encoded = [ids + [eos] if len(ids) < max_length and ids[-1:] != [eos] else ids for ids in encoded]
        self.items: List[torch.Tensor] = [torch.tensor(ids, dtype=torch.long) for ids in encoded]
        short = sum(len(ids) < 2 for ids in self.items)
        if short:
            raise ValueError(f"{short} record(s) tokenize to fewer than 2 tokens: nothing to predict")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.items[i]}


class PadCollator:
    """Right-pads ``input_ids`` to the longest sample of the batch and adds the attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        length = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(samples), length), dtype=torch.long)  # (B, T)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            ids[i, :n] = s["input_ids"]
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def perplexity(model, dataset: TokenizedTexts, collate: PadCollator, batch_size: int = 32) -> float:
    """exp(total NLL / total target tokens) over ``dataset`` (token-weighted, the usual LM perplexity)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        logits = model(input_ids=batch["input_ids"].to(_device(model)),
                       attention_mask=batch["attention_mask"].to(_device(model))).logits
        nll, mask = token_nll(logits, batch["input_ids"].to(logits.device), batch["attention_mask"].to(logits.device))
        total += float(nll.sum())
        count += float(mask.sum())
    model.train(was_training)
    return math.exp(total / max(count, 1.0))


def _device(model) -> torch.device:
    return next(model.parameters()).device
