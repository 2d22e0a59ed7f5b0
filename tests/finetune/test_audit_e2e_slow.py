"""End to end (slow, ~1.5 minutes on 2 quiet CPU cores): the bundled demo fine-tuned without DP and at epsilon 3,
with one-run audit canaries, then attacked and audited through the CLI.

(a) the non-private model exposes the demo's canaries clearly more than the epsilon-3 model (leakage needs many
    passes over the data: benchmarks/RESULTS.md privacy_study_10_epochs), and the one-run audit detects the
    non-private run;
(b) no audit of the DP run exceeds its theoretical epsilon.

The demo is shrunk to what still shows the effect: 256 private records (+ about 64 of 128 audit canaries),
expected batch 32, 20 epochs (220 steps), 64 tokens per record (every canary fits whole).
"""

import contextlib
import io
import json
import time

import pytest

from dptrain.cli import main
from dptrain.finetune import FinetuneConfig, finetune

RECORDS, BATCH, EPOCHS, MAX_LENGTH, AUDIT_CANARIES, SEED = 256, 32, 20.0, 64, 128, 0


def cli_json(*argv) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--json"]) == 0, argv
    return json.loads(out.getvalue())


def train_attack_audit(folder, target_epsilon: float) -> dict:
    """One demo run (library call, the code path of `dptrain finetune`), then `dptrain attack canary` and
    `dptrain audit --model` (default grid; at the run's delta and at delta 0, the stricter check)."""
    cfg = FinetuneConfig(target_epsilon=target_epsilon, epochs=EPOCHS, demo_records=RECORDS, batch_size=BATCH,
                         max_length=MAX_LENGTH, audit_canaries=AUDIT_CANARIES, seed=SEED, output_dir=str(folder),
                         progress=False)
    result = finetune(cfg)
    assert result.finished
    canary = cli_json("attack", "canary", "--model", str(folder), "--num-references", "1000")
    return {
        "epsilon": result.epsilon, "delta": result.delta, "noise_multiplier": result.noise_multiplier,
        "steps": result.steps, "eval_ppl": result.eval_perplexity,
        "exposures": [c["exposure"] for c in canary["canaries"]],
        "exposure_x16": next(c["exposure"] for c in canary["canaries"] if c["repeats"] == 16),
        "mean_exposure": canary["mean_exposure"],
        "audit": cli_json("audit", "--model", str(folder)),
        "audit_delta0": cli_json("audit", "--model", str(folder), "--delta", "0"),
        "audit_reference_delta0": cli_json("audit", "--model", str(folder), "--delta", "0", "--score", "reference"),
    }


@pytest.mark.slow
def test_demo_leaks_without_dp_not_at_eps3_and_audits_stay_below_epsilon(tmp_path):
    start = time.perf_counter()
    no_dp = train_attack_audit(tmp_path / "no_dp", 1e6)  # closest non-private run: clipping on, sigma ~0.01
    dp = train_attack_audit(tmp_path / "eps3", 3.0)
    seconds = time.perf_counter() - start
    for name, run in (("no DP", no_dp), ("eps 3", dp)):
        audits = {k: (round(run[k]["epsilon"], 3), f"{run[k]['num_correct']}/{run[k]['num_guesses']}")
                  for k in ("audit", "audit_delta0", "audit_reference_delta0")}
        print(f"{name}: eps {run['epsilon']:.4g} (delta {run['delta']:.3g}), sigma {run['noise_multiplier']:.3g}, "
              f"{run['steps']} steps, eval ppl {run['eval_ppl']:.2f}; exposures {[round(e, 2) for e in run['exposures']]} "
              f"(x16 {run['exposure_x16']:.2f}, mean {run['mean_exposure']:.2f}); audits {audits}")
    print(f"wall time {seconds:.0f} s")

    # (a) clearly more exposure without DP: the 16-copy canary and the mean over the 6 demo canaries
    assert no_dp["exposure_x16"] >= dp["exposure_x16"] + 5.0
    assert no_dp["exposure_x16"] >= 8.0  # far above chance (1.44 bits)
    assert no_dp["mean_exposure"] >= dp["mean_exposure"] + 1.0
    # ... and the audit has teeth: it rejects delta = 0 privacy at some epsilon > 0 for the non-private run
    assert no_dp["audit_delta0"]["epsilon"] > 0.0

    # (b) no audit of the DP run exceeds its epsilon (delta 0 audits are at least as large as at the run's delta)
    assert dp["epsilon"] <= 3.0 + 1e-6
    for key in ("audit", "audit_delta0", "audit_reference_delta0"):
        assert dp[key]["epsilon"] <= dp["epsilon"], key
        assert dp[key]["consistent"] and dp[key]["run_epsilon"] == pytest.approx(dp["epsilon"])
    assert dp["audit"]["delta"] == pytest.approx(dp["delta"])
