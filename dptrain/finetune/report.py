"""Run outputs: ``report.json`` and ``training.png`` (epsilon over steps; the training loss only when the
non-private debugging flag ``debug_train_loss`` is on).

``report.json`` is released: it holds DP values, public settings, and values marked "not private"; its
``privacy`` section states the trust model. The secrets (checkpoint, audit secret) live in ``private/``
(``dptrain.finetune.secret_files``), never in the report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List

__all__ = ["write_report", "plot_training", "privacy_report", "LOSS_NOTE", "NOT_PRIVATE_WARNING"]

LOSS_NOTE = ("train_loss (present only with --debug-train-loss) is the mean loss of each Poisson batch on the "
             "PRIVATE records: non-private debugging output, not covered by the DP guarantee; do not publish it. "
             "eval perplexities are computed without noise on private held-out records: NOT PRIVATE either "
             "(--no-eval skips them).")
NOT_PRIVATE_WARNING = ("--insecure-seed {seed} was given: the noise and the Poisson batches can be regenerated from "
                       "it (it is in this report), so this model is NOT PRIVATE. Tests and debugging only.")


def privacy_report(trust: Dict[str, Any], cfg) -> Dict[str, Any]:
    """The ``privacy`` section of report.json: the engine's trust model plus what is and is not DP."""
    return {
        **trust,
        "insecure_seed": cfg.insecure_seed,
        "seed": ("--seed fixes public randomness only (initialisation, data split, demo data and pretraining, "
                 "LoRA init); the noise and the batches come from "
                 + ("--insecure-seed (NOT PRIVATE)" if cfg.insecure_seed is not None else "secret OS entropy")),
        "dp": ["model weights (and LoRA adapter/)"],
        "not_private": {
            "eval_perplexity_before, eval_perplexity": "computed WITHOUT noise from private held-out records"
                                                       + (" (skipped: --no-eval)" if not cfg.evaluate else
                                                          "; --no-eval skips them"),
            "history[].train_loss, history[].batch_size": "--debug-train-loss only: loss and size of private batches",
            "dataset_size": "N, the number of training records, released as is (delta and the sample rate follow "
                            "from it)",
        },
        "ranks": ("DDP/FSDP under torchrun: every rank is trusted (each knows its own noise share and its shard's "
                  "batches); the guarantee is against whoever sees only the released files"),
    }


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_report(path, report: Dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(_clean(report), indent=2, sort_keys=True) + "\n")


def plot_training(path, history: List[Dict[str, float]], *, target_epsilon: float, delta: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    with_loss = all("train_loss" in h for h in history)  # only with the non-private debug flag
    fig, axes = plt.subplots(1, 2 if with_loss else 1, figsize=(10 if with_loss else 5.5, 3.8), squeeze=False)
    ax_eps = axes[0, -1]
    if with_loss:
        ax_loss = axes[0, 0]
        ax_loss.plot(steps, [h["train_loss"] for h in history], lw=1)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("mean per-sample loss")
        ax_loss.set_title("training loss (private data: NON-PRIVATE debug output)", fontsize=9)
    ax_eps.plot(steps, [h["epsilon"] for h in history], color="tab:red", lw=1.5)
    ax_eps.axhline(target_epsilon, color="grey", ls="--", lw=1, label=f"target {target_epsilon:g}")
    ax_eps.set_xlabel("step")
    ax_eps.set_ylabel(f"epsilon spent (delta={delta:.2g})")
    ax_eps.set_title("privacy spent", fontsize=9)
    ax_eps.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
