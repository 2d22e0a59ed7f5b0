"""Byte tokenizer round trip and the per-sample LM loss (padding never changes a sample's loss)."""

import math

import torch
import torch.nn.functional as F

from dptrain.finetune.loss import PadCollator, TokenizedTexts, per_sample_lm_loss, perplexity
from dptrain.finetune.modeling import detect_lora_targets
from dptrain.finetune.tokenizer import byte_tokenizer
from tests.finetune.helpers import tiny_model_and_tokenizer

TEXTS = ["Patient Amelia Okafor, born 1950-02-03.", "naïve café – 😀\ttab", "x"]


def test_byte_tokenizer_round_trip_and_reload(tmp_path):
    tok = byte_tokenizer()
    assert len(tok) == 259
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[1:] == list(text.encode("utf-8"))  # <bos>, one token per byte
        assert tok.decode(ids, skip_special_tokens=True) == text
    # a prompt does not end in <eos> (generation would continue after an end of text); training records do
    data = TokenizedTexts(TEXTS, tok, max_length=64)
    assert [data[i]["input_ids"].tolist() for i in range(3)] == [tok(t)["input_ids"] + [tok.eos_token_id] for t in TEXTS]
    cut = TokenizedTexts(["x" * 100], tok, max_length=16)[0]["input_ids"].tolist()  # truncated: no end of text
    assert len(cut) == 16 and tok.eos_token_id not in cut
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert [again(t)["input_ids"] for t in TEXTS] == [tok(t)["input_ids"] for t in TEXTS]
    assert again.pad_token_id == tok.pad_token_id == 256


def _manual_loss(model, ids):
    """Oracle: one unpadded sample, mean NLL of its next tokens from log_softmax."""
    logits = model(input_ids=ids[None]).logits[0]  # (T, V)
    logp = F.log_softmax(logits[:-1].double(), dim=-1)
    return float(-logp[torch.arange(len(ids) - 1), ids[1:]].mean())


def test_padding_does_not_change_any_samples_loss():
    model, tok = tiny_model_and_tokenizer()
    model.eval()
    data = TokenizedTexts(TEXTS, tok, max_length=64)
    collate = PadCollator(tok.pad_token_id)
    batch = collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        losses = per_sample_lm_loss(model(**batch).logits, batch["input_ids"], batch["attention_mask"])
        extra = 9  # append padding columns to every sample
        ids = F.pad(batch["input_ids"], (0, extra), value=tok.pad_token_id)
        mask = F.pad(batch["attention_mask"], (0, extra), value=0)
        padded = per_sample_lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        oracle = [_manual_loss(model, data[i]["input_ids"]) for i in range(len(data))]
    assert torch.allclose(losses, padded, atol=1e-5)
    assert torch.allclose(losses.double(), torch.tensor(oracle, dtype=torch.float64), atol=1e-4)
    assert batch["attention_mask"].sum(1).tolist() == [len(data[i]["input_ids"]) for i in range(len(data))]


def test_perplexity_is_exp_of_token_weighted_nll():
    model, tok = tiny_model_and_tokenizer()
    data = TokenizedTexts(TEXTS, tok, max_length=64)
    with torch.no_grad():
        nll = sum(_manual_loss(model, data[i]["input_ids"]) * (len(data[i]["input_ids"]) - 1) for i in range(3))
    tokens = sum(len(data[i]["input_ids"]) - 1 for i in range(3))
    assert math.isclose(perplexity(model, data, PadCollator(tok.pad_token_id), batch_size=2),
                        math.exp(nll / tokens), rel_tol=1e-4)


def test_lora_targets_are_detected_per_family():
    from transformers import LlamaConfig, LlamaForCausalLM

    model, _ = tiny_model_and_tokenizer()
    assert detect_lora_targets(model) == ["c_attn", "c_proj"]
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=50))
    assert detect_lora_targets(llama) == ["q_proj", "v_proj"]
