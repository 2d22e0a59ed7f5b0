"""``dptrain budget``: JSON keys, human output, one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest

from dptrain.accountants import calibrate_noise, compute_epsilon
from dptrain.cli import main

KEYS = {"epsilon", "noise_multiplier", "steps", "delta", "accountant", "optimal_order"}


def run_json(capsys, *argv):
    assert main(["budget", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_epsilon_mode_json_matches_the_api(capsys):
    out = run_json(capsys, "--sample-rate", "0.01", "--steps", "1000", "--noise-multiplier", "1.1")
    assert KEYS <= set(out) and out["accountant"] == "rdp" and out["delta"] == 1e-5
    assert out["epsilon"] == pytest.approx(
        compute_epsilon(sample_rate=0.01, noise_multiplier=1.1, steps=1000, delta=1e-5), rel=1e-12)
    assert out["optimal_order"] > 1


def test_all_accountants_and_dataset_size_delta_rule(capsys):
    out = run_json(capsys, "--dataset-size", "50000", "--batch-size", "500", "--epochs", "2",
                   "--noise-multiplier", "1.0", "--accountant", "all")
    assert set(out) == {"rdp", "pld"}
    for name, entry in out.items():
        assert KEYS <= set(entry) and entry["accountant"] == name
        assert entry["steps"] == 200  # 2 epochs x ceil(50000 / 500)
        assert entry["delta"] == pytest.approx(min(1e-5, 50000 ** -1.1))
    assert out["pld"]["optimal_order"] is None
    assert out["pld"]["epsilon"] < out["rdp"]["epsilon"]


def test_noise_mode_and_steps_mode(capsys):
    out = run_json(capsys, "--sample-rate", "0.001", "--steps", "10000", "--target-epsilon", "8", "--delta", "1e-6")
    assert out["noise_multiplier"] == pytest.approx(
        calibrate_noise(target_epsilon=8, sample_rate=0.001, steps=10000, delta=1e-6), rel=1e-12)
    assert out["epsilon"] <= 8
    out = run_json(capsys, "--sample-rate", "0.01", "--noise-multiplier", "1.0", "--target-epsilon", "3")
    assert out["epsilon"] <= 3 and out["steps"] > 0 and out["epochs"] == pytest.approx(out["steps"] / 100)


def test_human_output_is_a_short_statement(capsys):
    assert main(["budget", "--sample-rate", "0.01", "--steps", "100", "--noise-multiplier", "1.0"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("RDP: epsilon = ") and "delta = 1e-05" in text and len(text.splitlines()) == 1


def test_sigma_zero_reports_no_privacy(capsys):
    out = run_json(capsys, "--sample-rate", "0.1", "--steps", "3", "--noise-multiplier", "0")
    assert out["epsilon"] is None  # inf: JSON has no infinity


@pytest.mark.parametrize(
    "argv",
    [
        ["--sample-rate", "1.5", "--steps", "10", "--noise-multiplier", "1"],
        ["--sample-rate", "0.1", "--steps", "10", "--noise-multiplier", "-1"],
        ["--sample-rate", "0.1", "--steps", "10", "--noise-multiplier", "1", "--delta", "2"],
        ["--sample-rate", "0.1", "--steps", "-5", "--noise-multiplier", "1"],
        ["--sample-rate", "0.1", "--steps", "2.5", "--noise-multiplier", "1"],
        ["--sample-rate", "0.1", "--steps", "10", "--target-epsilon", "1e-9"],
        ["--sample-rate", "0.1", "--steps", "10"],
        ["--sample-rate", "0.1", "--noise-multiplier", "1"],
        ["--dataset-size", "100", "--steps", "10", "--noise-multiplier", "1"],
        ["--sample-rate", "abc", "--steps", "10", "--noise-multiplier", "1"],
        ["--steps", "10", "--noise-multiplier", "1", "--accountant", "prv"],
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv):
    try:
        code = main(["budget", *argv])
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err


def test_help_has_examples_and_the_step_convention(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["budget", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "ceil(dataset_size / batch_size)" in text


def test_subprocess_bad_input_has_no_traceback():
    bad = subprocess.run([sys.executable, "-m", "dptrain", "budget", "--sample-rate", "0", "--steps", "1",
                          "--noise-multiplier", "1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "--sample-rate must be in (0, 1], found 0.0" in bad.stderr
