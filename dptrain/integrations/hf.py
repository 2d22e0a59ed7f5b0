"""``DPTrainer``: a ``transformers.Trainer`` that trains with DP-SGD.

Swap ``Trainer`` for ``DPTrainer`` and name a budget; everything else in a standard Trainer script stays:

    trainer = DPTrainer(model=model, args=TrainingArguments(..., per_device_train_batch_size=64),
                        train_dataset=train, data_collator=collator, target_epsilon=3.0)
    trainer.train()            # logs "epsilon" next to the DP-noised "loss"
    trainer.get_epsilon()

What changes under the hood: the train loader Poisson-samples batches with expected size
``per_device_train_batch_size`` (``dp_batch_size``); ``engine.make_private`` wraps the optimizer when the
loader is built. The Trainer sees ONE item per Poisson (logical) batch, so its ``len(loader)``, epochs and
``max_steps`` count logical steps: ``training_step`` runs forward/backward over the batch's micro-batches of at
most ``max_physical_batch_size`` rows (clipping each into the batch's sum), then the Trainer's single
``optimizer.step()`` adds the noise, steps the accountant and the inner optimizer. One Poisson batch is thus one
noised step and a micro-batch never crosses a batch or an epoch. ``gradient_accumulation_steps`` must stay 1.
The loss is the mean over samples of each sample's mean NLL over its own target tokens (never HF's
token-averaged loss, which couples samples; ``num_items_in_batch`` is ignored); an empty Poisson batch skips
forward/backward but the optimizer still steps (noise only). fp16 loss scaling would scale the per-sample
gradients before clipping, so fp16 is refused (bf16 is fine). The Trainer's own ``max_grad_norm`` clipping is
switched off (the engine clips per sample; pass ``max_grad_norm=`` to DPTrainer). Resuming from a Trainer
checkpoint is refused: it holds no privacy ledger. The logged ``loss`` (stdout, report_to loggers,
``trainer_state.json`` of every ``checkpoint-N``) and ``train()``'s ``training_loss`` are the DP-noised losses
of ``dptrain.loss_release``, accounted with each step's gradient (epsilon unchanged; the gradient gets ~3% more
noise); the exact batch loss never leaves ``training_step``. A run without noise logs the exact loss.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from dptrain.finetune.config import default_delta
from dptrain.loss_release import LossRelease
from dptrain.sampling import batch_length, split_batch, steps_per_epoch
from dptrain.validation import check_positive_int

__all__ = ["DPTrainer", "causal_lm_per_sample_loss"]


def causal_lm_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean NLL over target tokens (labels shifted by one; ``-100`` marks ignored positions), (B,)."""
    logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    mask = (targets != -100).to(logits.dtype)  # (B, T-1)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B,)


class DPTrainer(Trainer):
    """``transformers.Trainer`` with DP-SGD: per-sample clipping, Gaussian noise, Poisson sampling, accounting."""

    def __init__(self, *args, target_epsilon: Optional[float] = None, target_delta: Optional[float] = None,
                 noise_multiplier: Optional[float] = None, max_grad_norm: float = 1.0, clipping: str = "flat",
                 accountant: str = "rdp", dp_batch_size: Optional[int] = None,
                 max_physical_batch_size: Optional[int] = None, secure_mode: bool = False,
                 insecure_noise_seed: Optional[int] = None, insecure_sampler_seed: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon or noise_multiplier, found "
                             f"target_epsilon={target_epsilon!r}, noise_multiplier={noise_multiplier!r}")
        if max_physical_batch_size is not None:
            check_positive_int("max_physical_batch_size", max_physical_batch_size)
        if secure_mode and (insecure_noise_seed is not None or insecure_sampler_seed is not None):
            raise ValueError("secure_mode draws fresh OS entropy for noise and sampling: do not pass "
                             "insecure_noise_seed or insecure_sampler_seed")
        self._check_args()
        if self.train_dataset is None:
            raise ValueError("DPTrainer needs a train_dataset with __len__")
        # the engine clips per sample; the Trainer's own clipping would only see empty .grad and log 0
        self.args.max_grad_norm = 0.0
        import dptrain

        self.engine = dptrain.PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
        self.dp_settings = dict(target_epsilon=target_epsilon, noise_multiplier=noise_multiplier,
                                max_grad_norm=max_grad_norm, clipping=clipping, insecure_noise_seed=insecure_noise_seed,
                                insecure_sampler_seed=insecure_sampler_seed)
        self.max_physical_batch_size = max_physical_batch_size
        self.dp_batch_size = dp_batch_size or self.args.per_device_train_batch_size
        n = len(self.train_dataset)
        self.target_delta = target_delta if target_delta is not None else default_delta(n)  # min(1e-5, 1/N^1.1)
        self._dp_loader = None
        self.loss_release: Optional[LossRelease] = None  # set with the private optimizer when there is noise
        self._dp_losses: list = []  # the released loss of every step
        self._logged = 0  # how many of them the last logged loss covered

    def _check_args(self) -> None:
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(f"DPTrainer needs gradient_accumulation_steps=1, found "
                             f"{self.args.gradient_accumulation_steps}; use max_physical_batch_size instead")
        if self.args.fp16:
            raise ValueError("DPTrainer does not support fp16 (loss scaling breaks per-sample clipping); use bf16")

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint:  # a fresh ledger would under-report epsilon
            raise ValueError(f"DPTrainer cannot resume from a checkpoint, found resume_from_checkpoint="
                             f"{resume_from_checkpoint!r}: it holds no privacy ledger, sampler or noise state")
        self._check_args()
        output = super().train(None, *args, **kwargs)
        if self.loss_release is not None:  # the Trainer's own average is of training_step's zeros
            output = output._replace(training_loss=_mean(self._dp_losses))
        return output

    # ------------------------------------------------------------------ private loader + optimizer
    def get_train_dataloader(self):
        """Poisson loader from ``engine.make_private``, one item per logical batch (so ``len()`` counts logical
        steps); the optimizer is created and made private here too."""
        if self._dp_loader is not None:
            return self._dp_loader
        dataset = self.train_dataset
        if hasattr(dataset, "column_names"):  # a datasets.Dataset: drop columns the model does not take
            dataset = self._remove_unused_columns(dataset, description="training")
        loader = DataLoader(dataset, batch_size=self.dp_batch_size, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers)
        per_epoch = steps_per_epoch(len(dataset), self.dp_batch_size)  # as the engine and sampler count
        total = (self.args.max_steps if self.args.max_steps > 0
                 else math.ceil(self.args.num_train_epochs * per_epoch))  # as the Trainer plans its steps
        self.create_optimizer()
        s = self.dp_settings
        calibration = {"noise_multiplier": s["noise_multiplier"]} if s["noise_multiplier"] is not None else {
            "target_epsilon": s["target_epsilon"], "target_delta": self.target_delta,
            "steps": total,
        }
        # no max_physical_batch_size here: the loader yields whole Poisson batches, training_step splits them
        self.model, self.optimizer, self._dp_loader = self.engine.make_private(
            module=self.model, optimizer=self.optimizer, data_loader=loader, max_grad_norm=s["max_grad_norm"],
            clipping=s["clipping"], poisson_sampling=True, loss_reduction="sum",
            insecure_noise_seed=s["insecure_noise_seed"], insecure_sampler_seed=s["insecure_sampler_seed"],
            **calibration,
        )
        if self.optimizer.noise_multiplier > 0:
            self.loss_release = LossRelease(self.optimizer)
            self.optimizer.step_callbacks.append(self._record_dp_loss)
        return self._dp_loader

    def _record_dp_loss(self, optimizer, mechanism) -> None:
        self._dp_losses.append(self.loss_release.released)

    # ------------------------------------------------------------------ loss and step
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean over samples of each sample's own mean token NLL (what evaluation reports)."""
        losses, outputs = self._sample_losses(model, inputs)
        loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    def _sample_losses(self, model, inputs):
        """Each sample's own mean token NLL, (B,), and the model's outputs."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            labels = inputs["input_ids"].masked_fill(inputs.get("attention_mask", 1) == 0, -100)
        outputs = model(**inputs)
        return causal_lm_per_sample_loss(outputs.logits, labels), outputs

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward/backward over one logical batch, in micro-batches; the Trainer's ``optimizer.step()`` then
        clips the last one and adds the noise. Backprops the SUM of per-sample losses (a mean would divide every
        gradient by the Poisson batch's realized size). Returns the batch's exact mean loss only without noise
        (else 0: the DP-noised loss of the step replaces it in ``log``)."""
        model.train()
        rows = batch_length(inputs) or 0
        size = self.max_physical_batch_size or max(rows, 1)
        total = torch.zeros((), device=self.args.device)
        for start in range(0, rows, size):  # an empty Poisson batch: no forward, the step still adds noise
            if start:
                self.engine.optimizer.accumulate()  # clip the previous micro-batch into the logical batch's sum
            part = inputs if size >= rows else split_batch(inputs, start, min(start + size, rows), rows)
            part = self._prepare_inputs(part)
            with self.compute_loss_context_manager():
                losses, _ = self._sample_losses(model, part)  # (b,)
            if self.loss_release is not None:
                self.loss_release.add(losses)
            losses.sum().backward()  # not accelerator.backward: no loss scaling may touch per-sample gradients
            total += losses.detach().sum()
        return total / max(rows, 1) if self.loss_release is None else torch.zeros((), device=self.args.device)

    # ------------------------------------------------------------------ accounting
    def get_epsilon(self, delta: Optional[float] = None) -> float:
        return self.engine.get_epsilon(self.target_delta if delta is None else delta)

    def log(self, logs, *args, **kwargs):
        """Adds epsilon and delta next to the loss; the loss logged is the mean DP-noised loss since the last log."""
        if self.engine.optimizer is not None and "loss" in logs:
            logs = {**logs, "epsilon": self.get_epsilon(), "delta": self.target_delta}
        if self.loss_release is not None:
            if "loss" in logs:
                logs["loss"], self._logged = _mean(self._dp_losses[self._logged:]), len(self._dp_losses)
            if "train_loss" in logs:
                logs = {**logs, "train_loss": _mean(self._dp_losses)}
        return super().log(logs, *args, **kwargs)


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else float("nan")
