"""Fixtures of the federated tests: one torch thread, a tiny LoRA model."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Tiny torch ops on one thread (a loaded 2-core machine turns intra-op spinning into seconds)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_lora():
    """``(peft model, tokenizer, initial factors)``: a 1-layer GPT-2 (width 32) with rank-2 LoRA."""
    from dptrain.federated import get_factors
    from dptrain.finetune.modeling import apply_lora, tiny_gpt2
    from dptrain.finetune.tokenizer import byte_tokenizer

    tok = byte_tokenizer(model_max_length=32)
    model = tiny_gpt2(len(tok), n_positions=32, n_layer=1, n_embd=32, n_head=2, seed=0,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = apply_lora(model, r=2, alpha=4.0, seed=0)
    return model, tok, get_factors(model)
