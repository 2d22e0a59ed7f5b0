"""A ``PrivateLMTrainer`` checkpoint: what it holds, the fingerprint a resume must match, and the restore.

The payload is SECRET (sampler and noise keys and positions unless secure_mode, error-feedback buffers) and is
written under ``private/`` by ``dptrain finetune``, apart from the release. Under torchrun every rank's own
states are gathered to rank 0, so a resume on the same world size continues exactly.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Dict, Optional

import torch

from dptrain import distributed
from dptrain.finetune.checkpoint import compare_fingerprints

__all__ = ["run_fingerprint", "trainer_state", "restore_trainer"]

# a checkpoint keeps the whole model below this size, else only the trainable parameters + a checksum
FULL_STATE_LIMIT = 50_000_000


def run_fingerprint(trainer) -> Dict[str, Any]:
    """What must match for a checkpoint to continue this run: settings, data, parameter names/shapes."""
    data = hashlib.sha256()
    for item in trainer.train_set.items:
        data.update(item.numpy().tobytes() + b"|")
    shapes = [f"{n}:{tuple(p.shape)}:{p.requires_grad}" for n, p in trainer.model.named_parameters()]
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
    checksum = float(sum(p.detach().double().abs().sum() for p in frozen)) if frozen else 0.0
    return {**trainer.config.fingerprint(), **trainer.extra_fingerprint, "data_sha256": data.hexdigest(),
            "parameters": hashlib.sha256("\n".join(shapes).encode()).hexdigest(),
            "frozen_checksum": round(checksum, 3), "total_steps": trainer.total_steps, "delta": trainer.delta}


def _rank_state(trainer) -> Dict[str, Any]:
    """What differs between ranks: sampler and noise generators (in the engine state), torch/python RNGs."""
    return {
        "engine": trainer.engine.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python_rng": random.getstate(),
    }


def trainer_state(trainer) -> Optional[Dict[str, Any]]:
    """The checkpoint payload on rank 0 (None on other ranks); every rank must call it under torchrun."""
    ranks = distributed.gather_to_rank0(_rank_state(trainer))
    if ranks is None:
        return None
    model = trainer.model
    full = sum(p.numel() for p in model.parameters()) <= FULL_STATE_LIMIT
    if full:
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    else:
        weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {
        "fingerprint": run_fingerprint(trainer),
        "step": trainer.step,
        "model": weights,
        "model_is_full": full,
        "optimizer": trainer.optimizer.state_dict(),  # identical on every rank (all-reduced gradients)
        "world_size": len(ranks),
        "ranks": ranks,  # rank r's engine/RNG state at index r; ranks[0] also at the top level
        **ranks[0],
        "history": list(trainer.history),
        "eval_perplexity_before": trainer.eval_perplexity_before,
        "completions_before": trainer.completions_before,
        "config": trainer.config.to_dict(),
    }


def restore_trainer(trainer, state: Dict[str, Any]) -> None:
    """Continue from a checkpoint of the same run (refused with ``ValueError`` otherwise); under torchrun every
    rank loads the same payload and takes its own entry of ``state["ranks"]``."""
    rank, world = distributed.rank_and_world()
    _check_same_run(trainer, state, world)
    _load_weights(trainer.model, state)
    trainer.optimizer.load_state_dict(state["optimizer"])
    own = state["ranks"][rank]
    trainer.engine.load_state_dict(own["engine"])
    torch.set_rng_state(own["torch_rng"])
    if own.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own["cuda_rng"])
    random.setstate(own["python_rng"])
    trainer.step = int(state["step"])
    trainer.history = list(state["history"])
    trainer.eval_perplexity_before = state["eval_perplexity_before"]
    trainer.completions_before = state.get("completions_before")


def _check_same_run(trainer, state: Dict[str, Any], world: int) -> None:
    saved_world = int(state.get("world_size", 1))
    if saved_world != world:
        raise ValueError(
            f"checkpoint was written by {saved_world} process(es), this run has {world}: each rank's sampler "
            f"and noise generators are saved, so resume with the same number of processes "
            f"(torchrun --nproc-per-node {saved_world})" if saved_world > 1 else
            f"checkpoint was written by 1 process, this run has {world}: resume it without torchrun")
    saved, now = dict(state["fingerprint"]), run_fingerprint(trainer)
    if state.get("model_is_full"):  # the frozen weights come from the checkpoint itself
        saved.pop("frozen_checksum", None)
        now.pop("frozen_checksum", None)
    compare_fingerprints(saved, now)
    if not 0 <= int(state["step"]) <= trainer.total_steps:
        raise ValueError(f"checkpoint step {state['step']} is outside this run's 0..{trainer.total_steps} steps")


def _load_weights(model, state: Dict[str, Any]) -> None:
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state["model"]]
    if missing:
        raise ValueError(f"checkpoint lacks trainable parameter(s) {missing[:3]}")
    result = model.load_state_dict(state["model"], strict=bool(state["model_is_full"]))
    if state["model_is_full"] and (result.missing_keys or result.unexpected_keys):
        raise ValueError(f"checkpoint model does not match: {result}")
