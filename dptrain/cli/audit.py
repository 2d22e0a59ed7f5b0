"""``dptrain audit``: empirical lower bounds on epsilon from attack outcomes.

Two forms:

- one-run audit (Steinke, Nasr, Jagielski 2023) as a calculator: m canaries were each inserted with probability
  1/2 in ONE training run, r guesses were made (fixed in advance), v were right -> the epsilon that this outcome
  rules out at the given confidence;
- multi-run audit from member / non-member scores (e.g. one target example in or out of many runs): the largest
  log(TPR_lo / FPR_hi) over thresholds, with Clopper-Pearson bounds and a split-half threshold choice.

A demo run of ``dptrain finetune`` does not insert canaries with probability 1/2, so the one-run audit of a
model folder is not offered here; use ``dptrain.attacks.run_one_run_audit`` in a script to train and audit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dptrain.cli import CLIError, emit
from dptrain.cli._types import finite_float, nonneg_int

__all__ = ["add_parser", "run", "load_scores"]

EPILOG = """\
the audited epsilon is a LOWER bound: a DP run must never audit above its theoretical epsilon; a value above
it means a broken pipeline (or a guess count chosen after looking at the scores, which inflates the result).

--scores: a JSON object {"member": [...], "nonmember": [...]} (higher score = more likely a member).

examples:
  dptrain audit --num-canaries 100 --num-guesses 100 --num-correct 100           # epsilon >= 3.49
  dptrain audit --num-canaries 1000 --num-guesses 200 --num-correct 180 --delta 1e-5 --json
  dptrain audit --scores scores.json --confidence 0.99
"""






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
    p.add_argument("--delta", type=finite_float, default=0.0, help="delta of the (eps, delta) guarantee (default 0)")
    p.add_argument("--confidence", type=finite_float, default=0.95, help="confidence of the bound (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="multi-run: seed of the split-half threshold choice")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)
    return p


def load_scores(path: str) -> tuple[list, list]:
    """``(member, nonmember)`` score lists from a JSON object with keys member/nonmember (or *_scores)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--scores file not found: {file}")
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CLIError(f"{file} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(obj, dict):
        raise CLIError(f"{file} must hold a JSON object with 'member' and 'nonmember' lists, found {type(obj).__name__}")
    out = []
    for key in ("member", "nonmember"):
        value = obj.get(key, obj.get(f"{key}_scores"))
        if not isinstance(value, list):
            raise CLIError(f"{file}: '{key}' must be a list of numbers, found {type(value).__name__}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise CLIError(f"{file}: '{key}' must hold only numbers")
        out.append(value)
    return out[0], out[1]


def run(args: argparse.Namespace) -> int:
    from dptrain.attacks import multi_run_audit, one_run_audit_epsilon

    counts = (args.num_canaries, args.num_guesses, args.num_correct)
    given = sum(c is not None for c in counts)
    if args.scores is not None and given:
        raise CLIError("pass either --scores (multi-run) or the three counts (one-run), not both")
    if args.scores is None and given != 3:
        raise CLIError("pass --num-canaries, --num-guesses and --num-correct (one-run audit), or --scores FILE")
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
