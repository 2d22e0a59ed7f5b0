"""Causal LMs for fine-tuning: the demo's tiny GPT-2 built from a config, hub/local/GGUF loading, and LoRA.

Nothing here downloads anything unless the user names a hub model.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import torch
from torch import nn

from dptrain.validation import check_positive_int

__all__ = ["tiny_gpt2", "load_pretrained", "detect_lora_targets", "apply_lora", "trainable_parameters"]

logger = logging.getLogger(__name__)

# leaf-module names of attention projections, per model family, in order of preference
_LORA_TARGETS = (
    (("c_attn",), ["c_attn", "c_proj"]),  # GPT-2 (HF Conv1D)
    (("q_proj", "v_proj"), ["q_proj", "v_proj"]),  # Llama, Mistral, Qwen, OPT, ...
    (("query_key_value",), ["query_key_value"]),  # GPT-NeoX, Falcon, BLOOM
    (("Wqkv",), ["Wqkv"]),  # MPT
)


def tiny_gpt2(vocab_size: int, *, n_positions: int = 128, n_layer: int = 2, n_embd: int = 128, n_head: int = 4,
              seed: int = 0, pad_token_id: Optional[int] = None, bos_token_id: Optional[int] = None,
              eos_token_id: Optional[int] = None) -> nn.Module:
    """A small GPT-2 (tied embedding and LM head, no dropout) initialised from ``seed``; no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model


def load_pretrained(name_or_path: str, *, cache_dir=None):
    """``(model, tokenizer)`` via ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained``: a folder, a hub name,
    a ``.gguf`` file (or a folder holding one) or ``smollm2-135m`` (``dptrain.finetune.models``; GGUF files are
    converted to fp32 once and cached in ``cache_dir``, default ``dptrain.finetune.gguf.default_cache_dir()``).

    A local folder is read without touching the network; a hub name not in the local cache fails at once, with
    a one-line error, when the hub cannot be reached (instead of HF's minute of retries). The pad token is set
    to the EOS token when the tokenizer has none; padding goes on the right.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dptrain.finetune.models import TINY, resolve_model

    source = resolve_model(str(name_or_path))
    if source.kind == TINY:
        raise ValueError(f"model {TINY!r} is built from a config, not loaded: use dptrain.finetune.demo."
                         "demo_model_and_tokenizer(), or a save_pretrained folder")
    if source.kind == "gguf":
        from dptrain.finetune.gguf import converted_folder

        name_or_path = str(converted_folder(source.path, cache_dir))
    local = _resolve_model_source(str(name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32, local_files_only=local,
                                                     **torch_layers_only())
    except OSError as err:  # not found locally nor on the hub
        raise FileNotFoundError(f"cannot load model {name_or_path!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def torch_layers_only() -> dict:
    """``from_pretrained`` keyword that keeps every layer's torch forward: transformers >= 5.25 replaces layers with
    hub kernels by default when the ``kernels`` package is installed, and those bypass the per-sample rules."""
    from transformers import PreTrainedModel

    return {"use_kernels": False} if hasattr(PreTrainedModel, "set_use_kernels") else {}


_NO_MODEL_HINT = ("pass a local folder (save_pretrained) or a .gguf file, or --model smollm2-135m / --model tiny for the "
                  "bundled models (no download)")


def _resolve_model_source(name: str) -> bool:
    """True when ``name`` is read from disk only (a local folder, or a hub name in the local cache); raises
    ``FileNotFoundError`` with a one-line reason for a missing folder or an unreachable hub."""
    import os

    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isdir(name):
        return True
    try:
        validate_repo_id(name)
        is_hub_name = not name.startswith((".", "~", "/")) and not os.path.exists(name)
    except HFValidationError:
        is_hub_name = False
    if not is_hub_name:
        raise FileNotFoundError(f"model folder not found: {name} (expected a save_pretrained folder with "
                                "config.json, a .gguf file, smollm2-135m, tiny, or a Hugging Face hub name such as "
                                "gpt2)")
    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return True
        raise FileNotFoundError(f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                                f"download it once with network access, or {_NO_MODEL_HINT}")
    try:  # one quick request instead of HF's minute of retries
        from huggingface_hub import get_session

        get_session().head(constants.ENDPOINT, timeout=5)
        return False
    except Exception as err:  # noqa: BLE001 - any failure means: no hub from here
        if cached:
            return True  # the cached copy, without network
        raise FileNotFoundError(
            f"cannot load model {name!r}: no such local folder, and {constants.ENDPOINT} is unreachable "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no reply'}); {_NO_MODEL_HINT}; "
            "with HF_HUB_OFFLINE=1 models already in the Hugging Face cache load without network") from None


def detect_lora_targets(model: nn.Module) -> List[str]:
    """LoRA target modules for ``model``'s family: c_attn/c_proj (GPT-2), q_proj/v_proj (Llama-style), ..."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for needed, targets in _LORA_TARGETS:
        if all(n in leaf_names for n in needed):
            return [t for t in targets if t in leaf_names]
    raise ValueError(
        f"cannot detect LoRA target modules for {type(model).__name__}: none of "
        f"{sorted({n for needed, _ in _LORA_TARGETS for n in needed})} found; pass target modules explicitly"
    )


def apply_lora(model: nn.Module, *, r: int = 8, alpha: float = 16.0, target_modules: Optional[Sequence[str]] = None,
               dropout: float = 0.0, seed: Optional[int] = None) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters; only the adapters stay trainable.

    ``seed`` makes the adapters' random initialisation reproducible (needed to resume a run exactly).
    """
    from peft import LoraConfig, get_peft_model

    check_positive_int("lora r", r)
    targets = list(target_modules) if target_modules else detect_lora_targets(model)
    conv1d = any(type(m).__name__ == "Conv1D" and name.rsplit(".", 1)[-1] in targets
                 for name, m in model.named_modules())
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM", fan_in_fan_out=conv1d)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = get_peft_model(model, config)
    logger.info("LoRA r=%d alpha=%g on %s: %d trainable parameters", r, alpha, targets,
                sum(p.numel() for p in trainable_parameters(model)))
    return model


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
