"""``dptrain attack``: membership inference (``mia``) and canary exposure (``canary``) on a saved causal LM.

Both work on a model folder written by ``dptrain finetune`` (or any ``save_pretrained`` folder with its
tokenizer). When the folder came from the bundled demo (its ``report.json`` says the records were synthetic),
the member/non-member records and the canaries are regenerated from the run's seed, so no file is needed; a run
on your own data with held-out records left them in its SECRET ``private/members.jsonl`` and ``nonmembers.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from dptrain.cli import CLIError, emit
from dptrain.cli._types import fraction, positive_int

__all__ = ["add_parser", "run_mia", "run_canary", "demo_records", "demo_canaries", "load_model"]

MIA_EPILOG = """\
scores (higher = more likely a member): loss (-mean token NLL), zlib (loss / zlib length of the text),
min_k (mean of the lowest 20% token log-probs), reference (reference-model loss - model loss; needs
--reference-model, e.g. the base checkpoint before fine-tuning).
metrics per score: auc, tpr_at_fpr_0.001, tpr_at_fpr_0.01, balanced_accuracy.

examples:
  dptrain attack mia --model out                        # demo run: records regenerated from out/report.json;
                                                        # own data: out/private/members.jsonl, nonmembers.jsonl
  dptrain attack mia --model out --members train.jsonl --nonmembers heldout.jsonl --json
  dptrain attack mia --model out --reference-model gpt2 --members train.txt --nonmembers heldout.txt --plot roc.png
"""

CANARY_EPILOG = """\
exposure (Carlini et al. 2019) = log2 |R| - log2 rank of the canary among all fillings R of its template,
estimated from --num-references random fillings (interpolated; skew-normal fit beyond the sample).
A canary at a random rank has ~1.44 bits; a memorised 6-digit code approaches log2 10^6 = 19.9 bits.

--canaries: JSONL, one object per line with "template" (slots {d} digit, {l} lowercase, {u} uppercase,
{x} hex) and "secret" (the slot values of the inserted canary), e.g.
  {"template": "The secret code of Ann Lee is {d}{d}{d}{d}{d}{d}.", "secret": "482913"}

examples:
  dptrain attack canary --model out                     # demo run: its canaries, from out/report.json
  dptrain attack canary --model out --canaries canaries.jsonl --num-references 5000 --json
"""


# ------------------------------------------------------------------------------------------------ arguments


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``attack`` (with ``mia`` and ``canary``) on the dispatcher's sub-parsers."""
    parser = subparsers.add_parser(
        "attack", help="privacy attacks on a saved LM: membership inference, canary exposure",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  dptrain attack mia --model out --json\n  dptrain attack canary --model out --num-references 2000\n"
        "Run 'dptrain attack mia --help' or 'dptrain attack canary --help' for all options and examples.",
    )
    sub = parser.add_subparsers(dest="attack", metavar="<attack>")
    parser.set_defaults(func=_no_attack(parser))

    mia = sub.add_parser(
        "mia", help="membership inference: LOSS, zlib, Min-K%% (and reference) scores, ROC metrics",
        description="Score member and non-member records with a model and report ROC metrics of each attack.",
        epilog=MIA_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mia.add_argument("--model", required=True, help="model folder (save_pretrained model + tokenizer)")
    mia.add_argument("--reference-model", default=None, help="reference model folder or hub name (adds 'reference')")
    mia.add_argument("--members", default=None, help="training records: .jsonl ('text'), .csv, .txt (one per line) "
                     "or a folder of .txt (default: <model>/private/members.jsonl, or the demo's records)")
    mia.add_argument("--nonmembers", default=None, help="records not trained on, same format")
    mia.add_argument("--k", type=fraction, default=0.2, help="Min-K%% fraction (default 0.2)")
    mia.add_argument("--max-length", type=positive_int, default=None,
                     help="tokens per record (default: the run's max_length, else the tokenizer's limit)")
    mia.add_argument("--batch-size", type=positive_int, default=32, help="records per forward pass (default 32)")
    mia.add_argument("--plot", default=None, help="write a log-log ROC plot (PNG) here")
    mia.add_argument("--json", action="store_true", help="print {score_name: metrics} as one JSON object")
    mia.set_defaults(func=run_mia)

    can = sub.add_parser(
        "canary", help="exposure of inserted canaries among random fillings of their template",
        description="Rank each canary's log-perplexity among reference candidates and report its exposure (bits).",
        epilog=CANARY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    can.add_argument("--model", required=True, help="model folder (save_pretrained model + tokenizer)")
    can.add_argument("--canaries", default=None, help="JSONL of {template, secret} (default: the demo's canaries)")
    can.add_argument("--num-references", type=positive_int, default=1000,
                     help="random candidates per template (default 1000)")
    can.add_argument("--batch-size", type=positive_int, default=64, help="sequences per forward pass (default 64)")
    can.add_argument("--seed", type=int, default=0, help="seed of the reference sample (default 0)")
    can.add_argument("--plot", default=None, help="write an exposure histogram (PNG) here")
    can.add_argument("--json", action="store_true", help="print the result as one JSON object")
    can.set_defaults(func=run_canary)
    return parser


def _no_attack(parser):
    def run(args) -> int:
        raise CLIError("name an attack: 'dptrain attack mia ...' or 'dptrain attack canary ...' (see --help)")

    return run


# ------------------------------------------------------------------------------------------- model and data
def _check_model_dir(path: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise CLIError(f"{folder} has no config.json: expected a save_pretrained model folder (dptrain finetune output)")
    return folder


def load_model(path: str, *, must_be_dir: bool = True):
    """``(model, tokenizer)`` in eval mode from a save_pretrained folder (or a hub name when not must_be_dir)."""
    from transformers.utils import logging as hf_logging

    from dptrain.finetune.modeling import load_pretrained

    hf_logging.disable_progress_bar()  # no "Loading weights" bar on stderr
    if must_be_dir:
        _check_model_dir(path)
    model, tokenizer = load_pretrained(str(path))
    model.eval()
    return model, tokenizer


def _run_config(folder: Path) -> dict | None:
    """The finetune config stored in ``folder/report.json``, or None when there is none."""
    report = folder / "report.json"
    if not report.is_file():
        return None
    try:
        config = json.loads(report.read_text()).get("config")
    except (json.JSONDecodeError, AttributeError):
        raise CLIError(f"{report} is not a dptrain finetune report (bad JSON)") from None
    return config if isinstance(config, dict) else None


def _demo_config(folder: Path, what: str) -> dict:
    config = _run_config(folder)
    if config is None or config.get("data") is not None or config.get("eval_data") is not None:
        raise CLIError(f"{folder} is not a demo run (no report.json with synthetic records): pass {what}")
    return config


def demo_records(config: dict) -> tuple[list[str], list[str]]:
    """Members and non-members of a demo run: its training records (canaries and records also in the
    held-out set left out, duplicates removed) and its held-out records, regenerated from the run's seed."""
    from dptrain.finetune.data import synthetic_private_records

    seed = int(config.get("seed", 0))
    train = synthetic_private_records(int(config["demo_records"]), seed=seed)
    held = synthetic_private_records(int(config["demo_eval_records"]), seed=seed + 1, canary_repeats=()).records
    canary_texts = {c.text for c in train.canaries}
    held_set = set(held)
    members = list(dict.fromkeys(t for t in train.records if t not in canary_texts and t not in held_set))
    nonmembers = list(dict.fromkeys(t for t in held))
    return members, nonmembers


def demo_canaries(config: dict) -> list[dict]:
    """The demo run's canaries as ``{template, secret, repeats}`` (template: the sentence with 6 digit slots)."""
    from dptrain.finetune.data import synthetic_private_records

    corpus = synthetic_private_records(int(config["demo_records"]), seed=int(config.get("seed", 0)))
    return [
        {"template": c.prefix + "{d}" * len(c.code) + ".", "secret": c.code, "repeats": c.repeats}
        for c in corpus.canaries
    ]


def _load_records(path: str, name: str) -> list[str]:
    from dptrain.finetune.data import load_texts

    try:
        return load_texts(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--{name} file not found: {path}") from None


def _max_length(args_max_length, config: dict | None, tokenizer) -> int | None:
    if args_max_length is not None:
        return args_max_length
    if config and config.get("max_length"):
        return int(config["max_length"])
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and limit < 1_000_000 else None


# ---------------------------------------------------------------------------------------------------- mia
def run_mia(args: argparse.Namespace) -> int:
    folder = _check_model_dir(args.model)
    if (args.members is None) != (args.nonmembers is None):
        raise CLIError("pass both --members and --nonmembers, or neither (demo runs only)")
    from dptrain.finetune.secret_files import MEMBERS_FILE, NONMEMBERS_FILE

    if args.members is None and (folder / MEMBERS_FILE).is_file() and (folder / NONMEMBERS_FILE).is_file():
        config = _run_config(folder)  # a run on your own data: the secret member/non-member records it wrote
        members = _load_records(str(folder / MEMBERS_FILE), "members")
        nonmembers = _load_records(str(folder / NONMEMBERS_FILE), "nonmembers")
        source = f"{folder / MEMBERS_FILE} vs {folder / NONMEMBERS_FILE}, SECRET files of the run"
    elif args.members is None:
        config = _demo_config(folder, "--members and --nonmembers (a 'dptrain finetune' run on your own data with "
                                      "held-out records writes them to <output-dir>/private/)")
        members, nonmembers = demo_records(config)
        source = "demo records regenerated from report.json"
    else:
        config = _run_config(folder)
        members, nonmembers = _load_records(args.members, "members"), _load_records(args.nonmembers, "nonmembers")
        source = f"{args.members} vs {args.nonmembers}"

    from dptrain.attacks import roc_metrics
    from dptrain.attacks.lm import lm_scores, tokenize_texts

    model, tokenizer = load_model(args.model)
    reference = None
    if args.reference_model is not None:
        reference, _ = load_model(args.reference_model, must_be_dir=Path(args.reference_model).exists())
    max_length = _max_length(args.max_length, config, tokenizer)

    def score(texts):
        ids, att = tokenize_texts(tokenizer, texts, max_length=max_length)  # (N, T), (N, T)
        out = lm_scores(model, ids, att, texts=texts, reference_model=reference, k=args.k, batch_size=args.batch_size)
        out.pop("nll")
        return out

    member_scores, nonmember_scores = score(members), score(nonmembers)
    result = {name: roc_metrics(member_scores[name], nonmember_scores[name]) for name in member_scores}
    if args.plot:
        from dptrain.attacks.plots import plot_roc

        plot_roc({name: (member_scores[name], nonmember_scores[name]) for name in member_scores}, args.plot)
    lines = [f"membership inference on {folder}: {len(members)} members, {len(nonmembers)} non-members ({source})",
             f"  {'score':<10} {'AUC':>6} {'TPR@0.1%':>9} {'TPR@1%':>7} {'bal.acc':>8}"]
    for name, m in result.items():
        lines.append(f"  {name:<10} {m['auc']:6.3f} {m['tpr_at_fpr_0.001']:9.3f} {m['tpr_at_fpr_0.01']:7.3f} "
                     f"{m['balanced_accuracy']:8.3f}")
    lines.append("  (AUC 0.5 = chance; TPR at 0.1% FPR needs >= 1000 non-members to mean anything)")
    if args.plot:
        lines.append(f"  ROC plot: {args.plot}")
    emit(result, "\n".join(lines), args.json)
    return 0


# ------------------------------------------------------------------------------------------------- canary
def _load_canaries(path: str) -> list[dict]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--canaries file not found: {file}")
    canaries = []
    for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise CLIError(f"{file}: line {lineno} is not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("template"), str) or not isinstance(obj.get("secret"), str):
            raise CLIError(f"{file}: line {lineno} needs string fields 'template' and 'secret'")
        canaries.append(obj)
    if not canaries:
        raise CLIError(f"--canaries file {file} holds no canary (empty, or only blank lines)")
    return canaries


def run_canary(args: argparse.Namespace) -> int:
    folder = _check_model_dir(args.model)
    canaries = _load_canaries(args.canaries) if args.canaries else demo_canaries(_demo_config(folder, "--canaries"))

    import numpy as np

    from dptrain.attacks import CHANCE_EXPOSURE_BITS, CanaryTemplate, estimate_exposure
    from dptrain.attacks.lm import sequence_nll, tokenize_texts

    model, tokenizer = load_model(args.model)
    rng = np.random.default_rng(args.seed)
    rows = []
    for canary in canaries:
        template = CanaryTemplate(canary["template"])
        text = template.fill(canary["secret"])  # ValueError naming the slot when the secret does not fit
        n_ref = min(args.num_references, template.space_size)
        indices = rng.choice(template.space_size, size=n_ref, replace=False) if template.space_size <= 10**7 \
            else rng.integers(template.space_size, size=n_ref)
        texts = [text] + template.candidates(indices)
        ids, att = tokenize_texts(tokenizer, texts)  # (1 + n_ref, T)
        log_ppl = sequence_nll(model, ids, att, reduction="sum", batch_size=args.batch_size)  # (1 + n_ref,)
        exposure = float(estimate_exposure(log_ppl[:1], log_ppl[1:], space_size=template.space_size)[0])
        row = {"text": text, "exposure": exposure, "log_perplexity": float(log_ppl[0]),
               "max_exposure": math.log2(template.space_size), "num_references": int(n_ref)}
        if "repeats" in canary:
            row["repeats"] = int(canary["repeats"])
        rows.append(row)
    mean = float(np.mean([r["exposure"] for r in rows]))
    result = {"canaries": rows, "mean_exposure": mean, "chance_exposure": CHANCE_EXPOSURE_BITS}
    if args.plot:
        from dptrain.attacks.plots import plot_exposure_histogram

        plot_exposure_histogram([r["exposure"] for r in rows], args.plot, max_bits=max(r["max_exposure"] for r in rows))
    lines = [f"canary exposure on {folder} ({len(rows)} canaries, up to {args.num_references} references each; "
             f"chance ~{CHANCE_EXPOSURE_BITS:.2f} bits)"]
    for r in rows:
        reps = f" x{r['repeats']}" if "repeats" in r else ""
        lines.append(f"  {r['exposure']:6.2f} / {r['max_exposure']:.1f} bits{reps:>5}  {r['text']}")
    lines.append(f"  mean exposure: {mean:.2f} bits")
    emit(result, "\n".join(lines), args.json)
    return 0
