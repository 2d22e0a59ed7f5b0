"""The tiny-model demo `dptrain finetune --model tiny` end to end (slow: a few minutes on 2 CPU cores). The
main job (SmolLM2-135M) runs as README writes it in tests/test_readme.py under -m slow."""

import json
import time

import pytest

from dptrain.cli import main


@pytest.mark.slow
def test_tiny_demo_meets_its_budget_and_improves_perplexity(tmp_path, capsys):
    out = tmp_path / "demo"
    start = time.perf_counter()
    assert main(["finetune", "--model", "tiny", "--output-dir", str(out), "--json"]) == 0
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    assert report["epsilon"] <= report["target_epsilon"] == 3.0
    assert report["delta"] < 1.0 / report["dataset_size"]
    assert report["eval_perplexity"] < report["eval_perplexity_before"]
    assert report["steps"] == report["total_steps"] > 0 and report["noise_multiplier"] > 0
    for name in ("training.png", "private/checkpoint.pt", "config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    printed = json.loads(capsys.readouterr().out)
    assert printed["epsilon"] == pytest.approx(report["epsilon"])
    print(f"tiny demo wall time: {seconds:.1f} s")
