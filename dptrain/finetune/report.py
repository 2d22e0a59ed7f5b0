"""Run outputs: ``report.json`` and ``training.png`` (against steps: the DP-noised training loss, the held-out
perplexity (not private) and epsilon; the raw training loss only with the NON-PRIVATE flag ``debug_train_loss``).

``report.json`` is released: it holds DP values, public settings, and values marked "not private"; its
``privacy`` section states the trust model. The secrets (checkpoint, audit secret) live in ``private/``
(``dptrain.finetune.secret_files``), never in the report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["write_report", "plot_training", "privacy_report", "LOSS_NOTE", "NOT_PRIVATE_WARNING"]

LOSS_NOTE = ("dp_train_loss is each step's mean training loss (per-sample losses clipped to [0, 10]) plus Gaussian "
             "noise, released as part of that step's accounted mechanism: DP, covered by epsilon. train_loss (only "
             "with --debug-train-loss) is the mean loss of each Poisson batch on the PRIVATE records without noise: "
             "non-private debugging output, do not publish it. eval perplexities (eval_perplexity_before, "
             "eval_perplexity, history[].eval_perplexity) are computed without noise on private held-out records: "
             "NOT PRIVATE either (--no-eval skips them).")
NOT_PRIVATE_WARNING = ("--insecure-seed {seed} was given: the noise and the Poisson batches can be regenerated from "
                       "it (it is in this report), so this model is NOT PRIVATE. Tests and debugging only.")


def privacy_report(trust: Dict[str, Any], cfg, loss_noise_multiplier: Optional[float] = None) -> Dict[str, Any]:
    """The ``privacy`` section of report.json: the engine's trust model plus what is and is not DP."""
    dp = ["model weights (and LoRA adapter/)"]
    if loss_noise_multiplier is not None:
        dp.append(f"history[].dp_train_loss: mean per-sample loss clipped to [0, 10] plus Gaussian noise (multiplier "
                  f"{loss_noise_multiplier:.3g}), accounted with its step's gradient (same batch, one mechanism)")
    return {
        **trust,
        "insecure_seed": cfg.insecure_seed,
        "seed": ("--seed fixes public randomness only (initialisation, data split, demo data and pretraining, "
                 "LoRA init); the noise and the batches come from "
                 + ("--insecure-seed (NOT PRIVATE)" if cfg.insecure_seed is not None else "secret OS entropy")),
        "dp": dp,
        "not_private": {
            "eval_perplexity_before, eval_perplexity": "computed WITHOUT noise from private held-out records"
                                                       + (" (skipped: --no-eval)" if not cfg.evaluate else
                                                          "; --no-eval skips them"),
            "history[].eval_perplexity": "the same, every eval_every steps (for the plot)",
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


def plot_training(path, history: List[Dict[str, float]], *, target_epsilon: float, delta: float,
                  eval_before: Optional[float] = None, eval_after: Optional[Tuple[int, Optional[float]]] = None) -> None:
    """Side by side against steps: training loss (DP-noised; the NON-PRIVATE debug loss only when recorded),
    held-out perplexity (no noise: not private; ``eval_before`` at step 0, ``eval_after`` = (step, perplexity) at
    the end when the history has no point there) and epsilon. Panels without data are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        points = [(h["step"], h[key]) for h in history if h.get(key) is not None]
        return [s for s, _ in points], [v for _, v in points]

    dp_loss, debug_loss, ppl = series("dp_train_loss"), series("train_loss"), series("eval_perplexity")
    if eval_after is not None and eval_after[1] is not None and eval_after[0] not in ppl[0]:
        ppl = (ppl[0] + [eval_after[0]], ppl[1] + [eval_after[1]])
    if ppl[0] and eval_before is not None:
        ppl = ([0] + ppl[0], [eval_before] + ppl[1])
    panels = [name for name, xy in (("loss", dp_loss[0] or debug_loss[0]), ("ppl", ppl[0])) if xy] + ["eps"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    ax = dict(zip(panels, axes[0]))
    if "loss" in ax:
        if dp_loss[0]:
            ax["loss"].plot(*dp_loss, ".", color="tab:blue", alpha=0.35, ms=4, label="per step, DP-noised")
            ax["loss"].plot(dp_loss[0], _moving_average(dp_loss[1], 10), color="tab:blue", lw=1.5,
                            label="mean of 10 steps (DP)")
        if debug_loss[0]:
            ax["loss"].plot(*debug_loss, color="tab:orange", lw=1, label="no noise: NOT PRIVATE (debug)")
        ax["loss"].set_ylabel("mean per-sample training loss (nats)")
        ax["loss"].set_title("training loss (DP: accounted in epsilon)" if dp_loss[0] else
                             "training loss: NON-PRIVATE debug output", fontsize=9)
        ax["loss"].legend(fontsize=8)
    if "ppl" in ax:
        ax["ppl"].plot(*ppl, "o-", color="tab:green", ms=3, lw=1.5, label="held-out records (step 0: before)")
        ax["ppl"].set_ylabel("perplexity")
        ax["ppl"].set_title("held-out perplexity (no noise: NOT private)", fontsize=9)
        ax["ppl"].legend(fontsize=8)
    steps, eps = series("epsilon")
    ax["eps"].plot(steps, eps, color="tab:red", lw=1.5, label="spent")
    ax["eps"].axhline(target_epsilon, color="grey", ls="--", lw=1, label=f"target {target_epsilon:g}")
    ax["eps"].set_ylabel(f"epsilon (delta = {delta:.2g})")
    ax["eps"].set_title("privacy spent", fontsize=9)
    ax["eps"].legend(loc="lower right", fontsize=8)
    for a in axes[0]:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _moving_average(values: List[float], window: int) -> List[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out
