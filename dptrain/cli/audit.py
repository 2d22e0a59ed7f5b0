"""``dptrain audit``: empirical lower bounds on epsilon from attack outcomes.

Three forms:

- one-run audit (Steinke, Nasr, Jagielski 2023) as a calculator: m canaries were each inserted with probability
  1/2 in ONE training run, r guesses were made (fixed in advance), v were right -> the epsilon that this outcome
  rules out at the given confidence;
- multi-run audit from member / non-member scores (e.g. one target example in or out of many runs): the largest
  log(TPR_lo / FPR_hi) over thresholds, with Clopper-Pearson bounds and a split-half threshold choice;
- one-run audit of a model folder (``--model D``) written by ``dptrain finetune --audit-canaries M``: the run
  added M random canaries (from secret entropy), each trained on once with probability 1/2, and kept the texts
  and the inclusion mask in ``D/private/audit_secret.json`` (mode 0600), the AUDITOR'S SECRET. Every canary is
  scored with the saved model (higher = more likely trained on), "in" is guessed for the top k+ and "out" for
  the bottom k-, and the audited epsilon is set against the run's own (theoretical) epsilon, at the run's delta.
  The guess counts are fixed before any score is seen: ``--guesses K`` (k+ = k- = K), or by default the best
  of a grid that depends on M only, with a Bonferroni correction (``dptrain.attacks.scan_one_run_audit``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dptrain.cli import CLIError, emit
from dptrain.cli._types import finite_float, nonneg_int, positive_int
from dptrain.validation import is_number

__all__ = ["add_parser", "run", "load_scores", "load_audit_secret", "guess_grid", "SCORES"]

EPILOG = """\
the audited epsilon is a LOWER bound: a DP run must never audit above its theoretical epsilon; a value above
it means a broken pipeline (or a guess count chosen after looking at the scores, which inflates the result).

--scores: a JSON object {"member": [...], "nonmember": [...]} (higher score = more likely a member).

--model scores: loss (-mean token NLL under the fine-tuned model), or reference (base-model loss minus
fine-tuned loss: the demo's publicly pretrained model rebuilt from the run's seed, else the run's --model).

examples:
  dptrain finetune --output-dir out --audit-canaries 1000 && dptrain audit --model out
  dptrain audit --model out --guesses 50 --score reference --json
  dptrain audit --num-canaries 100 --num-guesses 100 --num-correct 100           # epsilon >= 3.49
  dptrain audit --num-canaries 1000 --num-guesses 200 --num-correct 180 --delta 1e-5 --json
  dptrain audit --scores scores.json --confidence 0.99
"""




SCORES = ("loss", "reference")
GRID_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)  # guesses r as a fraction of the canaries (guess_grid)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``audit`` on the dispatcher's sub-parsers."""
    p = subparsers.add_parser(
        "audit", help="empirical epsilon lower bound: one-run audit calculator or multi-run audit of scores",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    one = p.add_argument_group("one-run audit (all three)")
    one.add_argument("--num-canaries", type=nonneg_int, help="m: canaries, each inserted with probability 1/2")
    one.add_argument("--num-guesses", type=nonneg_int, help="r: guesses made (fixed before seeing the scores)")
    one.add_argument("--num-correct", type=nonneg_int, help="v: correct guesses")
    p.add_argument("--scores", default=None, help="multi-run audit: JSON with member and nonmember scores")
    by_model = p.add_argument_group("one-run audit of a dptrain finetune run (--model)")
    by_model.add_argument("--model", default=None, metavar="D",
                     help="output folder of 'dptrain finetune --audit-canaries M' (model, report.json and the "
                          "secret private/audit_secret.json)")
    by_model.add_argument("--guesses", type=positive_int, default=None, metavar="K",
                     help="guess 'in' for the top K and 'out' for the bottom K scores (default: best of a fixed "
                          "grid, Bonferroni-corrected)")
    by_model.add_argument("--score", choices=SCORES, default="loss", help="canary score (default loss)")
    by_model.add_argument("--batch-size", type=positive_int, default=64, help="canaries per forward pass (default 64)")
    p.add_argument("--delta", type=finite_float, default=None,
                   help="delta of the (eps, delta) guarantee (default: the run's delta with --model, else 0)")
    p.add_argument("--confidence", type=finite_float, default=0.95, help="confidence of the bound (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split-half threshold choice / of tie-breaking")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)
    return p


def _json_object(file: Path, expected: str) -> dict:
    """The JSON object in ``file``, or a one-line CLIError naming the file and what was expected."""
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CLIError(f"{file} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(obj, dict):
        raise CLIError(f"{file} must hold {expected}, found {type(obj).__name__}")
    return obj


def load_scores(path: str) -> tuple[list, list]:
    """``(member, nonmember)`` score lists from a JSON object with keys member/nonmember (or *_scores)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--scores file not found: {file}")
    obj = _json_object(file, "a JSON object with 'member' and 'nonmember' lists")
    out = []
    for key in ("member", "nonmember"):
        value = obj.get(key, obj.get(f"{key}_scores"))
        if not isinstance(value, list):
            raise CLIError(f"{file}: '{key}' must be a list of numbers, found {type(value).__name__}")
        if not all(is_number(v) for v in value):
            raise CLIError(f"{file}: '{key}' must hold only numbers")
        out.append(value)
    return out[0], out[1]


def run(args: argparse.Namespace) -> int:
    from dptrain.attacks import multi_run_audit, one_run_audit_epsilon

    counts = (args.num_canaries, args.num_guesses, args.num_correct)
    given = sum(c is not None for c in counts)
    if args.model is not None:
        if args.scores is not None or given:
            raise CLIError("pass --model alone, not with --scores or the one-run counts")
        return run_model(args)
    if args.guesses is not None:
        raise CLIError("--guesses goes with --model (for the calculator, pass --num-guesses)")
    if args.scores is not None and given:
        raise CLIError("pass either --scores (multi-run) or the three counts (one-run), not both")
    if args.scores is None and given != 3:
        raise CLIError("pass --num-canaries, --num-guesses and --num-correct (one-run audit), --scores FILE, "
                       "or --model D")
    args.delta = 0.0 if args.delta is None else args.delta
    level = f"{args.confidence:g} confidence, delta = {args.delta:g}"
    if args.scores is None:
        m, r, v = counts
        eps = one_run_audit_epsilon(num_canaries=m, num_guesses=r, num_correct=v, delta=args.delta,
                                    confidence=args.confidence)
        result = {"audit": "one-run", "epsilon": eps, "num_canaries": m, "num_guesses": r, "num_correct": v,
                  "delta": args.delta, "confidence": args.confidence}
        human = f"one-run audit: epsilon >= {eps:.2f} ({v}/{r} correct guesses, {m} canaries; {level})"
    else:
        member, nonmember = load_scores(args.scores)
        res = multi_run_audit(member, nonmember, delta=args.delta, confidence=args.confidence, seed=args.seed)
        result = {"audit": "multi-run", "epsilon": res.epsilon, "threshold": res.threshold, "tpr_lower": res.tpr_lower,
                  "fpr_upper": res.fpr_upper, "method": res.method, "num_members": len(member),
                  "num_nonmembers": len(nonmember), "delta": args.delta, "confidence": args.confidence}
        human = (f"multi-run audit: epsilon >= {res.epsilon:.2f} ({len(member)} member / {len(nonmember)} non-member "
                 f"scores; threshold {res.threshold:.4g} chosen on a split half: TPR >= {res.tpr_lower:.3f}, "
                 f"FPR <= {res.fpr_upper:.3f}; {level})")
    emit(result, human, args.json)
    return 0


# ------------------------------------------------------------------------------------ one-run audit of a run
def load_audit_secret(folder: Path) -> tuple[dict, list[str], list[bool]]:
    """``(report, canary_texts, inclusion_mask)`` of a finished ``dptrain finetune --audit-canaries`` run: the
    report from ``report.json``, the canaries and mask from the secret ``private/audit_secret.json``."""
    from dptrain.finetune.api import AUDIT_SECRET_FILE, REPORT_NAME

    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    file = folder / REPORT_NAME
    if not file.is_file():
        raise CLIError(f"{folder} has no {REPORT_NAME}: expected an output folder of 'dptrain finetune'")
    report = _json_object(file, "a JSON object (a dptrain finetune report)")
    secret_file = folder / AUDIT_SECRET_FILE
    if not secret_file.is_file():
        raise CLIError(f"{secret_file} not found: the auditor's secret of a run trained with "
                       "'dptrain finetune --audit-canaries M' (e.g. 1000) is needed to audit it")
    secret = _json_object(secret_file, "a JSON object (a dptrain audit secret)")
    texts, mask = secret.get("canaries"), secret.get("inclusion_mask")
    if (not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts)
            or not isinstance(mask, list) or len(mask) != len(texts)
            or any(isinstance(b, bool) or b not in (0, 1) for b in mask)):
        raise CLIError(f"{secret_file} must hold 'canaries' (strings) and an 'inclusion_mask' of 0/1 of the same "
                       "length")
    if not report.get("finished", False):
        raise CLIError(f"the run in {folder} stopped at step {report.get('steps')} of {report.get('total_steps')}: "
                       "finish it with 'dptrain finetune ... --resume' before auditing")
    for key in ("epsilon", "delta"):
        if not is_number(report.get(key)):
            raise CLIError(f"{file}: '{key}' must be a number, found {report.get(key)!r}")
    return report, texts, [bool(b) for b in mask]


def guess_grid(num_canaries: int) -> list[tuple[int, int]]:
    """The fixed (k+, k-) grid searched by default; it depends on m only, never on the scores.

    For r = floor(m f), f in 1/32 ... 1/2: "in" for the top r (a memorised canary scores high, while a
    left-out one looks like any random string, so the top end carries most of the signal), and r/2 top plus
    r/2 bottom (Steinke et al.'s two-sided guesses)."""
    pairs = set()
    for f in GRID_FRACTIONS:
        r = max(1, int(num_canaries * f))
        pairs.add((r, 0))
        if r // 2 >= 1:
            pairs.add((r // 2, r // 2))
    return sorted(pairs, key=lambda kk: (kk[1], kk[0]))


def _reference_model(config: dict, model, folder: Path):
    """The model the run started from: the demo's public pretraining rebuilt from the seed, else ``--model``.
    Refused when its parameter shapes differ from the fine-tuned ``model`` (a base we cannot rebuild)."""
    if config.get("model") is None:
        from dptrain.finetune.demo import demo_model_and_tokenizer, pretrain_public

        seed, max_length = int(config.get("seed", 0)), int(config.get("max_length", 128))
        reference, tokenizer = demo_model_and_tokenizer(max_length, seed=seed)
        _check_same_shapes(reference, model, folder)  # before the (few seconds of) pretraining
        pretrain_public(reference, tokenizer, steps=int(config.get("pretrain_steps", 30)), max_length=max_length,
                        seed=seed)
        return reference.eval()
    from dptrain.cli.attack import load_model

    reference = load_model(str(config["model"]), must_be_dir=False)[0]
    _check_same_shapes(reference, model, folder)
    return reference


def _check_same_shapes(reference, model, folder: Path) -> None:
    def shapes(net) -> dict:
        return {k: tuple(v.shape) for k, v in net.state_dict().items()}

    if shapes(reference) != shapes(model):
        raise CLIError(f"cannot rebuild the base model of {folder} (its architecture differs from the saved model: "
                       "fine-tuned from a model passed in Python?): use --score loss")


def canary_scores(folder: Path, config: dict, texts: list[str], *, score: str, batch_size: int):
    """Score of each canary with the saved model (higher = more likely trained on); numpy (m,)."""
    from dptrain.attacks.lm import sequence_nll, tokenize_texts
    from dptrain.cli.attack import load_model

    model, tokenizer = load_model(str(folder))
    max_length = config.get("max_length")
    ids, att = tokenize_texts(tokenizer, texts, max_length=int(max_length) if max_length else None)  # (m, T)
    nll = sequence_nll(model, ids, att, batch_size=batch_size)  # (m,) mean token NLL
    if score == "loss":
        return -nll
    ref = sequence_nll(_reference_model(config, model, folder), ids, att, batch_size=batch_size)  # (m,)
    return ref - nll


def run_model(args: argparse.Namespace) -> int:
    from dptrain.attacks import one_run_audit, scan_one_run_audit

    folder = Path(args.model)
    report, texts, mask = load_audit_secret(folder)
    if not (folder / "config.json").is_file():
        raise CLIError(f"{folder} has no config.json: the run saved no model to audit")
    m = len(texts)
    if args.guesses is not None and 2 * args.guesses > m:
        raise CLIError(f"--guesses K needs 2K <= the run's {m} audit canaries, found K = {args.guesses}")
    run_eps, run_delta = float(report["epsilon"]), float(report["delta"])
    delta = run_delta if args.delta is None else args.delta
    config = report.get("config") if isinstance(report.get("config"), dict) else {}
    scores = canary_scores(folder, config, texts, score=args.score, batch_size=args.batch_size)
    if args.guesses is not None:
        res = one_run_audit(scores, mask, num_guesses_pos=args.guesses, num_guesses_neg=args.guesses, delta=delta,
                            confidence=args.confidence, seed=args.seed)
        grid, choice = [(args.guesses, args.guesses)], "fixed by --guesses"
    else:
        grid = guess_grid(m)
        res = scan_one_run_audit(scores, mask, guesses=grid, delta=delta, confidence=args.confidence,
                                 method="bonferroni", seed=args.seed)
        choice = f"best of {len(grid)} fixed (k+, k-), Bonferroni-corrected"
    consistent = res.epsilon <= run_eps
    result = {"audit": "one-run-model", "model": str(folder), "epsilon": res.epsilon, "score": args.score,
              "num_canaries": m, "num_included": int(sum(mask)), "num_guesses_pos": res.num_guesses_pos,
              "num_guesses_neg": res.num_guesses_neg, "num_guesses": res.num_guesses,
              "num_correct": res.num_correct, "guess_grid": [list(g) for g in grid], "guess_choice": choice,
              "delta": delta, "confidence": args.confidence, "run_epsilon": run_eps, "run_delta": run_delta,
              "run_target_epsilon": report.get("target_epsilon"), "consistent": consistent}
    if consistent:
        verdict = "consistent: the audit stays below the run's epsilon"
    elif delta < run_delta:
        verdict = ("above the run's epsilon, but audited at a smaller delta than the run's: not a contradiction "
                   "by itself (audit at the run's delta to compare)")
    else:
        verdict = ("AUDIT EXCEEDS THE RUN'S EPSILON: a broken pipeline or accountant (or chance, at most "
                   f"{1 - args.confidence:.0%} of the time)")
    delta_note = "" if delta == run_delta else (
        f"  (note: audited at delta {delta:g}, the run's epsilon is at delta {run_delta:.3g})\n")
    human = (
        f"one-run audit of {folder}: {m} audit canaries, {sum(mask)} trained on once "
        "(AUDITOR'S SECRET from private/audit_secret.json)\n"
        f"  score: {args.score}; guesses: 'in' for the top {res.num_guesses_pos}, 'out' for the bottom "
        f"{res.num_guesses_neg} ({choice}): {res.num_correct}/{res.num_guesses} correct\n"
        f"  audited epsilon >= {res.epsilon:.3f}  ({args.confidence:g} confidence, delta = {delta:.3g}; "
        "a lower bound)\n"
        f"  run's epsilon    = {run_eps:.3f}  (theory, delta = {run_delta:.3g}; "
        f"target {report.get('target_epsilon')})\n"
        f"{delta_note}  {verdict}"
    )
    emit(result, human, args.json)
    return 0
