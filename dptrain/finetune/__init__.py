"""Private fine-tuning of Hugging Face causal language models.

    from dptrain.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(model="gpt2", data="notes.jsonl", lora=True, target_epsilon=3.0,
                                     output_dir="out"))

``PrivateLMTrainer`` is the lower-level piece (your own model, tokenizer and texts); ``per_sample_lm_loss``
is the per-sample loss DP-SGD clips (mean over a sample's non-padding target tokens).
"""

from dptrain.finetune.api import finetune, resolve_controller
from dptrain.finetune.config import FinetuneConfig
from dptrain.finetune.data import Canary, PrivateCorpus, load_texts, synthetic_private_records, synthetic_public_corpus
from dptrain.finetune.loss import PadCollator, TokenizedTexts, per_sample_lm_loss, perplexity
from dptrain.finetune.modeling import apply_lora, detect_lora_targets, load_pretrained, tiny_gpt2
from dptrain.finetune.optimizers import OPTIMIZERS, build_optimizer
from dptrain.finetune.tokenizer import byte_tokenizer
from dptrain.finetune.trainer import FinetuneResult, PrivateLMTrainer, default_delta

__all__ = [
    "finetune", "resolve_controller", "FinetuneConfig", "FinetuneResult", "PrivateLMTrainer", "default_delta",
    "Canary", "PrivateCorpus", "load_texts", "synthetic_private_records", "synthetic_public_corpus",
    "PadCollator", "TokenizedTexts", "per_sample_lm_loss", "perplexity",
    "apply_lora", "detect_lora_targets", "load_pretrained", "tiny_gpt2",
    "OPTIMIZERS", "build_optimizer", "byte_tokenizer",
]
