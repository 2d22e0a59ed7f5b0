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
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from dptrain import distributed

from dptrain.finetune.checkpoint import save_checkpoint
from dptrain.finetune.config import FinetuneConfig, default_delta
from dptrain.finetune.loss import PadCollator, TokenizedTexts, per_sample_lm_loss, perplexity
from dptrain.finetune.private_setup import make_private_lm
from dptrain.finetune.report import privacy_report
from dptrain.finetune.trainer_state import restore_trainer, run_fingerprint, trainer_state
from dptrain.loss_release import LOSS_BOUND, LossRelease

logger = logging.getLogger(__name__)

__all__ = ["PrivateLMTrainer", "FinetuneResult", "TrainingInterrupted", "default_delta", "LOSS_BOUND"]

EVAL_POINTS = 8  # held-out perplexities per run for the plot when eval_every is not given


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training; the message says what was saved and how to continue."""


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
        out = {k: v for k, v in self.__dict__.items() if k not in ("model", "history")}
        return out


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
        self.sample_rate = cfg.batch_size / len(self.train_set)
        self.loss_release: Optional[LossRelease] = None  # the DP-noised training loss, accounted with each step
        if cfg.dp_train_loss and _plain_mechanism(self.controller, cfg) and self.optimizer.noise_multiplier > 0:
            self.loss_release = LossRelease(self.optimizer)
        logger.info("DP fine-tuning: N=%d, q=%.4g, %d steps, sigma=%.4g, target eps=%g at delta=%.3g",
                    len(self.train_set), self.sample_rate, self.total_steps, self.optimizer.noise_multiplier,
                    cfg.target_epsilon, self.delta)

    def _dp_train_loss(self) -> Optional[float]:
        """This step's DP-noised mean loss: ours, or the one a controller released this step (noisy, accounted)."""
        if self.loss_release is not None:
            return self.loss_release.released
        c = self.controller
        if getattr(c, "loss_bound", None) is not None and getattr(c, "validation_loss", None) is None:
            last = (getattr(c, "history", None) or [{}])[-1]
            return last.get("loss") if last.get("step") == self.step else None
        return None

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
        cfg = self.config
        with _stop_requests(distributed.rank_and_world()[1]) as stop:
            if self.step == 0 and self.eval_perplexity_before is None:
                self.eval_perplexity_before = self.evaluate()
            if self.step == 0 and self.completions_before is None:
                self.completions_before = self.complete()  # the pretrained model: public
            interrupted = self._steps(stop, checkpoint_path)
            if checkpoint_path is not None:
                self.save_checkpoint(checkpoint_path)
            if interrupted:
                raise TrainingInterrupted(
                    f"interrupted after step {self.step}/{self.total_steps}: " + (
                        f"checkpoint saved to {checkpoint_path} (SECRET); continue with the same command plus "
                        "--resume" if checkpoint_path is not None else "no output folder, nothing saved"))
        finished = self.step >= self.total_steps
        last = self.history[-1] if self.history else {}
        after = last.get("eval_perplexity") if finished and last.get("step") == self.step else None
        if finished and after is None:
            after = self.evaluate()
        completions = None
        if finished and self.completion_prompts and self.completions_before is not None:
            from dptrain.finetune.completions import completions_report

            completions = completions_report(self.completion_prompts, self.completions_before, self.complete())
        return FinetuneResult(
            epsilon=self.engine.get_epsilon(self.delta), delta=self.delta, target_epsilon=cfg.target_epsilon,
            noise_multiplier=float(self.optimizer.noise_multiplier), steps=self.step, total_steps=self.total_steps,
            sample_rate=self.sample_rate, expected_batch_size=float(self.optimizer.expected_batch_size),
            dataset_size=len(self.train_set), eval_perplexity_before=self.eval_perplexity_before,
            eval_perplexity=after, history=list(self.history), finished=finished, model=self.model,
            privacy=privacy_report(self.engine.trust_model(), cfg,
                                   None if self.loss_release is None else self.loss_release.noise_multiplier),
            completions=completions,
            step_noise_multiplier=None if self.controller is not None else self.optimizer.plan_step().noise_multiplier,
        )

    def _steps(self, stop: dict, checkpoint_path) -> bool:
        """The training loop up to ``stop_after``/``total_steps``; True when it stopped on a stop request."""
        cfg = self.config
        stop_at = self.total_steps if cfg.stop_after is None else min(cfg.stop_after, self.total_steps)
        bar = _progress(cfg.progress and distributed.rank_and_world()[0] == 0, self.total_steps, self.step, self.delta)
        loss_sum, rows_seen = 0.0, 0  # NOT private: only for --debug-train-loss
        self.model.train()
        interrupted = self._stop_agreed(stop)
        try:
            while self.step < stop_at and not interrupted:
                for batch in self.loader:
                    rows = int(batch["input_ids"].shape[0])
                    if rows:
                        ids = batch["input_ids"].to(self.device)  # (b, T)
                        mask = batch["attention_mask"].to(self.device)  # (b, T)
                        logits = self.net(input_ids=ids, attention_mask=mask).logits  # (b, T, V)
                        losses = per_sample_lm_loss(logits, ids, mask)  # (b,)
                        losses.mean().backward()
                        if getattr(self.controller, "loss_bound", None) is not None:
                            self.controller.observe_losses(losses)  # released with noise and accounted
                        if self.loss_release is not None:
                            self.loss_release.add(losses)
                        loss_sum += float(losses.detach().sum())
                        rows_seen += rows
                    before = self.optimizer.steps_taken
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.optimizer.steps_taken == before:
                        continue  # a micro-batch inside a logical batch
                    self.step += 1
                    self.history.append(self._record(loss_sum, rows_seen))
                    loss_sum, rows_seen = 0.0, 0
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(**_postfix(self.history, cfg.debug_train_loss))
                    if checkpoint_path is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint(checkpoint_path)  # every rank: their RNG states are gathered
                    interrupted = self._stop_agreed(stop)  # once per step on every rank
                    if self.step >= stop_at or interrupted:
                        break
        finally:
            if bar is not None:
                bar.close()
        return interrupted

    def _record(self, loss_sum: float, rows_seen: int) -> Dict[str, float]:
        """This step's ``history`` entry: epsilon, the DP training loss, the held-out perplexity every
        ``eval_every`` steps (not private) and, with --debug-train-loss, the raw loss (NOT private)."""
        cfg = self.config
        record = {"step": self.step, "epsilon": self.engine.get_epsilon(self.delta)}
        dp_loss = self._dp_train_loss()
        if dp_loss is not None:
            record["dp_train_loss"] = dp_loss
        if cfg.debug_train_loss:  # non-private: the loss and size of a batch of private records
            record.update(train_loss=loss_sum / rows_seen if rows_seen else float("nan"), batch_size=rows_seen)
        every = cfg.eval_every if cfg.eval_every is not None else math.ceil(self.total_steps / EVAL_POINTS)
        if every and (self.step % every == 0 or self.step == self.total_steps):
            record["eval_perplexity"] = self.evaluate()
        return record

    def _stop_agreed(self, stop: dict) -> bool:
        """Whether any rank was asked to stop (single process: this one); a collective under torchrun."""
        if distributed.rank_and_world()[1] == 1:
            return stop["requested"]
        flag = torch.tensor([1.0 if stop["requested"] else 0.0], device=self.device)
        return bool(distributed.all_reduce_sum([flag])[0].item() > 0)

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


def _progress(enabled: bool, total: int, initial: int, delta: float):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"DP fine-tuning (delta {delta:.2g})", unit="step",
                file=sys.stderr, dynamic_ncols=True)


def _postfix(history: List[Dict[str, float]], debug_loss: bool) -> Dict[str, str]:
    """Progress-bar values: epsilon, the DP-noised loss averaged over the last 10 steps, the NON-PRIVATE debug loss."""
    shown = {"eps": f"{history[-1]['epsilon']:.2f}"}
    recent = [h["dp_train_loss"] for h in history[-10:] if "dp_train_loss" in h]
    if recent:
        shown["dp_loss"] = f"{sum(recent) / len(recent):.2f}"
    if debug_loss:
        shown["loss (NOT PRIVATE)"] = f"{history[-1]['train_loss']:.3f}"
    return shown


@contextlib.contextmanager
def _stop_requests(world: int):
    """While training, Ctrl-C (SIGINT) and SIGTERM ask to stop at the end of the current step, so that the
    checkpoint is written at a step boundary. Single process: a second Ctrl-C quits at once, without saving.
    (Under torchrun the launcher forwards Ctrl-C to every rank, so repeats are ignored there.) Only in the main
    thread, and only where the default handlers are installed."""
    stop = {"requested": False}
    mine = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if mine else {}
    ours = {sig for sig, h in previous.items() if h in (signal.default_int_handler, signal.SIG_DFL)}

    def handler(signum, frame):
        if stop["requested"] and world == 1 and signum == signal.SIGINT:
            raise TrainingInterrupted("interrupted again: quit without saving (the last periodic checkpoint, if any, "
                                      "is still there)")
        if not stop["requested"]:
            logger.warning("stopping at the end of this step to write the checkpoint%s",
                           " (Ctrl-C again to quit without saving)" if world == 1 else "")
        stop["requested"] = True

    for sig in ours:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig in ours:
            signal.signal(sig, previous[sig])
