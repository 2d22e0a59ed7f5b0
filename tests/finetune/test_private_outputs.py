"""Outputs that depend on private records are off by default (training loss is non-private debug output), and
the report says what is DP and what is not (held-out perplexities, N)."""

import json

from dptrain.cli import main


def test_default_report_has_no_training_loss(tmp_path):
    out = tmp_path / "run"
    assert main(["finetune", "--model", "tiny", "--max-steps", "2", "--pretrain-steps", "1", "--output-dir", str(out),
                 "--json"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["history"] and all("train_loss" not in h and "batch_size" not in h for h in report["history"])
    assert all("dp_train_loss" in h for h in report["history"])  # released with noise, accounted
    assert (out / "training.png").exists()
    privacy = report["privacy"]
    assert privacy["private"] and privacy["dp"][0] == "model weights (and LoRA adapter/)"
    assert "dp_train_loss" in privacy["dp"][1] and "accounted" in privacy["dp"][1]
    assert report["eval_perplexity"] is not None  # computed, and marked as not private:
    assert "WITHOUT noise" in privacy["not_private"]["eval_perplexity_before, eval_perplexity"]
    assert "trusted" in privacy["ranks"] and "public randomness only" in privacy["seed"]
