"""The base model every party builds identically, with LoRA adapters on top.

``base`` names it: ``"demo"`` (the untrained tiny demo GPT-2), ``"demo:<file>"`` (the demo GPT-2 with weights
saved by :func:`save_demo_base`, e.g. after public pretraining), or a Hugging Face model folder or hub name.
The server and every client must load the same base: only the LoRA factors travel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["load_lora_model", "save_demo_base"]


def _load_base(base: str, max_length: int):
    from dptrain.finetune.demo import demo_model_and_tokenizer

    if not isinstance(base, str) or not base:
        raise ValueError(f"base must be 'demo', 'demo:<file>' or a model folder/name, found {base!r}")
    if base == "demo":
        return demo_model_and_tokenizer(max_length)
    if base.startswith("demo:"):
        path = Path(base[len("demo:"):])
        if not path.is_file():
            raise FileNotFoundError(f"demo base weights not found: {path}")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model, tokenizer = demo_model_and_tokenizer(int(saved["max_length"]))
        model.load_state_dict(saved["state_dict"])
        return model, tokenizer
    from dptrain.finetune.modeling import load_pretrained

    return load_pretrained(base)


def load_lora_model(base: str = "demo", *, r: int = 8, alpha: float = 16.0, lora_seed: int = 0,
                    max_length: int = 128, target_modules: Optional[Sequence[str]] = None):
    """``(peft model, tokenizer)``: the base named by ``base`` with LoRA (rank r) initialised from ``lora_seed``."""
    from dptrain.finetune.modeling import apply_lora

    model, tokenizer = _load_base(base, max_length)
    model = apply_lora(model, r=r, alpha=alpha, target_modules=target_modules, seed=lora_seed)
    return model, tokenizer


def save_demo_base(path, *, pretrain_steps: int = 30, max_length: int = 128, seed: int = 0) -> str:
    """Pretrain the demo GPT-2 on the PUBLIC corpus, save it to ``path``; returns its ``base`` name."""
    from dptrain.finetune.demo import demo_model_and_tokenizer, pretrain_public

    model, tokenizer = demo_model_and_tokenizer(max_length, seed=seed)
    pretrain_public(model, tokenizer, steps=pretrain_steps, max_length=max_length, seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"max_length": max_length, "state_dict": model.state_dict()}, path)
    return f"demo:{path}"
