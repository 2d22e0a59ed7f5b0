"""The bundled demo: a tiny GPT-2 with the byte tokenizer, briefly pretrained (non-privately) on the public
synthetic corpus, so that DP fine-tuning starts from a model that already knows letters and words.

Pretraining sees only public text; the privacy guarantee covers the private records alone.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.utils.data import DataLoader

from dptrain.finetune.data import synthetic_public_corpus
from dptrain.finetune.loss import PadCollator, TokenizedTexts, per_sample_lm_loss
from dptrain.finetune.modeling import tiny_gpt2
from dptrain.finetune.tokenizer import byte_tokenizer

__all__ = ["demo_model_and_tokenizer", "pretrain_public"]

logger = logging.getLogger(__name__)

DEMO_MODEL = dict(n_layer=2, n_embd=128, n_head=4)


def demo_model_and_tokenizer(max_length: int = 128, seed: int = 0):
    """The untrained demo model (from a config, no download) and its byte-level tokenizer."""
    tokenizer = byte_tokenizer(model_max_length=max_length)
    model = tiny_gpt2(len(tokenizer), n_positions=max_length, seed=seed, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **DEMO_MODEL)
    # saved with the model: generate() writes up to one record (it stops at <eos>, or at the model's max_length
    # tokens in all), sampling rather than greedy decoding, which loops on a model this small
    gen = model.generation_config
    gen.max_length, gen.do_sample, gen.top_k, gen.temperature = max_length, True, 20, 0.8
    return model, tokenizer


def pretrain_public(model, tokenizer, *, steps: int, batch_size: int = 24, lr: float = 3e-3, max_length: int = 128,
                    seed: int = 0, records: int = 4000, progress: bool = False) -> float:
    """Non-private AdamW on the public corpus for ``steps`` steps; returns the last batch loss."""
    if steps <= 0:
        return float("nan")
    texts = synthetic_public_corpus(records, seed=seed + 10_000)
    data = TokenizedTexts(texts, tokenizer, max_length)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator,
                        collate_fn=PadCollator(tokenizer.pad_token_id), drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    # cosine decay to 0 over the run
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    device = next(model.parameters()).device
    model.train()
    done, loss = 0, torch.tensor(float("nan"))
    bar = None
    if progress:
        import sys

        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="public pretraining (non-private)", unit="step", file=sys.stderr)
    while done < steps:
        for batch in loader:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (B, T)
            loss = per_sample_lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask).mean()
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if bar is not None:
                bar.update(1)
            if done >= steps:
                break
    if bar is not None:
        bar.close()
    logger.info("public pretraining: %d steps, last loss %.3f", steps, float(loss.detach()))
    return float(loss.detach())
