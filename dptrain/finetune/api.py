"""``finetune(config)``: the whole job (data, model, privacy, checkpoints, report) behind one call.

The CLI is a thin layer over this function; library users can also hand in their own model, tokenizer and
texts and keep everything else.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import time
from importlib import import_module
from pathlib import Path
from typing import Optional, Sequence

import torch

from dptrain import distributed
from dptrain.finetune.checkpoint import load_checkpoint
from dptrain.finetune.config import FinetuneConfig
from dptrain.finetune.data import load_texts, synthetic_private_records
from dptrain.finetune.report import LOSS_NOTE, plot_training, write_report
from dptrain.finetune.trainer import FinetuneResult, PrivateLMTrainer

logger = logging.getLogger(__name__)

__all__ = ["finetune", "resolve_controller", "CHECKPOINT_NAME", "REPORT_NAME", "PLOT_NAME"]

CHECKPOINT_NAME, REPORT_NAME, PLOT_NAME = "checkpoint.pt", "report.json", "training.png"
LM_LOSS_BOUND = 10.0  # nats: per-sample LM losses are clipped to [0, 10] before a controller's noisy release


def resolve_controller(name: str, seed: Optional[int] = None):
    """A controller instance from ``dptrain.control`` by name (``sac`` -> ``SACController``) or ``module:Class``."""
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        module = import_module(module_name)
    else:
        module, class_name = import_module("dptrain.control"), None
        exported = getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")])
        by_lower = {n.lower(): n for n in exported}
        class_name = by_lower.get(f"{name.lower()}controller") or by_lower.get(name.lower())
        if class_name is None:
            raise ValueError(f"unknown controller {name!r}; dptrain.control offers {sorted(exported) or 'none yet'}")
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"controller class {class_name!r} not found in {module.__name__}")
    accepted = inspect.signature(cls).parameters
    kwargs = {"seed": seed} if seed is not None and "seed" in accepted else {}
    if "loss_bound" in accepted:  # reward from a DP-released (accounted) training loss, clipped per sample
        kwargs["loss_bound"] = LM_LOSS_BOUND
    return cls(**kwargs)


def _init_distributed() -> Optional[int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on GPU); this rank, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
    return dist.get_rank()


def _prepare_output_dir(cfg: FinetuneConfig) -> Optional[Path]:
    if cfg.output_dir is None:
        if cfg.resume:
            raise ValueError("--resume needs --output-dir (the folder holding checkpoint.pt)")
        return None
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output dir {out} exists and is not a directory")
    if cfg.resume:
        return out
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"output dir {out} is not empty; pass --overwrite to write over it, or --resume")
    out.mkdir(parents=True, exist_ok=True)
    stale = out / CHECKPOINT_NAME
    if stale.exists():
        stale.unlink()  # --overwrite: never resume into an old run's checkpoint later
    return out


def _texts(cfg: FinetuneConfig, train_texts, eval_texts):
    if train_texts is None:
        if cfg.data is not None:
            train_texts = load_texts(cfg.data)
            if eval_texts is None and cfg.eval_data is None and len(train_texts) >= 100:
                rng = random.Random(cfg.seed)  # hold out 10% (at most 1000) for the perplexity report
                order = list(range(len(train_texts)))
                rng.shuffle(order)
                held = set(order[: min(len(train_texts) // 10, 1000)])
                eval_texts = [t for i, t in enumerate(train_texts) if i in held]
                train_texts = [t for i, t in enumerate(train_texts) if i not in held]
        else:
            train_texts = synthetic_private_records(cfg.demo_records, seed=cfg.seed).records
            if eval_texts is None and cfg.eval_data is None:
                eval_texts = synthetic_private_records(cfg.demo_eval_records, seed=cfg.seed + 1,
                                                       canary_repeats=()).records
    if eval_texts is None and cfg.eval_data is not None:
        eval_texts = load_texts(cfg.eval_data)
    if cfg.audit_canaries:  # one-run audit: each canary trained on once w.p. 1/2, rebuilt from the seed on resume
        from dptrain.finetune.data import audit_canaries, with_audit_canaries

        train_texts = with_audit_canaries(train_texts, audit_canaries(cfg.audit_canaries, seed=cfg.seed))
    return list(train_texts), (list(eval_texts) if eval_texts else None)


def _model(cfg: FinetuneConfig, model, tokenizer, *, pretrain: bool):
    if model is not None:
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        return model, tokenizer
    if cfg.model is not None:
        from dptrain.finetune.modeling import load_pretrained

        return load_pretrained(cfg.model)
    from dptrain.finetune.demo import demo_model_and_tokenizer, pretrain_public

    model, tokenizer = demo_model_and_tokenizer(cfg.max_length, seed=cfg.seed)
    if pretrain:
        pretrain_public(model, tokenizer, steps=cfg.pretrain_steps, max_length=cfg.max_length, seed=cfg.seed,
                        progress=cfg.progress)
    return model, tokenizer


def finetune(config: Optional[FinetuneConfig] = None, *, model=None, tokenizer=None,
             train_texts: Optional[Sequence[str]] = None, eval_texts: Optional[Sequence[str]] = None,
             controller=None) -> FinetuneResult:
    """Fine-tune under ``config.target_epsilon``; writes report, plot, model and checkpoint to ``output_dir``."""
    started = time.perf_counter()
    cfg = (config or FinetuneConfig()).validate()
    rank = _init_distributed()

    def prepare():  # rank 0 only; under torchrun its result (or error) reaches every rank
        folder = _prepare_output_dir(cfg)
        return folder, (load_checkpoint(folder / CHECKPOINT_NAME) if cfg.resume else None)

    out, state = distributed.on_rank0(prepare)  # state: the checkpoint, every rank takes its own RNG states
    out = out if not rank else None  # only rank 0 writes files
    # every rank checkpoints together (their generator states are gathered); rank 0 writes the file
    checkpoint = Path(cfg.output_dir) / CHECKPOINT_NAME if cfg.output_dir is not None else None
    train_texts, eval_texts = _texts(cfg, train_texts, eval_texts)
    if cfg.batch_size > len(train_texts):
        raise ValueError(f"batch-size {cfg.batch_size} is larger than the dataset ({len(train_texts)} records)")
    # the demo's public pretraining is skipped on resume when the checkpoint holds the whole model
    model, tokenizer = _model(cfg, model, tokenizer, pretrain=not (state and state.get("model_is_full")))
    if cfg.lora:
        from dptrain.finetune.modeling import apply_lora

        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets,
                           seed=cfg.seed)
    if controller is None and cfg.controller:
        controller = resolve_controller(cfg.controller, seed=cfg.seed)
    trainer = PrivateLMTrainer(model, tokenizer, train_texts, eval_texts, cfg, controller=controller)
    if state is not None:
        trainer.load_state_dict(state)
        logger.info("resumed from %s at step %d", checkpoint, trainer.step)
    result = trainer.train(checkpoint_path=checkpoint)
    if out is not None:
        _write_outputs(out, cfg, trainer, result, time.perf_counter() - started)
    return result


def _write_outputs(out: Path, cfg: FinetuneConfig, trainer: PrivateLMTrainer, result: FinetuneResult,
                   seconds: float) -> None:
    report = {**result.to_dict(), "accountant": cfg.accountant, "clipping": cfg.clipping,
              "max_grad_norm": cfg.max_grad_norm, "config": cfg.to_dict(), "wall_time_s": round(seconds, 2),
              "note": LOSS_NOTE, "history": result.history}
    if cfg.audit_canaries:  # the AUDITOR'S SECRET (canaries + inclusion mask) for `dptrain audit --model`
        from dptrain.finetune.report import AUDIT_SECRET_KEY, audit_secret

        report[AUDIT_SECRET_KEY] = audit_secret(cfg.audit_canaries, cfg.seed)
    if result.history:
        plot_training(out / PLOT_NAME, result.history, target_epsilon=cfg.target_epsilon, delta=result.delta)
    if result.finished:
        model = trainer.model
        tracker = getattr(trainer.engine, "tracker", None)
        if tracker is not None and hasattr(tracker, "detach"):
            tracker.detach()  # plain modules again before saving
        if cfg.lora:
            model.save_pretrained(out / "adapter")
            model = model.merge_and_unload()  # the folder then loads with AutoModelForCausalLM alone
        model.save_pretrained(out)
        trainer.tokenizer.save_pretrained(out)
        result.model = model
        report["model_dir"] = str(out)
    write_report(out / REPORT_NAME, report)
