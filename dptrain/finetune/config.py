"""``FinetuneConfig``: every setting of a private fine-tuning run, validated in one place."""

from __future__ import annotations

from dptrain.validation import check_choice, check_int, check_optional_int, check_positive, check_positive_int, check_probability
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["FinetuneConfig", "CLIPPING_MODES", "ACCOUNTANTS", "default_delta", "DEFAULT_DELTA_RULE"]

CLIPPING_MODES = ("flat", "per_layer", "automatic")
ACCOUNTANTS = ("rdp", "pld")

# settings that do not change what the run computes (left out of the resume fingerprint; data_sha256 covers the
# text column)
_NOT_IN_FINGERPRINT = {"output_dir", "overwrite", "resume", "checkpoint_every", "stop_after", "progress", "device",
                       "debug_train_loss", "evaluate", "eval_every", "text_column"}

DEFAULT_DELTA_RULE = "min(1e-5, 1/N^1.1)"


def default_delta(n: int) -> float:
    """The default delta for N records, min(1e-5, 1/N^1.1): well below 1/N, and at most 1e-5. One rule for
    ``dptrain budget``, ``dptrain finetune`` and ``DPTrainer``."""
    return min(1e-5, check_positive_int("the number of records N", n) ** -1.1)


@dataclass
class FinetuneConfig:
    """What to fine-tune, on what, under which privacy budget. ``model=None`` is the bundled demo model."""

    # "smollm2-135m", a .gguf file, a folder or a hub name (dptrain.finetune.models); None or "tiny": the demo's
    # tiny GPT-2 + byte tokenizer. FinetuneConfig.for_model(name) adds the main job's settings for a built-in name
    model: Optional[str] = None
    data: Optional[str] = None  # .jsonl/.csv/.txt file or a folder of .txt files (data.py); None: synthetic records
    text_column: str = "text"  # the field of a JSONL record / column of a CSV file holding the text
    eval_data: Optional[str] = None  # held-out records; None: demo eval set, or a held-out part of --data
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: Optional[List[str]] = None  # None: detected from the model family
    target_epsilon: float = 3.0
    delta: Optional[float] = None  # None: default_delta(N) = min(1e-5, 1/N^1.1)
    epochs: float = 2.0
    batch_size: int = 64  # expected logical batch (Poisson)
    physical_batch_size: Optional[int] = None  # memory knob: micro-batches of at most this many rows
    lr: float = 2e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    clipping: str = "flat"
    accountant: str = "rdp"
    max_grad_norm: float = 1.0
    error_feedback: bool = False
    controller: Optional[str] = None
    max_steps: Optional[int] = None  # cap on logical steps (the noise is calibrated for the capped run)
    max_length: int = 128
    seed: int = 0  # PUBLIC randomness only: initialisation, data split, demo data and pretraining, LoRA init
    # NOT PRIVATE (tests/debugging only): fixes the noise (seed N) and the Poisson batches (N + 1), so anyone who
    # reads report.json can regenerate the noise; None: both come from OS entropy (secret)
    insecure_seed: Optional[int] = None
    secure_mode: bool = False  # fresh OS entropy at every noise/sampling draw; the checkpoint holds no key
    output_dir: Optional[str] = None
    overwrite: bool = False
    resume: bool = False
    checkpoint_every: int = 25
    stop_after: Optional[int] = None  # stop (checkpointed) after this many steps, as if interrupted
    progress: bool = True
    debug_train_loss: bool = False  # record/plot the training loss: NON-PRIVATE debugging output, off by default
    evaluate: bool = True  # held-out perplexity before/after: computed WITHOUT noise from private held-out records
    eval_every: Optional[int] = None  # steps between held-out perplexities for the plot (None: ~8 per run; 0: off)
    # release the mean training loss (per-sample losses clipped to [0, 10]) with Gaussian noise at every step, as
    # part of the step's accounted mechanism (the gradient's noise rises ~3% so that epsilon stays the same)
    dp_train_loss: bool = True
    device: str = "auto"
    # one-run audit: this many canaries, each trained on once with probability 1/2 (0: none; see data.py)
    audit_canaries: int = 0
    # demo only
    demo_records: int = 1280
    demo_eval_records: int = 100
    pretrain_steps: int = 30  # tiny demo model only: public pretraining steps
    # greedy completions of this many public prompts before and after training, in report.json (bundled records
    # only; dptrain.finetune.completions)
    completions: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: Optional[str], **settings) -> "FinetuneConfig":
        """The main job for ``model``: its built-in settings (``dptrain.finetune.presets``) under ``settings``."""
        from dptrain.finetune.presets import preset

        return cls(model=model, **{**preset(model), **settings})

    def validate(self) -> "FinetuneConfig":
        for name in ("target_epsilon", "epochs", "lr", "max_grad_norm", "lora_alpha"):
            check_positive(_flag(name), getattr(self, name))
        for name in ("batch_size", "lora_r"):
            check_positive_int(_flag(name), getattr(self, name))
        check_int("max-length", self.max_length, minimum=8)
        for name in ("physical_batch_size", "max_steps", "stop_after"):
            if getattr(self, name) is not None:
                check_positive_int(_flag(name), getattr(self, name))
        if self.eval_every is not None:  # 0: before and after only
            check_int("eval-every", self.eval_every, minimum=0)
        if not isinstance(self.text_column, str) or not self.text_column:
            raise ValueError(f"text-column must be a non-empty name, found {self.text_column!r}")
        from dptrain.finetune.data import MAX_AUDIT_CANARIES

        check_int("completions", self.completions, minimum=0, maximum=20)
        check_int("audit-canaries", self.audit_canaries, minimum=0, maximum=MAX_AUDIT_CANARIES)
        if self.delta is not None:
            check_probability("delta", self.delta)
        check_choice("clipping", self.clipping, CLIPPING_MODES)
        check_choice("accountant", self.accountant, ACCOUNTANTS)
        from dptrain.finetune.optimizers import OPTIMIZERS

        if str(self.optimizer).lower() not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        s = check_optional_int("insecure-seed", self.insecure_seed)
        if self.secure_mode and s is not None:
            raise ValueError(f"--secure-mode draws fresh OS entropy for the noise and the batches; --insecure-seed {s} "
                             "would fix them: pick one")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --output-dir; --overwrite would discard it: pick one")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> Dict[str, Any]:
        out = {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
        for name in ("audit_canaries", "completions"):  # when off, the fingerprint of checkpoints made before them
            if not out[name]:
                out.pop(name)
        return out


def _flag(name: str) -> str:
    """A setting as the command line names it."""
    return name.replace("_", "-")
