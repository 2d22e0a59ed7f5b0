"""``DPTrainer``: a ``transformers.Trainer`` that trains with DP-SGD.

Swap ``Trainer`` for ``DPTrainer`` and name a budget; everything else in a standard Trainer script stays:

    trainer = DPTrainer(model=model, args=TrainingArguments(..., per_device_train_batch_size=64),
                        train_dataset=train, data_collator=collator, target_epsilon=3.0)
    trainer.train()            # logs "epsilon" next to "loss"
    trainer.get_epsilon()

What changes under the hood: the train loader Poisson-samples batches with expected size
``per_device_train_batch_size`` (``dp_batch_size``); ``engine.make_private`` wraps the optimizer when the
loader is built; the loss is the mean over samples of each sample's mean NLL over its own target tokens
(never HF's token-averaged loss, which couples samples); an empty Poisson batch skips forward/backward but
the optimizer still steps (noise only). ``gradient_accumulation_steps`` must stay 1: give
``max_physical_batch_size`` to split large logical batches instead (the engine accumulates). fp16 loss
scaling would scale the per-sample gradients before clipping, so fp16 is refused (bf16 is fine).
The Trainer's own ``max_grad_norm`` clipping is switched off (the engine clips per sample; pass
``max_grad_norm=`` to DPTrainer). The logged ``loss`` is computed on private data: debugging output, not DP.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from dptrain.sampling import batch_length

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
                 max_physical_batch_size: Optional[int] = None, insecure_noise_seed: Optional[int] = None,
                 insecure_sampler_seed: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon or noise_multiplier, found "
                             f"target_epsilon={target_epsilon!r}, noise_multiplier={noise_multiplier!r}")
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(f"DPTrainer needs gradient_accumulation_steps=1, found "
                             f"{self.args.gradient_accumulation_steps}; use max_physical_batch_size instead")
        if self.args.fp16:
            raise ValueError("DPTrainer does not support fp16 (loss scaling breaks per-sample clipping); use bf16")
        if self.train_dataset is None:
            raise ValueError("DPTrainer needs a train_dataset with __len__")
        # the engine clips per sample; the Trainer's own clipping would only see empty .grad and log 0
        self.args.max_grad_norm = 0.0
        import dptrain

        self.engine = dptrain.PrivacyEngine(accountant=accountant)
        self.dp_settings = dict(target_epsilon=target_epsilon, noise_multiplier=noise_multiplier,
                                max_grad_norm=max_grad_norm, clipping=clipping, insecure_noise_seed=insecure_noise_seed,
                                insecure_sampler_seed=insecure_sampler_seed, max_physical_batch_size=max_physical_batch_size)
        self.dp_batch_size = dp_batch_size or self.args.per_device_train_batch_size
        n = len(self.train_dataset)
        self.target_delta = target_delta if target_delta is not None else 1.0 / n**1.1
        self._dp_loader = None

    # ------------------------------------------------------------------ private loader + optimizer
    def get_train_dataloader(self):
        """Poisson loader from ``engine.make_private``; the optimizer is created and made private here too."""
        if self._dp_loader is not None:
            return self._dp_loader
        dataset = self.train_dataset
        if hasattr(dataset, "column_names"):  # a datasets.Dataset: drop columns the model does not take
            dataset = self._remove_unused_columns(dataset, description="training")
        loader = DataLoader(dataset, batch_size=self.dp_batch_size, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers)
        steps_per_epoch = math.ceil(len(dataset) / self.dp_batch_size)
        total = self.args.max_steps if self.args.max_steps > 0 else math.ceil(self.args.num_train_epochs * steps_per_epoch)
        self.create_optimizer()
        s = self.dp_settings
        calibration = {"noise_multiplier": s["noise_multiplier"]} if s["noise_multiplier"] is not None else {
            "target_epsilon": s["target_epsilon"], "target_delta": self.target_delta,
            "epochs": (total - 0.5) / steps_per_epoch,  # the engine calibrates for exactly `total` steps
        }
        self.model, self.optimizer, self._dp_loader = self.engine.make_private(
            module=self.model, optimizer=self.optimizer, data_loader=loader, max_grad_norm=s["max_grad_norm"],
            clipping=s["clipping"], poisson_sampling=True, max_physical_batch_size=s["max_physical_batch_size"],
            loss_reduction="mean", insecure_noise_seed=s["insecure_noise_seed"],
            insecure_sampler_seed=s["insecure_sampler_seed"], **calibration,
        )
        return self._dp_loader

    # ------------------------------------------------------------------ loss and step
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean over samples of each sample's own mean token NLL."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            labels = inputs["input_ids"].masked_fill(inputs.get("attention_mask", 1) == 0, -100)
        outputs = model(**inputs)
        loss = causal_lm_per_sample_loss(outputs.logits, labels).mean()
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        if not batch_length(inputs):  # empty Poisson batch: the optimizer step still adds noise
            return torch.zeros((), device=self.args.device)
        loss = self.compute_loss(model, inputs)
        loss.backward()  # not accelerator.backward: no loss scaling may touch per-sample gradients
        return loss.detach()

    # ------------------------------------------------------------------ accounting
    def get_epsilon(self, delta: Optional[float] = None) -> float:
        return self.engine.get_epsilon(self.target_delta if delta is None else delta)

    def log(self, logs, *args, **kwargs):
        if self.engine.optimizer is not None and "loss" in logs:
            logs = {**logs, "epsilon": self.get_epsilon()}
        return super().log(logs, *args, **kwargs)
