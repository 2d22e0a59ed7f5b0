"""Small models covering every per-layer rule, each with a batch and a per-sample loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Case:
    model: nn.Module
    inputs: dict  # batch-first tensors
    per_sample_loss: Callable[[nn.Module, dict], torch.Tensor]  # -> (B,)

    @property
    def batch_size(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    def sample(self, i: int) -> dict:
        return {k: v[i : i + 1] for k, v in self.inputs.items()}


def lm_loss(model, inputs) -> torch.Tensor:
    """Per-sample causal-LM loss: mean over the sample's next-token predictions, (B,)."""
    logits = model(input_ids=inputs["input_ids"]).logits  # (B, T, V)
    tokens = F.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["input_ids"][:, 1:].flatten(), reduction="none")
    return tokens.view(logits.shape[0], logits.shape[1] - 1).mean(1)


class TinyLM(nn.Module):
    """Embedding -> Linear -> GELU -> LayerNorm -> RMSNorm -> Linear head (no tie)."""

    def __init__(self, vocab=23, d=8, hidden=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.up = nn.Linear(d, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.rms = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        h = self.rms(self.norm(F.gelu(self.up(self.embed(input_ids)))))
        return type("Out", (), {"logits": self.head(h)})()


class FunctionalScale(nn.Module):
    """A raw nn.Parameter used in arithmetic, not through a registered layer: goes to the torch.func fallback."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.shift = nn.Parameter(torch.zeros(d) + 0.1)

    def forward(self, x):
        return torch.tanh(x * self.scale) + self.shift * x.pow(2)


class FallbackNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.mix = FunctionalScale(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.mix(self.inp(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(2, 3, 3, padding=1, stride=(1, 2))
        self.group_norm = nn.GroupNorm(1, 3)  # no rule: fallback
        self.conv1 = nn.Conv1d(3, 4, 2, dilation=2)
        self.fc = nn.Linear(4 * 6, 3)

    def forward(self, x):  # x: (B, 2, 5, 10)
        h = torch.relu(self.group_norm(self.conv2(x)))  # (B, 3, 5, 5)
        h = self.conv1(h.flatten(2)[:, :, :10])  # (B, 4, 8)
        return self.fc(h[:, :, :6].flatten(1))


def classification_loss(model, inputs) -> torch.Tensor:
    return F.cross_entropy(model(inputs["x"]), inputs["y"], reduction="none")


def tiny_lm_case(seed=0, batch=4, length=6) -> Case:
    torch.manual_seed(seed)
    model = TinyLM()
    ids = torch.randint(0, 23, (batch, length))
    return Case(model, {"input_ids": ids}, lm_loss)


def gpt2_case(seed=0, batch=3, length=7) -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=41, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    return Case(model, {"input_ids": torch.randint(0, 41, (batch, length))}, lm_loss)


def llama_case(seed=0, batch=3, length=7) -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=37, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    return Case(model, {"input_ids": torch.randint(0, 37, (batch, length))}, lm_loss)


def lora_case(seed=0, batch=3, length=7) -> Case:
    from peft import LoraConfig, get_peft_model

    case = gpt2_case(seed, batch, length)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_dropout=0.0)
    model = get_peft_model(case.model, config)
    with torch.no_grad():  # LoRA B starts at zero; make it non-zero so A's gradients are too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return Case(model, case.inputs, lm_loss)


def fallback_case(seed=0, batch=5) -> Case:
    torch.manual_seed(seed)
    return Case(FallbackNet(), {"x": torch.randn(batch, 6), "y": torch.randint(0, 3, (batch,))}, classification_loss)


def conv_case(seed=0, batch=4) -> Case:
    torch.manual_seed(seed)
    return Case(ConvNet(), {"x": torch.randn(batch, 2, 5, 10), "y": torch.randint(0, 3, (batch,))}, classification_loss)


CASES = {
    "tiny_lm": tiny_lm_case,
    "gpt2_tied": gpt2_case,
    "llama": llama_case,
    "lora": lora_case,
    "fallback": fallback_case,
    "conv": conv_case,
}
