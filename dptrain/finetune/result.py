"""``FinetuneResult``: what a ``PrivateLMTrainer`` run produced, and its assembly when the run stops."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from dptrain.finetune.report import privacy_report

__all__ = ["FinetuneResult", "finetune_result"]


@dataclass
class FinetuneResult:
    """What a run produced. DP: the model. Not DP: the held-out perplexities (computed from private held-out
    records without noise) and ``train_loss`` in ``history`` (debugging output); ``privacy`` says which is which."""

    epsilon: float
    delta: float
    target_epsilon: float
    noise_multiplier: float
    steps: int
    total_steps: int
    sample_rate: float
    expected_batch_size: float
    dataset_size: int
    eval_perplexity_before: Optional[float]
    eval_perplexity: Optional[float]
    history: List[Dict[str, float]] = field(default_factory=list)
    # of the whole step as one mechanism (gradient and the DP training-loss release): the ledger's, and what
    # `dptrain budget --noise-multiplier` takes to reproduce epsilon; noise_multiplier is the gradient's alone
    step_noise_multiplier: Optional[float] = None
    finished: bool = True
    privacy: Dict[str, Any] = field(default_factory=dict)  # the trust model (report.json "privacy")
    secret_files: List[str] = field(default_factory=list)  # under output_dir: never publish
    # greedy completions of public prompts before (pretrained model) and after (DP model) training
    completions: Optional[Dict[str, Any]] = None
    model: Any = None

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("model", "history")}


def _final_perplexity(trainer) -> Optional[float]:
    """The held-out perplexity after the last step: that step's history entry when it has one, else evaluated."""
    last = trainer.history[-1] if trainer.history else {}
    after = last.get("eval_perplexity") if last.get("step") == trainer.step else None
    return trainer.evaluate() if after is None else after


def _completions(trainer) -> Optional[Dict[str, Any]]:
    """The completions of the public prompts before and after training (None without prompts)."""
    if not trainer.completion_prompts or trainer.completions_before is None:
        return None
    from dptrain.finetune.completions import completions_report

    return completions_report(trainer.completion_prompts, trainer.completions_before, trainer.complete())


def finetune_result(trainer) -> FinetuneResult:
    """The result of a ``PrivateLMTrainer`` that stopped; the final perplexity and the completions after training
    only when it ran to ``total_steps`` (not after ``stop_after``)."""
    cfg, optimizer = trainer.config, trainer.optimizer
    finished = trainer.step >= trainer.total_steps
    after = _final_perplexity(trainer) if finished else None
    completions = _completions(trainer) if finished else None
    loss_noise = None if trainer.loss_release is None else trainer.loss_release.noise_multiplier
    return FinetuneResult(
        epsilon=trainer.engine.get_epsilon(trainer.delta), delta=trainer.delta, target_epsilon=cfg.target_epsilon,
        noise_multiplier=float(optimizer.noise_multiplier), steps=trainer.step, total_steps=trainer.total_steps,
        sample_rate=trainer.sample_rate, expected_batch_size=float(optimizer.expected_batch_size),
        dataset_size=len(trainer.train_set), eval_perplexity_before=trainer.eval_perplexity_before,
        eval_perplexity=after, history=list(trainer.history), finished=finished, model=trainer.model,
        privacy=privacy_report(trainer.engine.trust_model(), cfg, loss_noise),
        completions=completions,
        step_noise_multiplier=None if trainer.controller is not None else optimizer.plan_step().noise_multiplier,
    )
