"""Attack on `dptrain finetune`'s release: regenerate the noise from everything released and subtract it.

One step of plain SGD (lr known, weight decay 0) with sample rate 1 (every record in the batch, so the true
clipped sum is known to this test's oracle) from a public initial model. The attacker reads the released folder
(report.json with the config and its seeds, the model), rebuilds the update ``B (w0 - w1) / lr`` = clipped sum +
noise, regenerates the noise with ``dptrain.noise.GaussianNoise(seed, rank=0)`` for every seed the release
suggests, subtracts it and compares with the true clipped sum. With OS-entropy noise (the default) nothing
cancels; with ``--insecure-seed`` the same attack recovers the sum (so this test can fail).
"""

import contextlib
import io
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from dptrain.cli import main
from dptrain.finetune.loss import PadCollator, TokenizedTexts, per_sample_lm_loss
from dptrain.noise import GaussianNoise
from tests.finetune.helpers import tiny_model_and_tokenizer, write_jsonl
from tests.helpers.cli import fails_with_one_line

TEXTS = [f"Visit {i}: patient reports mild pain, dose {i % 7} mg." for i in range(16)]
LR, MAX_LENGTH, INSECURE = 1.0, 32, 1234


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    """The public starting point (a saved tiny model) and the private records."""
    root = tmp_path_factory.mktemp("noise-attack")
    model, tok = tiny_model_and_tokenizer(seed=3, max_length=MAX_LENGTH)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root, write_jsonl(root / "notes.jsonl", TEXTS)


def finetune_cli(initial, name, *extra):
    root, data = initial
    out = root / name
    argv = ["finetune", "--model", str(root / "base"), "--data", str(data), "--batch-size", str(len(TEXTS)),
            "--max-steps", "1", "--optimizer", "sgd", "--lr", str(LR), "--max-length", str(MAX_LENGTH), "--no-eval",
            "--seed", "0", "--output-dir", str(out), "--json", *extra]
    assert main(argv) == 0
    return out


def _weights(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    return [(n, p.detach().clone()) for n, p in model.named_parameters()]


def attack(folder, base):
    """What an attacker recovers from the release: the clipped sum for each candidate seed."""
    report = json.loads((folder / "report.json").read_text())
    cfg = report["config"]
    w0, w1 = _weights(base), _weights(folder)
    assert [n for n, _ in w0] == [n for n, _ in w1]
    b = report["expected_batch_size"]
    noisy_sum = [(a - c) / cfg["lr"] * b for (_, a), (_, c) in zip(w0, w1)]  # clipped sum + noise
    std = report["noise_multiplier"] * report["max_grad_norm"] / b  # the optimizer's draw: std on the sum / B
    seeds = {cfg["seed"], cfg["seed"] + 1, 0}  # the public seed and its old derivations
    if cfg.get("insecure_seed") is not None:
        seeds.add(cfg["insecure_seed"])
    recovered = {}
    for seed in sorted(seeds):
        noise = [torch.zeros_like(u) for u in noisy_sum]
        GaussianNoise(seed, rank=0).add_(noise, std)
        recovered[seed] = [u - n * b for u, n in zip(noisy_sum, noise)]
    return recovered, noisy_sum, report


def true_clipped_sum(base, c):
    """Oracle: sum over all records (sample rate 1) of each record's gradient clipped to norm C, one at a time."""
    model = AutoModelForCausalLM.from_pretrained(base)
    tok = tiny_model_and_tokenizer(max_length=MAX_LENGTH)[1]
    data, collate = TokenizedTexts(TEXTS, tok, MAX_LENGTH), PadCollator(tok.pad_token_id)
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(data)):
        batch = collate([data[i]])
        loss = per_sample_lm_loss(model(**batch).logits, batch["input_ids"], batch["attention_mask"])[0]
        grads = torch.autograd.grad(loss, params)
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        factor = min(1.0, c / (norm + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    return total


def relative_error(found, truth):
    err = math.sqrt(sum(float((f.double() - t.double()).pow(2).sum()) for f, t in zip(found, truth)))
    return err / math.sqrt(sum(float(t.double().pow(2).sum()) for t in truth))


@pytest.fixture(scope="module")
def runs(initial):
    """Two runs with the same --seed, two with the same --insecure-seed, and the console output of the first
    insecure one."""
    out = {name: finetune_cli(initial, name) for name in ("private-a", "private-b")}
    out["insecure-a"], out["stderr"] = _with_stderr(lambda: finetune_cli(initial, "insecure-a", "--insecure-seed",
                                                                         str(INSECURE)))
    out["insecure-b"] = finetune_cli(initial, "insecure-b", "--insecure-seed", str(INSECURE))
    return out


def _with_stderr(fn):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        value = fn()
    return value, err.getvalue()


def test_regenerated_noise_recovers_nothing_unless_the_run_used_an_insecure_seed(initial, runs):
    base = initial[0] / "base"
    truth = true_clipped_sum(base, 1.0)

    recovered, noisy, report = attack(runs["private-a"], base)
    assert report["privacy"]["private"] and not report["privacy"]["noise_seed_given"] and "warning" not in report
    assert report["config"]["insecure_seed"] is None and report["noise_multiplier"] > 0.3
    assert relative_error(noisy, truth) >= 0.5  # the noise dominates the released update
    for seed, found in recovered.items():
        assert relative_error(found, truth) >= 0.5, seed  # subtracting the regenerated noise cancels nothing

    recovered, noisy, report = attack(runs["insecure-a"], base)
    assert "NOT PRIVATE" in runs["stderr"]  # the console warning
    assert not report["privacy"]["private"] and report["privacy"]["noise_seed_given"]
    assert "NOT PRIVATE" in report["warning"]
    assert relative_error(noisy, truth) >= 0.5
    assert relative_error(recovered[INSECURE], truth) < 1e-3  # control: the attack works when it can


def test_same_seed_gives_different_weights_same_insecure_seed_identical(runs):
    w = {name: _weights(runs[name]) for name in ("private-a", "private-b", "insecure-a", "insecure-b")}
    assert any(not torch.equal(a, b) for (_, a), (_, b) in zip(w["private-a"], w["private-b"]))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(w["insecure-a"], w["insecure-b"]))


def test_insecure_seed_and_secure_mode_are_refused_together(capsys, tmp_path):
    err = fails_with_one_line(capsys, "finetune", "--insecure-seed", "1", "--secure-mode",
                              "--output-dir", str(tmp_path / "x"))
    assert "--secure-mode" in err and "--insecure-seed 1" in err
    assert not (tmp_path / "x").exists()
