"""Privacy study of the fine-tuning demo: what leaks without DP, and how much less at epsilon 8, 3, 1.

    python examples/privacy_study.py                 # ~10 minutes on 2 CPU cores; prints the table
    python examples/privacy_study.py --epsilons 1e6 3
    python examples/privacy_study.py --write-results # also writes section "privacy_study" of benchmarks/RESULTS.md
    python examples/privacy_study.py --epochs 10 --section privacy_study_10_epochs --write-results   # 5x longer

For each budget the bundled demo (tiny GPT-2, public pretraining, DP fine-tuning on synthetic clinical records
with canaries) is trained through the library API (``dptrain.finetune.finetune``) with the demo's own records
plus one-run-audit canaries, then attacked with the CLI (``dptrain attack mia``, ``dptrain attack canary``):

- "no DP" is target epsilon 1e6: per-sample clipping stays on (C = 1), the calibrated noise multiplier is ~0.005 for
  the default 40 steps, i.e. practically no noise. The finetune job refuses an infinite budget, so this is the closest non-private run
  that goes through the same code path.
- canary exposure: the demo's 6 canaries (inserted 1, 1, 1, 4, 4, 16 times) ranked among 2000 random fillings
  of their 6-digit slot (max log2 10^6 = 19.9 bits; chance ~1.44 bits).
- MIA: LOSS and Min-K% scores of the run's training records vs its held-out records (AUC, TPR at 1% FPR).
- one-run audit (Steinke et al. 2023): m audit canaries, each inserted once with probability 1/2 (coin flips
  drawn before training); the LOSS score guesses "in" for the top k and "out" for the bottom k, k fixed in
  advance; the audited epsilon (delta = 0, 95%) is a lower bound that must stay below each run's epsilon.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import write_section  # noqa: E402
from dptrain.attacks import CanaryTemplate, one_run_audit, sample_inclusion_mask  # noqa: E402
from dptrain.cli import main as cli  # noqa: E402

AUDIT_TEMPLATE = "Audit record {x}{x}{x}{x}{x}{x}{x}{x}: identity confirmed."


def cli_json(*argv) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli([*argv, "--json"])
    if status != 0:
        raise RuntimeError(f"dptrain {' '.join(argv)} exited with {status}")
    return json.loads(out.getvalue())


def audit_canaries(m: int, seed: int) -> tuple[list[str], np.ndarray]:
    """m distinct audit canary texts and their inclusion coin flips (drawn before any training)."""
    template = CanaryTemplate(AUDIT_TEMPLATE)
    rng = np.random.default_rng(seed)
    indices = rng.choice(template.space_size, size=m, replace=False)
    return template.candidates(indices), sample_inclusion_mask(m, seed=seed)


def one_run(epsilon: float, out_dir: Path, args, audit_texts, inclusion) -> dict:
    from dptrain.attacks.lm import loss_scores, tokenize_texts
    from dptrain.cli.attack import demo_records, load_model
    from dptrain.finetune import FinetuneConfig, finetune
    from dptrain.finetune.data import synthetic_private_records

    cfg = FinetuneConfig(target_epsilon=epsilon, epochs=args.epochs, output_dir=str(out_dir), overwrite=True,
                         progress=False, seed=args.seed)
    train = synthetic_private_records(cfg.demo_records, seed=cfg.seed).records
    train = train + [t for t, keep in zip(audit_texts, inclusion) if keep]
    held = synthetic_private_records(cfg.demo_eval_records, seed=cfg.seed + 1, canary_repeats=()).records
    started = time.perf_counter()
    result = finetune(cfg, train_texts=train, eval_texts=held)  # the demo model; the records the demo would use
    seconds = time.perf_counter() - started
    members, nonmembers = (out_dir.parent / f"{out_dir.name}-{kind}.jsonl" for kind in ("members", "nonmembers"))
    for path, texts in zip((members, nonmembers), demo_records(cfg.to_dict())):  # demo canaries left out
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    mia = cli_json("attack", "mia", "--model", str(out_dir), "--members", str(members), "--nonmembers", str(nonmembers))
    canary = cli_json("attack", "canary", "--model", str(out_dir), "--num-references", str(args.num_references))
    model, tokenizer = load_model(str(out_dir))
    ids, att = tokenize_texts(tokenizer, audit_texts)  # (m, T)
    scores = loss_scores(model, ids, att)  # (m,)
    audit = one_run_audit(scores, inclusion, num_guesses_pos=args.guesses, num_guesses_neg=args.guesses)
    return {
        "target_epsilon": epsilon, "epsilon": result.epsilon, "delta": result.delta,
        "noise_multiplier": result.noise_multiplier, "eval_ppl": result.eval_perplexity,
        "exposure_mean": canary["mean_exposure"], "exposure_x16": canary["canaries"][-1]["exposure"],
        "exposures": [round(c["exposure"], 2) for c in canary["canaries"]],
        "loss_auc": mia["loss"]["auc"], "loss_tpr1": mia["loss"]["tpr_at_fpr_0.01"],
        "mink_auc": mia["min_k"]["auc"], "mink_tpr1": mia["min_k"]["tpr_at_fpr_0.01"],
        "audit_eps": audit.epsilon, "audit_correct": audit.num_correct, "audit_guesses": audit.num_guesses,
        "train_seconds": seconds,
    }


def table(rows: list[dict], args) -> str:
    head = ("| run | epsilon (delta) | noise mult. | eval ppl | canary exposure mean / x16 (bits) | "
            "LOSS AUC / TPR@1% | Min-K% AUC / TPR@1% | one-run audit eps (correct/guesses) |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        name = "no DP (target eps 1e6)" if r["target_epsilon"] >= 1e5 else f"DP eps {r['target_epsilon']:g}"
        body += (f"| {name} | {r['epsilon']:.3g} ({r['delta']:.2g}) | {r['noise_multiplier']:.3g} | {r['eval_ppl']:.2f} | "
                 f"{r['exposure_mean']:.2f} / {r['exposure_x16']:.2f} | {r['loss_auc']:.3f} / {r['loss_tpr1']:.3f} | "
                 f"{r['mink_auc']:.3f} / {r['mink_tpr1']:.3f} | {r['audit_eps']:.2f} ({r['audit_correct']}/{r['audit_guesses']}) |\n")
    notes = (
        f"\nDemo fine-tuning ({args.epochs:g} epochs, seed {args.seed}); exposures of the 6 demo canaries "
        f"(inserted 1,1,1,4,4,16 times) among {args.num_references} random 6-digit fillings (max 19.9 bits, chance 1.44). "
        f"MIA: the run's training records vs its 100 held-out records (TPR at 0.1% FPR is not measurable with 100 "
        f"non-members). One-run audit: {args.audit_canaries} canaries inserted once each with probability 1/2, "
        f"{args.guesses} + {args.guesses} guesses fixed in advance, LOSS score, delta 0, 95% confidence: a lower "
        f"bound, never above the run's epsilon. 'No DP' keeps clipping (C = 1) with the tiny noise multiplier shown.\n\n"
        "Per-canary exposures (bits): "
        + "; ".join(f"{'no DP' if r['target_epsilon'] >= 1e5 else 'eps ' + format(r['target_epsilon'], 'g')}: "
                    f"{r['exposures']}" for r in rows)
        + "\n"
    )
    return head + body + notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1e6, 8.0, 3.0, 1.0])
    parser.add_argument("--epochs", type=float, default=2.0, help="demo epochs (default 2, the demo's own)")
    parser.add_argument("--num-references", type=int, default=2000)
    parser.add_argument("--audit-canaries", type=int, default=256)
    parser.add_argument("--guesses", type=int, default=20, help="k+ = k- of the one-run audit (fixed in advance)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--section", default="privacy_study", help="RESULTS.md section (default privacy_study)")
    parser.add_argument("--write-results", action="store_true",
                        help="also write the table into benchmarks/RESULTS.md (default: print only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    audit_texts, inclusion = audit_canaries(args.audit_canaries, seed=args.seed + 7)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for eps in args.epsilons:
            row = one_run(eps, Path(tmp) / f"eps{eps:g}", args, audit_texts, inclusion)
            print(json.dumps(row), flush=True)
            if row["audit_eps"] > row["epsilon"]:
                print(f"WARNING: audit {row['audit_eps']:.3f} exceeds epsilon {row['epsilon']:.3f}", flush=True)
            rows.append(row)
    body = table(rows, args)
    print(body)
    if args.write_results:
        write_section(args.section, body)
        print(f"written: section {args.section!r} of {ROOT / 'benchmarks' / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
