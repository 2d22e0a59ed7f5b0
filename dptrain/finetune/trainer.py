"""``PrivateLMTrainer``: DP fine-tuning of a causal LM on a list of texts.

One logical step: Poisson-sample a batch with the expected size, split it into micro-batches of at most
``physical_batch_size`` rows, per micro-batch compute the per-sample LM loss and ``backward()`` (the engine
clips each sample's gradient), ``optimizer.step()`` after each micro-batch; the engine adds noise, steps the
inner optimizer and the accountant only when the logical batch ends. An empty Poisson batch skips the
forward/backward but still steps (noise only): that is what the privacy analysis assumes.
"""

from __future__ import annotations

import logging
import math
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from dptrain import distributed

from dptrain.finetune.checkpoint import compare_fingerprints, save_checkpoint
from dptrain.finetune.config import FinetuneConfig
from dptrain.finetune.loss import PadCollator, TokenizedTexts, per_sample_lm_loss, perplexity
from dptrain.finetune.optimizers import build_optimizer
from dptrain.finetune.report import privacy_report

logger = logging.getLogger(__name__)

__all__ = ["PrivateLMTrainer", "FinetuneResult", "default_delta"]

# a checkpoint keeps the whole model below this size, else only the trainable parameters + a checksum
_FULL_STATE_LIMIT = 50_000_000


def default_delta(n: int) -> float:
    """delta = 1 / N^1.1: below 1/N, as a meaningful delta must be."""
    return 1.0 / n**1.1


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
    finished: bool = True
    privacy: Dict[str, Any] = field(default_factory=dict)  # the trust model (report.json "privacy")
    secret_files: List[str] = field(default_factory=list)  # under output_dir: never publish
    model: Any = None

    def to_dict(self) -> Dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("model", "history")}
        return out


class PrivateLMTrainer:
    """Private fine-tuning of ``model`` (an ``AutoModelForCausalLM``, possibly peft-wrapped) on ``train_texts``."""

    def __init__(self, model, tokenizer, train_texts: Sequence[str], eval_texts: Optional[Sequence[str]] = None,
                 config: Optional[FinetuneConfig] = None, *, controller=None):
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
        self.extra_fingerprint: Dict[str, Any] = {}
        self._make_private()

    # ------------------------------------------------------------------ set-up
    def _make_private(self) -> None:
        import dptrain

        cfg = self.config
        n = len(self.train_set)
        sample_rate = cfg.batch_size / n
        steps_per_epoch = math.ceil(1 / sample_rate)
        total = math.ceil(cfg.epochs * steps_per_epoch)
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        self.total_steps = total
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameter")
        torch.manual_seed(cfg.seed)
        inner = build_optimizer(cfg.optimizer, params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        _, world = distributed.rank_and_world()
        if cfg.batch_size % world:
            raise ValueError(f"batch-size {cfg.batch_size} must be a multiple of the number of processes ({world})")
        net = self.model
        if world > 1:  # torchrun: each rank clips its shard, the engine all-reduces the noised sums
            net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        loader = DataLoader(self.train_set, batch_size=cfg.batch_size // world, collate_fn=self.collate)
        physical = cfg.physical_batch_size if cfg.physical_batch_size and cfg.physical_batch_size < cfg.batch_size \
            else None
        self.engine = dptrain.PrivacyEngine(accountant=cfg.accountant, secure_mode=cfg.secure_mode)
        seed = cfg.insecure_seed  # NOT PRIVATE when given: the noise and the batches can be regenerated from it
        # epochs chosen so that the engine calibrates the noise for exactly `total` steps: ceil(total - 0.5)
        try:
            private = self.engine.make_private(
                module=net, optimizer=inner, data_loader=loader, max_grad_norm=cfg.max_grad_norm,
                target_epsilon=cfg.target_epsilon, target_delta=self.delta, epochs=(total - 0.5) / steps_per_epoch,
                clipping=cfg.clipping, poisson_sampling=True, max_physical_batch_size=physical, loss_reduction="mean",
                error_feedback=cfg.error_feedback, controller=self.controller,
                insecure_noise_seed=seed, insecure_sampler_seed=None if seed is None else seed + 1,
            )
        except ImportError as err:  # an optional engine part (e.g. error feedback) missing from this build
            raise ValueError(f"this dptrain build cannot run the requested setting: {err}") from None
        self.net, self.optimizer, self.loader = private  # self.net: the module to call (DDP-wrapped under torchrun)
        self.sample_rate = sample_rate
        logger.info("DP fine-tuning: N=%d, q=%.4g, %d steps, sigma=%.4g, target eps=%g at delta=%.3g",
                    n, sample_rate, total, self.optimizer.noise_multiplier, cfg.target_epsilon, self.delta)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> Optional[float]:
        """Perplexity on the held-out texts (None without them, or with ``evaluate=False``). NOT covered by the DP
        guarantee: computed without noise from private held-out records."""
        if self.eval_set is None or not self.config.evaluate:
            return None
        with self.engine.tracker.capture_disabled():
            return perplexity(self.model, self.eval_set, self.collate)

    # ------------------------------------------------------------------ training
    def train(self, *, checkpoint_path=None) -> FinetuneResult:
        """Runs until ``total_steps`` (or ``config.stop_after``); checkpoints every ``checkpoint_every`` steps."""
        cfg = self.config
        if self.step == 0 and self.eval_perplexity_before is None:
            self.eval_perplexity_before = self.evaluate()
        self.model.train()
        bar = _progress(cfg.progress and distributed.rank_and_world()[0] == 0, self.total_steps, self.step)
        stop_at = self.total_steps if cfg.stop_after is None else min(cfg.stop_after, self.total_steps)
        loss_sum, rows_seen = 0.0, 0
        try:
            while self.step < stop_at:
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
                        loss_sum += float(losses.detach().sum())
                        rows_seen += rows
                    before = self.optimizer.steps_taken
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.optimizer.steps_taken == before:
                        continue  # a micro-batch inside a logical batch
                    self.step += 1
                    record = {"step": self.step, "epsilon": self.engine.get_epsilon(self.delta)}
                    if cfg.debug_train_loss:  # non-private: the loss and size of a batch of private records
                        record.update(train_loss=loss_sum / rows_seen if rows_seen else float("nan"),
                                      batch_size=rows_seen)
                    self.history.append(record)
                    loss_sum, rows_seen = 0.0, 0
                    if bar is not None:
                        bar.update(1)
                        shown = {"loss": f"{record['train_loss']:.3f}"} if cfg.debug_train_loss else {}
                        bar.set_postfix(**shown, eps=f"{record['epsilon']:.2f}")
                    if checkpoint_path is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint(checkpoint_path)  # every rank: their RNG states are gathered
                    if self.step >= stop_at:
                        break
        finally:
            if bar is not None:
                bar.close()
        finished = self.step >= self.total_steps
        if checkpoint_path is not None:
            self.save_checkpoint(checkpoint_path)
        after = self.evaluate() if finished else None
        return FinetuneResult(
            epsilon=self.engine.get_epsilon(self.delta), delta=self.delta, target_epsilon=cfg.target_epsilon,
            noise_multiplier=float(self.optimizer.noise_multiplier), steps=self.step, total_steps=self.total_steps,
            sample_rate=self.sample_rate, expected_batch_size=float(self.optimizer.expected_batch_size),
            dataset_size=len(self.train_set), eval_perplexity_before=self.eval_perplexity_before,
            eval_perplexity=after, history=list(self.history), finished=finished, model=self.model,
            privacy=privacy_report(self.engine.trust_model(), cfg),
        )

    # ------------------------------------------------------------------ checkpoints
    def fingerprint(self) -> Dict[str, Any]:
        """What must match for a checkpoint to continue this run: settings, data, parameter names/shapes."""
        import hashlib

        data = hashlib.sha256()
        for item in self.train_set.items:
            data.update(item.numpy().tobytes() + b"|")
        shapes = [f"{n}:{tuple(p.shape)}:{p.requires_grad}" for n, p in self.model.named_parameters()]
        frozen = [p for p in self.model.parameters() if not p.requires_grad]
        checksum = float(sum(p.detach().double().abs().sum() for p in frozen)) if frozen else 0.0
        return {**self.config.fingerprint(), **self.extra_fingerprint, "data_sha256": data.hexdigest(),
                "parameters": hashlib.sha256("\n".join(shapes).encode()).hexdigest(),
                "frozen_checksum": round(checksum, 3), "total_steps": self.total_steps, "delta": self.delta}

    def _rank_state(self) -> Dict[str, Any]:
        """What differs between ranks: sampler and noise generators (in the engine state, SECRET unless
        secure_mode), torch/python RNGs."""
        return {
            "engine": self.engine.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),
        }

    def state_dict(self) -> Optional[Dict[str, Any]]:
        """The checkpoint payload on rank 0 (None on other ranks): SECRET (generator states, error-feedback
        buffers), never released. Under torchrun every rank must call it: each rank's own generator states are
        gathered so that a resume on the same world size continues exactly (with fresh entropy in secure mode)."""
        ranks = distributed.gather_to_rank0(self._rank_state())
        if ranks is None:
            return None
        numel = sum(p.numel() for p in self.model.parameters())
        if numel <= _FULL_STATE_LIMIT:
            weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        else:
            weights = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return {
            "fingerprint": self.fingerprint(),
            "step": self.step,
            "model": weights,
            "model_is_full": numel <= _FULL_STATE_LIMIT,
            "optimizer": self.optimizer.state_dict(),  # identical on every rank (all-reduced gradients)
            "world_size": len(ranks),
            "ranks": ranks,  # rank r's engine/RNG state at index r; ranks[0] also at the top level
            **ranks[0],
            "history": list(self.history),
            "eval_perplexity_before": self.eval_perplexity_before,
            "config": self.config.to_dict(),
        }

    def save_checkpoint(self, path) -> None:
        """Collective under torchrun (gathers every rank's RNG states); only rank 0 writes ``path``."""
        state = self.state_dict()
        if state is not None:
            save_checkpoint(path, state)
            logger.info("checkpoint at step %d -> %s", self.step, path)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a checkpoint of the same run (refused with ``ValueError`` otherwise).

        Under torchrun every rank loads the same payload and takes its own entry of ``state["ranks"]``."""
        rank, world = distributed.rank_and_world()
        saved_world = int(state.get("world_size", 1))
        if saved_world != world:
            raise ValueError(
                f"checkpoint was written by {saved_world} process(es), this run has {world}: each rank's sampler "
                f"and noise generators are saved, so resume with the same number of processes "
                f"(torchrun --nproc-per-node {saved_world})" if saved_world > 1 else
                f"checkpoint was written by 1 process, this run has {world}: resume it without torchrun")
        saved, now = dict(state["fingerprint"]), self.fingerprint()
        if state.get("model_is_full"):  # the frozen weights come from the checkpoint itself
            saved.pop("frozen_checksum", None)
            now.pop("frozen_checksum", None)
        compare_fingerprints(saved, now)
        if not 0 <= int(state["step"]) <= self.total_steps:
            raise ValueError(f"checkpoint step {state['step']} is outside this run's 0..{self.total_steps} steps")
        named = dict(self.model.named_parameters())
        missing = [n for n, p in named.items() if p.requires_grad and n not in state["model"]]
        if missing:
            raise ValueError(f"checkpoint lacks trainable parameter(s) {missing[:3]}")
        result = self.model.load_state_dict(state["model"], strict=bool(state["model_is_full"]))
        if state["model_is_full"] and (result.missing_keys or result.unexpected_keys):
            raise ValueError(f"checkpoint model does not match: {result}")
        self.optimizer.load_state_dict(state["optimizer"])
        own = state["ranks"][rank] if "ranks" in state else state  # checkpoints from before per-rank states
        self.engine.load_state_dict(own["engine"])
        torch.set_rng_state(own["torch_rng"])
        if own.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(own["cuda_rng"])
        random.setstate(own["python_rng"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.eval_perplexity_before = state["eval_perplexity_before"]


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="DP fine-tuning", unit="step", file=sys.stderr, dynamic_ncols=True)
