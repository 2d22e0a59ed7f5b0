"""Run outputs: ``report.json`` and ``training.png`` (epsilon over steps; the training loss only when the
non-private debugging flag ``debug_train_loss`` is on).

With ``--audit-canaries M`` the report also holds, under :data:`AUDIT_SECRET_KEY`, what ``dptrain audit --model``
needs: the canary texts and which were trained on. That is the AUDITOR'S SECRET: not private training data, but
whoever knows the inclusion mask can no longer be audited blindly, so never train on it or publish it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List

__all__ = ["write_report", "plot_training", "audit_secret", "LOSS_NOTE", "AUDIT_SECRET_KEY"]

AUDIT_SECRET_KEY = "audit_canaries_AUDITORS_SECRET"
AUDIT_SECRET_NOTE = ("AUDITOR'S SECRET: the one-run audit canaries and their inclusion mask (1 = trained on once). "
                     "Not private training data, but it must never be fed back into training or any released "
                     "statistic; strip this key before sharing report.json. Used by 'dptrain audit --model'.")

LOSS_NOTE = ("train_loss (present only with --debug-train-loss) is the mean loss of each Poisson batch on the PRIVATE records: non-private debugging "
             "output, not covered by the DP guarantee; do not publish it. eval perplexities are computed on "
             "held-out records and are not DP either.")


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


def audit_secret(num_canaries: int, seed: int) -> Dict[str, Any]:
    """The report entry for a run with ``num_canaries`` audit canaries, rebuilt from the run's ``seed``."""
    from dptrain.finetune.data import AUDIT_CANARY_TEMPLATE, audit_canaries

    canaries = audit_canaries(num_canaries, seed=seed)
    return {"note": AUDIT_SECRET_NOTE, "template": AUDIT_CANARY_TEMPLATE, "seed": canaries.seed,
            "num_canaries": len(canaries.texts), "num_included": sum(canaries.included),
            "canaries": list(canaries.texts), "inclusion_mask": [int(b) for b in canaries.included]}


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
