"""Small models and files shared by the fine-tuning tests."""

from __future__ import annotations

import json

from dptrain.finetune.modeling import tiny_gpt2
from dptrain.finetune.tokenizer import byte_tokenizer


def tiny_model_and_tokenizer(seed: int = 0, n_embd: int = 32, n_layer: int = 1, max_length: int = 64):
    tok = byte_tokenizer(model_max_length=max_length)
    model = tiny_gpt2(len(tok), n_positions=max_length, n_layer=n_layer, n_embd=n_embd, n_head=2, seed=seed,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return model, tok


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path
