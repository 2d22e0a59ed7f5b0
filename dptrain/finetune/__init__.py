"""Private fine-tuning of Hugging Face causal language models.

    from dptrain.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(model="gpt2", data="notes.jsonl", lora=True, target_epsilon=3.0,
                                     output_dir="out"))

``PrivateLMTrainer`` is the lower-level piece (your own model, tokenizer and texts); ``per_sample_lm_loss``
is the per-sample loss DP-SGD clips (mean over a sample's non-padding target tokens); ``load_checkpoint`` opens
the SECRET ``out/private/checkpoint.pt``. Names load on first use, so ``dptrain.finetune.config`` (and
``dptrain budget``) import without transformers.
"""

from importlib import import_module

_LAZY = {
    "finetune": "api", "resolve_controller": "api",
    "FinetuneConfig": "config", "default_delta": "config", "DEFAULT_DELTA_RULE": "config",
    "Canary": "data", "PrivateCorpus": "data", "load_texts": "data", "synthetic_private_records": "data",
    "synthetic_public_corpus": "data", "DATA_FORMATS": "data",
    "PadCollator": "loss", "TokenizedTexts": "loss", "per_sample_lm_loss": "loss", "perplexity": "loss",
    "apply_lora": "modeling", "detect_lora_targets": "modeling", "load_pretrained": "modeling", "tiny_gpt2": "modeling",
    "OPTIMIZERS": "optimizers", "build_optimizer": "optimizers",
    "byte_tokenizer": "tokenizer",
    "FinetuneResult": "trainer", "PrivateLMTrainer": "trainer", "TrainingInterrupted": "trainer",
    "load_checkpoint": "checkpoint",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"dptrain.finetune.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dptrain.finetune' has no attribute {name!r}")
