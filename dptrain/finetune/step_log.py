"""What each logical step of a ``PrivateLMTrainer`` run logs: its ``history`` entry and the progress bar's line.

Released (DP): epsilon and the DP-noised mean training loss. Not private: the held-out perplexity (every
``eval_every`` steps) and, with --debug-train-loss, the raw loss and size of the Poisson batch.
"""

from __future__ import annotations

import math
import sys
from typing import Dict, List, Optional

__all__ = ["step_record", "dp_train_loss", "progress_bar", "progress_postfix", "EVAL_POINTS"]

EVAL_POINTS = 8  # held-out perplexities per run for the plot when eval_every is not given


def dp_train_loss(trainer) -> Optional[float]:
    """This step's DP-noised mean loss: the trainer's own release, or the one a controller released this step
    (noisy, accounted); None when neither released one."""
    if trainer.loss_release is not None:
        return trainer.loss_release.released
    c = trainer.controller
    if getattr(c, "loss_bound", None) is not None and getattr(c, "validation_loss", None) is None:
        last = (getattr(c, "history", None) or [{}])[-1]
        return last.get("loss") if last.get("step") == trainer.step else None
    return None


def step_record(trainer, loss_sum: float, rows_seen: int) -> Dict[str, float]:
    """The ``history`` entry of the step just taken: epsilon, the DP training loss, the held-out perplexity every
    ``eval_every`` steps (not private) and, with --debug-train-loss, the raw loss (NOT private)."""
    cfg = trainer.config
    record = {"step": trainer.step, "epsilon": trainer.engine.get_epsilon(trainer.delta)}
    dp_loss = dp_train_loss(trainer)
    if dp_loss is not None:
        record["dp_train_loss"] = dp_loss
    if cfg.debug_train_loss:  # non-private: the loss and size of a batch of private records
        record.update(train_loss=loss_sum / rows_seen if rows_seen else float("nan"), batch_size=rows_seen)
    every = cfg.eval_every if cfg.eval_every is not None else math.ceil(trainer.total_steps / EVAL_POINTS)
    if every and (trainer.step % every == 0 or trainer.step == trainer.total_steps):
        record["eval_perplexity"] = trainer.evaluate()
    return record


def progress_bar(enabled: bool, total: int, initial: int, delta: float):
    """A tqdm bar on stderr over the run's steps, starting at ``initial`` (a resumed run); None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"DP fine-tuning (delta {delta:.2g})", unit="step",
                file=sys.stderr, dynamic_ncols=True)


def progress_postfix(history: List[Dict[str, float]], debug_loss: bool) -> Dict[str, str]:
    """Progress-bar values: epsilon, the DP-noised loss averaged over the last 10 steps, the NON-PRIVATE debug loss."""
    shown = {"eps": f"{history[-1]['epsilon']:.2f}"}
    recent = [h["dp_train_loss"] for h in history[-10:] if "dp_train_loss" in h]
    if recent:
        shown["dp_loss"] = f"{sum(recent) / len(recent):.2f}"
    if debug_loss:
        shown["loss (NOT PRIVATE)"] = f"{history[-1]['train_loss']:.3f}"
    return shown
