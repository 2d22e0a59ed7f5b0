"""Greedy completions of a few held-out prompts, before and after fine-tuning, for report.json: what a person
reads to see what the private fine-tuning changed.

The prompts are the first half (by words) of fresh synthetic records drawn from the bundled generator with the
public seed + 2: public text, in no training or held-out set. The completions "before" come from the pretrained
model (public); "after" from the fine-tuned model, i.e. post-processing of the DP release.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from dptrain.validation import check_positive_int

__all__ = ["completion_prompts", "greedy_completions", "completions_report", "COMPLETIONS_NOTE", "MAX_NEW_TOKENS"]

MAX_NEW_TOKENS = 40
COMPLETIONS_NOTE = ("greedy decoding (at most 40 new tokens, stopping at the end of a record) of prompts that are the "
                    "first half of fresh synthetic records (public generator, seed + 2; in no training or held-out "
                    "set): 'before' from the pretrained model, 'after' from the released DP model (post-processing)")


def completion_prompts(count: int, *, seed: int) -> List[str]:
    """``count`` prompts: the first half of the words of fresh synthetic records (no canaries)."""
    from dptrain.finetune.data import synthetic_private_records

    check_positive_int("count", count)
    records = synthetic_private_records(count, seed=seed + 2, canary_repeats=()).records
    return [" ".join(text.split()[: max(1, len(text.split()) // 2)]) for text in records]


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: List[str], *, max_new_tokens: int = MAX_NEW_TOKENS) -> List[str]:
    """The greedy continuation of each prompt (new text only, special tokens dropped), one prompt at a time (no
    padding), in eval mode; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: List[str] = []
    try:
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)  # (1, P)
            if ids.shape[1] and ids[0, -1].item() == tokenizer.eos_token_id:
                ids = ids[:, :-1]  # a tokenizer that appends EOS would end the record before it starts
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, num_beams=1)[0, ids.shape[1]:]  # (<= max_new,)
            out.append(tokenizer.decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def completions_report(prompts: List[str], before: List[str], after: List[str]) -> Dict:
    """The ``completions`` section of report.json."""
    return {"note": COMPLETIONS_NOTE,
            "items": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after)]}
