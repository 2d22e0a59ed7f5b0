"""The main job's settings per built-in model: what ``dptrain finetune --model NAME`` uses for every setting
not given on the command line (``FinetuneConfig.for_model``).

``smollm2-135m`` (the default of ``dptrain finetune``): LoRA r 16 on q/k/v/o, sized so that the whole job
(model load, held-out perplexity before and after, training, completions, saving) ends within 10 minutes on 2
CPU cores; measured in benchmarks/RESULTS.md, section ``main_job``. ``tiny``: the dataclass defaults (the
one-minute demo). Files, folders and hub names get the dataclass defaults too.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from dptrain.finetune.models import SMOLLM2, TINY

__all__ = ["PRESETS", "preset"]

PRESETS: Dict[str, Dict[str, Any]] = {
    SMOLLM2: dict(
        lora=True, lora_r=16, lora_alpha=32.0, lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"],
        demo_records=4000,  # N: delta = min(1e-5, 1/N^1.1) = 1e-5
        batch_size=16, epochs=0.1, lr=2e-3,  # 25 logical steps of 16 expected records
        max_length=64,  # a bundled record is 56 tokens on average (at most 66)
        demo_eval_records=64, eval_every=0,  # held-out perplexity before and after only (each ~25 s on one core)
        completions=3,
    ),
    TINY: {},
}


def preset(model: Optional[str]) -> Dict[str, Any]:
    """A copy of the built-in settings for ``model`` (None or ``tiny``: the demo; other values: none)."""
    key = TINY if model is None else str(model).lower()
    return {k: (list(v) if isinstance(v, list) else v) for k, v in PRESETS.get(key, {}).items()}
