"""``finetune(config)``: the whole job (data, model, privacy, checkpoints, report) behind one call.

The CLI is a thin layer over this function; library users can also hand in their own model, tokenizer and
texts and keep everything else. ``output_dir`` receives the release (model, tokenizer, report.json,
training.png, LoRA ``adapter/``) and, apart from it, the SECRET files in ``output_dir/private/`` (mode 0700):
the checkpoint, the audit secret and, on your own data, the member/non-member records
(``dptrain.finetune.secret_files``).
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import time
from importlib import import_module
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from dptrain import distributed
from dptrain.finetune.checkpoint import load_checkpoint
from dptrain.finetune.config import FinetuneConfig
from dptrain.finetune.data import load_texts, synthetic_private_records
from dptrain.finetune.models import TINY, resolve_model
from dptrain.finetune.report import LOSS_NOTE, NOT_PRIVATE_WARNING, plot_training, write_report
from dptrain.finetune.secret_files import (AUDIT_SECRET_FILE, CHECKPOINT_FILE, LEGACY_CHECKPOINT, MEMBERS_FILE,
                                           NONMEMBERS_FILE, SECRET_FILES_NOTE, load_audit_canaries, new_audit_canaries,
                                           private_dir, save_audit_secret, save_membership)
from dptrain.finetune.trainer import LOSS_BOUND, FinetuneResult, PrivateLMTrainer

logger = logging.getLogger(__name__)

__all__ = ["finetune", "resolve_controller", "CHECKPOINT_FILE", "AUDIT_SECRET_FILE", "REPORT_NAME", "PLOT_NAME"]

REPORT_NAME, PLOT_NAME = "report.json", "training.png"


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
        kwargs["loss_bound"] = LOSS_BOUND
    return cls(**kwargs)


def _join_distributed() -> bool:
    """Under torchrun (WORLD_SIZE > 1) join the process group (gloo on CPU, nccl on GPU); True if this call did, so
    that ``finetune`` leaves it again when done (torch asks every process to destroy the group it made)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(minutes=5))
    return True


def _prepare_output_dir(cfg: FinetuneConfig) -> Optional[Path]:
    if cfg.output_dir is None:
        if cfg.resume:
            raise ValueError(f"--resume needs --output-dir (the folder holding {CHECKPOINT_FILE})")
        if cfg.audit_canaries:
            raise ValueError(f"audit-canaries needs --output-dir (the auditor's secret is kept in {AUDIT_SECRET_FILE})")
        return None
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output dir {out} exists and is not a directory")
    if cfg.resume:
        if not (out / CHECKPOINT_FILE).exists() and (out / LEGACY_CHECKPOINT).is_file():
            raise FileNotFoundError(f"no checkpoint at {out / CHECKPOINT_FILE}, but {out / LEGACY_CHECKPOINT} (older "
                                    f"layout) is a SECRET in the released folder: move it to {out / CHECKPOINT_FILE} "
                                    "(chmod 600) and resume")
        return out
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"output dir {out} is not empty; pass --overwrite to write over it, or --resume")
    out.mkdir(parents=True, exist_ok=True)
    for stale in (CHECKPOINT_FILE, AUDIT_SECRET_FILE, MEMBERS_FILE, NONMEMBERS_FILE, LEGACY_CHECKPOINT):
        (out / stale).unlink(missing_ok=True)  # --overwrite: never resume into (or audit with) an old run's secrets
    return out


def _audit_canaries(cfg: FinetuneConfig, out: Optional[Path]):
    """New canaries from secret entropy (saved once the run is set up); on resume, those of the audit secret."""
    if not cfg.audit_canaries:
        return None
    return load_audit_canaries(out, cfg.audit_canaries) if cfg.resume else new_audit_canaries(cfg.audit_canaries)


def _texts(cfg: FinetuneConfig, train_texts, eval_texts):
    """Training and held-out records: given, read from ``cfg.data`` (10% held out, at most 1000, split with the
    public seed, when there are >= 100 records and no ``eval_data``), or the demo's synthetic ones."""
    if train_texts is None:
        if cfg.data is not None:
            train_texts = load_texts(cfg.data, cfg.text_column)
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
        eval_texts = load_texts(cfg.eval_data, cfg.text_column)
    return list(train_texts), (list(eval_texts) if eval_texts else None)


def _model(cfg: FinetuneConfig, model, tokenizer, *, pretrain: bool):
    if model is not None:
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        return model, tokenizer
    if cfg.model not in (None, TINY):
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
    """Fine-tune under ``config.target_epsilon``; writes the release (report, plot, model) to ``output_dir`` and
    the secrets (checkpoint, audit secret) to ``output_dir/private/``."""
    started = time.perf_counter()
    cfg = (config or FinetuneConfig()).validate()
    if model is None:
        resolve_model(cfg.model)  # a missing package or file fails now, before anything is written
    joined = _join_distributed()
    try:
        result = _finetune(cfg, started, model, tokenizer, train_texts, eval_texts, controller)
        if joined:
            torch.distributed.barrier()  # every rank returns once rank 0 has written the files
        return result
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _finetune(cfg: FinetuneConfig, started: float, model, tokenizer, train_texts, eval_texts,
              controller) -> FinetuneResult:
    rank = distributed.rank_and_world()[0]  # with cfg.insecure_seed the engine warns that the run is NOT PRIVATE

    def prepare():  # rank 0 only; under torchrun its result (or error) reaches every rank
        folder = _prepare_output_dir(cfg)
        state = load_checkpoint(folder / CHECKPOINT_FILE) if cfg.resume else None
        return folder, state, _audit_canaries(cfg, folder)

    # state: the checkpoint (every rank takes its own RNG states); canaries: the same secret ones on every rank
    out, state, canaries = distributed.on_rank0(prepare)
    out = out if not rank else None  # only rank 0 writes files
    # every rank checkpoints together (their noise and sampler states are gathered); rank 0 writes the file
    checkpoint = Path(cfg.output_dir) / CHECKPOINT_FILE if cfg.output_dir is not None else None
    own_data = cfg.data is not None or train_texts is not None  # the demo's records are regenerated by the attacks
    train_texts, eval_texts = _texts(cfg, train_texts, eval_texts)
    membership = (train_texts, eval_texts) if own_data and eval_texts else None
    if canaries is not None:  # one-run audit: each canary trained on once w.p. 1/2 (secret coins)
        from dptrain.finetune.data import with_audit_canaries

        train_texts = with_audit_canaries(train_texts, canaries)
    if cfg.batch_size > len(train_texts):
        raise ValueError(f"batch-size {cfg.batch_size} is larger than the dataset ({len(train_texts)} records); "
                         "lower --batch-size")
    # the demo's public pretraining is skipped on resume when the checkpoint holds the whole model
    model, tokenizer = _model(cfg, model, tokenizer, pretrain=not (state and state.get("model_is_full")))
    if cfg.lora:
        from dptrain.finetune.modeling import apply_lora

        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets,
                           seed=cfg.seed)
    if controller is None and cfg.controller:
        controller = resolve_controller(cfg.controller, seed=cfg.seed)
    trainer = PrivateLMTrainer(model, tokenizer, train_texts, eval_texts, cfg, controller=controller,
                               completion_prompts=_completion_prompts(cfg, own_data))
    if state is not None:
        trainer.load_state_dict(state)
        logger.info("resumed from %s at step %d", checkpoint, trainer.step)
    if out is not None:  # the secrets, apart from the release, once the run is set up
        _save_secrets(out, cfg, canaries, membership)
    result = trainer.train(checkpoint_path=checkpoint)
    if cfg.output_dir is not None:
        result.secret_files = [CHECKPOINT_FILE] + ([AUDIT_SECRET_FILE] if canaries is not None else []) + (
            [MEMBERS_FILE, NONMEMBERS_FILE] if membership is not None else [])
    if out is not None:
        _write_outputs(out, cfg, trainer, result, time.perf_counter() - started)
    return result


def _completion_prompts(cfg: FinetuneConfig, own_data: bool) -> Optional[List[str]]:
    """Public prompts for the before/after completions: from the bundled records' generator, never own data."""
    if not cfg.completions or own_data:
        return None
    from dptrain.finetune.completions import completion_prompts

    return completion_prompts(cfg.completions, seed=cfg.seed)


def _save_secrets(out: Path, cfg: FinetuneConfig, canaries, membership) -> None:
    """The SECRET files under ``out/private/`` (folder 0700, files 0600): audit secret, member lists."""
    private_dir(out)
    if canaries is not None and not cfg.resume:
        save_audit_secret(out, canaries)
    if membership is not None:
        save_membership(out, *membership, seed=cfg.seed)


def _write_outputs(out: Path, cfg: FinetuneConfig, trainer: PrivateLMTrainer, result: FinetuneResult,
                   seconds: float) -> None:
    report = {**result.to_dict(), "accountant": cfg.accountant, "clipping": cfg.clipping,
              "max_grad_norm": cfg.max_grad_norm, "config": cfg.to_dict(), "wall_time_s": round(seconds, 2),
              "note": LOSS_NOTE, "history": result.history, "secret_files_note": SECRET_FILES_NOTE}
    if not result.privacy.get("private", True):
        report["warning"] = (NOT_PRIVATE_WARNING.format(seed=cfg.insecure_seed) if cfg.insecure_seed is not None
                             else "this run is NOT PRIVATE (noise multiplier 0)")
    if result.history:
        plot_training(out / PLOT_NAME, result.history, target_epsilon=cfg.target_epsilon, delta=result.delta,
                      eval_before=result.eval_perplexity_before,
                      eval_after=(result.steps, result.eval_perplexity) if result.finished else None)
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
