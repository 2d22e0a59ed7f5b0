"""The engine set-up of ``PrivateLMTrainer``: the run's length, the inner optimizer, DDP under torchrun, and
``PrivacyEngine.make_private`` with Poisson sampling and micro-batches of at most ``physical_batch_size`` rows."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
from torch.utils.data import DataLoader

from dptrain import distributed, sampling
from dptrain.finetune.config import FinetuneConfig
from dptrain.finetune.optimizers import build_optimizer

__all__ = ["PrivateTraining", "make_private_lm"]


class PrivateTraining(NamedTuple):
    engine: Any  # dptrain.PrivacyEngine
    net: torch.nn.Module  # the module to call (DDP-wrapped under torchrun)
    optimizer: Any  # dptrain.DPOptimizer
    loader: Any  # dptrain.DPDataLoader
    total_steps: int


def make_private_lm(model, train_set, collate, cfg: FinetuneConfig, delta: float, controller,
                    device: torch.device) -> PrivateTraining:
    import dptrain

    n = len(train_set)
    total = math.ceil(cfg.epochs * sampling.steps_per_epoch(n, cfg.batch_size))
    total = total if cfg.max_steps is None else min(total, cfg.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter")
    torch.manual_seed(cfg.seed)
    inner = build_optimizer(cfg.optimizer, params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    _, world = distributed.rank_and_world()
    if cfg.batch_size % world:
        raise ValueError(f"batch-size {cfg.batch_size} must be a multiple of the number of processes ({world})")
    net = model
    if world > 1:  # torchrun: each rank clips its shard, the engine all-reduces the noised sums
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    loader = DataLoader(train_set, batch_size=cfg.batch_size // world, collate_fn=collate)
    engine = dptrain.PrivacyEngine(accountant=cfg.accountant, secure_mode=cfg.secure_mode)
    seed = cfg.insecure_seed  # NOT PRIVATE when given: the noise and the batches can be regenerated from it
    try:
        net, optimizer, dp_loader = engine.make_private(
            module=net, optimizer=inner, data_loader=loader, max_grad_norm=cfg.max_grad_norm,
            target_epsilon=cfg.target_epsilon, target_delta=delta, steps=total,
            clipping=cfg.clipping, poisson_sampling=True, max_physical_batch_size=_physical(cfg),
            loss_reduction="sum", error_feedback=cfg.error_feedback, controller=controller,
            insecure_noise_seed=seed, insecure_sampler_seed=None if seed is None else seed + 1,
        )
    except ImportError as err:  # an optional engine part (e.g. error feedback) missing from this build
        raise ValueError(f"this dptrain build cannot run the requested setting: {err}") from None
    return PrivateTraining(engine, net, optimizer, dp_loader, total)


def _physical(cfg: FinetuneConfig) -> Optional[int]:
    """Rows per micro-batch, or None when the whole logical batch fits."""
    physical = cfg.physical_batch_size
    return physical if physical and physical < cfg.batch_size else None
