"""``PrivateLMTrainer``: DP fine-tuning of a causal LM on a list of texts.

One logical step: Poisson-sample a batch with the expected size, split it into micro-batches of at most
``physical_batch_size`` rows, per micro-batch compute the per-sample LM loss and ``backward()`` (the engine
clips each sample's gradient), ``optimizer.step()`` after each micro-batch; the engine adds noise, steps the
inner optimizer and the accountant only when the logical batch ends. An empty Poisson batch skips the
forward/backward but still steps (noise only): that is what the privacy analysis assumes.

Released along the way (``history``): epsilon per step, the DP-noised mean training loss (``dp_train_loss``: part
of each step's accounted mechanism, ``dptrain.loss_release``) and, every ``eval_every`` steps, the held-out
perplexity (no noise: NOT private). Ctrl-C (or SIGTERM) stops at the end of the current step, writes the SECRET
checkpoint and raises ``TrainingInterrupted``; ``--resume`` continues from there exactly.

This module holds the set-up and the loop; the pieces live beside it: ``private_setup`` (the engine),
``step_log`` (each step's history entry and progress bar), ``stopping`` (Ctrl-C/SIGTERM), ``trainer_state``
(the checkpoint and resume) and ``result`` (``FinetuneResult``).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch

from dptrain import distributed

from dptrain.finetune.checkpoint import save_checkpoint
from dptrain.finetune.config import FinetuneConfig, default_delta
from dptrain.finetune.loss import PadCollator, TokenizedTexts, per_sample_lm_loss, perplexity
from dptrain.finetune.private_setup import make_private_lm
from dptrain.finetune.result import FinetuneResult, finetune_result
from dptrain.finetune.step_log import progress_bar, progress_postfix, step_record
from dptrain.finetune.stopping import TrainingInterrupted, interrupted_error, stop_agreed, stop_requests
from dptrain.finetune.trainer_state import restore_trainer, run_fingerprint, trainer_state
from dptrain.loss_release import LOSS_BOUND, LossRelease

logger = logging.getLogger(__name__)

__all__ = ["PrivateLMTrainer", "FinetuneResult", "TrainingInterrupted", "default_delta", "LOSS_BOUND"]


class PrivateLMTrainer:
    """Private fine-tuning of ``model`` (an ``AutoModelForCausalLM``, possibly peft-wrapped) on ``train_texts``."""

    def __init__(self, model, tokenizer, train_texts: Sequence[str], eval_texts: Optional[Sequence[str]] = None,
                 config: Optional[FinetuneConfig] = None, *, controller=None,
                 completion_prompts: Optional[Sequence[str]] = None):
        self.config = (config or FinetuneConfig()).validate()
        cfg = self.config
        if len(train_texts) == 0:
            raise ValueError("no training records")
        if cfg.batch_size > len(train_texts):
            raise ValueError(f"batch-size {cfg.batch_size} is larger than the dataset ({len(train_texts)} records)")
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if cfg.device == "auto" else cfg.device))
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (set tokenizer.pad_token = tokenizer.eos_token)")
        self.collate = PadCollator(tokenizer.pad_token_id)
        self.train_set = TokenizedTexts(train_texts, tokenizer, cfg.max_length)
        self.eval_set = TokenizedTexts(eval_texts, tokenizer, cfg.max_length) if eval_texts else None
        self.delta = cfg.delta if cfg.delta is not None else default_delta(len(self.train_set))
        self.controller = controller
        self.step = 0
        self.history: List[Dict[str, float]] = []
        self.eval_perplexity_before: Optional[float] = None
        # public prompts completed greedily before and after training (dptrain.finetune.completions)
        self.completion_prompts: List[str] = list(completion_prompts or [])
        self.completions_before: Optional[List[str]] = None
        self.extra_fingerprint: Dict[str, Any] = {}
        self._make_private()

    # ------------------------------------------------------------------ set-up
    def _make_private(self) -> None:
        cfg = self.config
        private = make_private_lm(self.model, self.train_set, self.collate, cfg, self.delta, self.controller,
                                  self.device)
        self.engine, self.net, self.optimizer, self.loader, self.total_steps = private
        self.sample_rate = self.engine.sample_rate  # the ledger's (realizable_rate of B / N)
        self.loss_release: Optional[LossRelease] = None  # the DP-noised training loss, accounted with each step
        if cfg.dp_train_loss and _plain_mechanism(self.controller, cfg) and self.optimizer.noise_multiplier > 0:
            self.loss_release = LossRelease(self.optimizer)
        logger.info("DP fine-tuning: N=%d, q=%.4g, %d steps, sigma=%.4g, target eps=%g at delta=%.3g",
                    len(self.train_set), self.sample_rate, self.total_steps, self.optimizer.noise_multiplier,
                    cfg.target_epsilon, self.delta)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> Optional[float]:
        """Perplexity on the held-out texts (None without them, or with ``evaluate=False``). NOT covered by the DP
        guarantee: computed without noise from private held-out records."""
        if self.eval_set is None or not self.config.evaluate:
            return None
        with self.engine.tracker.capture_disabled():
            return perplexity(self.model, self.eval_set, self.collate)

    def complete(self) -> Optional[List[str]]:
        """Greedy completions of ``completion_prompts`` by the current model (None without prompts)."""
        if not self.completion_prompts:
            return None
        from dptrain.finetune.completions import greedy_completions

        with self.engine.tracker.capture_disabled():
            return greedy_completions(self.model, self.tokenizer, self.completion_prompts)

    # ------------------------------------------------------------------ training
    def train(self, *, checkpoint_path=None) -> FinetuneResult:
        """Runs until ``total_steps`` (or ``config.stop_after``); checkpoints every ``checkpoint_every`` steps and
        when interrupted (then raises ``TrainingInterrupted``)."""
        with stop_requests(distributed.rank_and_world()[1]) as stop:
            if self.step == 0 and self.eval_perplexity_before is None:
                self.eval_perplexity_before = self.evaluate()
            if self.step == 0 and self.completions_before is None:
                self.completions_before = self.complete()  # the pretrained model: public
            interrupted = self._steps(stop, checkpoint_path)
            if checkpoint_path is not None:
                self.save_checkpoint(checkpoint_path)
            if interrupted:
                raise interrupted_error(self.step, self.total_steps, checkpoint_path)
        return finetune_result(self)

    def _steps(self, stop: Dict[str, bool], checkpoint_path) -> bool:
        """The training loop up to ``stop_after``/``total_steps``; True when it stopped on a stop request."""
        cfg = self.config
        stop_at = self.total_steps if cfg.stop_after is None else min(cfg.stop_after, self.total_steps)
        bar = progress_bar(cfg.progress and distributed.rank_and_world()[0] == 0, self.total_steps, self.step,
                           self.delta)
        loss_sum, rows_seen = 0.0, 0  # NOT private: only for --debug-train-loss
        self.model.train()
        interrupted = stop_agreed(stop, self.device)
        try:
            while self.step < stop_at and not interrupted:
                for batch in self.loader:
                    rows = int(batch["input_ids"].shape[0])
                    if rows:
                        loss_sum += float(self._forward_backward(batch).detach().sum())
                        rows_seen += rows
                    before = self.optimizer.steps_taken
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.optimizer.steps_taken == before:
                        continue  # a micro-batch inside a logical batch
                    self._end_step(loss_sum, rows_seen, bar, checkpoint_path)
                    loss_sum, rows_seen = 0.0, 0
                    interrupted = stop_agreed(stop, self.device)  # once per step on every rank
                    if self.step >= stop_at or interrupted:
                        break
        finally:
            if bar is not None:
                bar.close()
        return interrupted

    def _forward_backward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The per-sample LM losses (b,) of a non-empty micro-batch, after ``backward()`` (the engine clips each
        sample's gradient); the losses also go to whoever releases the training loss with noise."""
        ids = batch["input_ids"].to(self.device)  # (b, T)
        mask = batch["attention_mask"].to(self.device)  # (b, T)
        logits = self.net(input_ids=ids, attention_mask=mask).logits  # (b, T, V)
        losses = per_sample_lm_loss(logits, ids, mask)  # (b,)
        losses.sum().backward()  # the sum: a mean would divide by the Poisson batch's realized size
        if getattr(self.controller, "loss_bound", None) is not None:
            self.controller.observe_losses(losses)  # released with noise and accounted
        if self.loss_release is not None:
            self.loss_release.add(losses)
        return losses

    def _end_step(self, loss_sum: float, rows_seen: int, bar, checkpoint_path) -> None:
        """After a logical step: its ``history`` entry, the progress bar and the periodic checkpoint."""
        cfg = self.config
        self.step += 1
        self.history.append(step_record(self, loss_sum, rows_seen))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(**progress_postfix(self.history, cfg.debug_train_loss))
        if checkpoint_path is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self.save_checkpoint(checkpoint_path)  # every rank: their RNG states are gathered

    # ------------------------------------------------------------------ checkpoints (dptrain.finetune.trainer_state)
    def fingerprint(self) -> Dict[str, Any]:
        """What must match for a checkpoint to continue this run: settings, data, parameter names/shapes."""
        return run_fingerprint(self)

    def state_dict(self) -> Optional[Dict[str, Any]]:
        """The SECRET checkpoint payload on rank 0 (None on other ranks); a collective under torchrun."""
        return trainer_state(self)

    def save_checkpoint(self, path) -> None:
        """Collective under torchrun (gathers every rank's RNG states); only rank 0 writes ``path``."""
        state = self.state_dict()
        if state is not None:
            save_checkpoint(path, state)
            logger.info("checkpoint at step %d -> %s", self.step, path)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a checkpoint of the same run (refused with ``ValueError`` otherwise)."""
        restore_trainer(self, state)


def _plain_mechanism(controller, cfg: FinetuneConfig) -> bool:
    """Our own loss release needs the plain step mechanism (a controller releases its own noisy loss; error
    feedback is accounted without amplification)."""
    return controller is None and not cfg.error_feedback
