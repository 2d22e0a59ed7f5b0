"""``dptrain finetune --audit-canaries`` + ``dptrain audit --model D`` on a tiny run (a few steps, 24 canaries).

Checked against independent oracles: the canaries and coins rebuilt from the secret seed kept in
``private/audit_secret.json``, the training set size, the number of correct guesses recounted from a plain
transformers forward pass, and the audited epsilon recomputed from the counts; a stopped and resumed run rebuilds
the same canaries from the secret file (else its data fingerprint is refused); bad folders and options exit 2
with one line.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from dptrain.attacks import one_run_audit_epsilon
from dptrain.cli import main
from tests.helpers.cli import fails_with_one_line
from dptrain.cli.audit import guess_grid
from dptrain.finetune import FinetuneConfig, finetune
from dptrain.finetune.data import audit_canaries, with_audit_canaries
from dptrain.finetune.api import AUDIT_SECRET_FILE
from tests.finetune.helpers import tiny_model_and_tokenizer

TEXTS = [f"Note {i}: patient seen for follow-up, blood pressure {110 + i % 30}/{70 + i % 15}." for i in range(40)]
M, SEED = 24, 7


def _config(out, **kw):
    base = dict(batch_size=8, max_steps=3, max_length=48, lr=3e-3, output_dir=str(out), progress=False,
                checkpoint_every=1, seed=SEED, audit_canaries=M)
    base.update(kw)
    return FinetuneConfig(**base)


def _run(cfg):
    model, tok = tiny_model_and_tokenizer(seed=1)
    return finetune(cfg, model=model, tokenizer=tok, train_texts=TEXTS, eval_texts=TEXTS[:4])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run stopped after 2 of 3 steps and resumed: resuming rebuilds the canaries from the audit secret, and
    the checkpoint's data fingerprint (a hash of every training record) refuses the resume if they differ."""
    out = tmp_path_factory.mktemp("run")
    stopped = _run(_config(out, stop_after=2))
    assert not stopped.finished
    resumed = _run(_config(out, resume=True))
    assert resumed.finished and resumed.steps == 3
    return out


def secret_of(folder):
    return json.loads((folder / AUDIT_SECRET_FILE).read_text())


def audit_json(capsys, *argv):
    assert main(["audit", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _oracle_scores(folder, texts, max_length):
    """-mean token NLL of each canary by one plain forward pass per text (no padding, no batching)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    out = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"][:max_length]])  # (1, T)
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)  # (T-1, V)
            out.append(float(logp.gather(-1, ids[0, 1:, None]).mean()))
    return np.array(out)


# ------------------------------------------------------------------------------------------- the canaries
def test_canaries_are_seeded_coins_are_a_separate_stream_and_only_included_ones_are_trained_on():
    a, b = audit_canaries(M, seed=SEED), audit_canaries(M, seed=SEED)
    assert a == b and len(set(a.texts)) == M  # reproducible (resume), distinct
    other = audit_canaries(M, seed=SEED + 1)
    assert not set(a.texts) & set(other.texts)
    # the coins come from their own stream, not from the one that draws the texts: a larger draw starts
    # with the same coins
    assert audit_canaries(2 * M, seed=SEED).included[:M] == a.included
    many = audit_canaries(4000, seed=0).included
    assert abs(np.mean(many) - 0.5) < 4 * 0.5 / np.sqrt(4000)  # fair coins, 4 sigma
    mixed = with_audit_canaries(TEXTS, a)
    assert sorted(mixed) == sorted(TEXTS + a.included_texts)  # each included canary once, nothing else
    assert not set(mixed) & {t for t, keep in zip(a.texts, a.included) if not keep}


def test_secret_file_holds_the_auditors_secret_and_training_saw_the_included_canaries(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    secret = secret_of(run_dir)
    expected = audit_canaries(M, seed=secret["seed"])
    assert secret["seed"] != SEED and secret["canaries"] != audit_canaries(M, seed=SEED).texts  # secret entropy
    assert secret["canaries"] == expected.texts
    assert secret["inclusion_mask"] == [int(b) for b in expected.included]
    assert secret["num_included"] == sum(expected.included) and secret["num_canaries"] == M
    assert "AUDITOR'S SECRET" in secret["note"]
    assert report["dataset_size"] == len(TEXTS) + sum(expected.included)  # add-one adjacency, not replacement


# ---------------------------------------------------------------------------------------------- the audit
def test_audit_model_json_against_oracle_counts(run_dir, capsys):
    out = audit_json(capsys, "--model", str(run_dir), "--guesses", "5")
    report = json.loads((run_dir / "report.json").read_text())
    mask = np.array(secret_of(run_dir)["inclusion_mask"], dtype=bool)
    scores = _oracle_scores(run_dir, secret_of(run_dir)["canaries"], 48)
    order = np.argsort(scores)  # ascending; ties between distinct random canaries have probability ~0
    correct = int(mask[order[-5:]].sum() + (~mask[order[:5]]).sum())
    assert out["num_guesses_pos"] == out["num_guesses_neg"] == 5 and out["num_guesses"] == 10
    assert out["num_correct"] == correct
    assert out["num_canaries"] == M and out["num_included"] == int(mask.sum())
    assert out["delta"] == out["run_delta"] == pytest.approx(report["delta"])
    assert out["run_epsilon"] == pytest.approx(report["epsilon"])
    assert out["epsilon"] == pytest.approx(one_run_audit_epsilon(num_canaries=M, num_guesses=10, num_correct=correct,
                                                                 delta=report["delta"]), abs=1e-12)
    assert out["consistent"] == (out["epsilon"] <= out["run_epsilon"])
    assert out["audit"] == "one-run-model" and out["score"] == "loss" and out["guess_grid"] == [[5, 5]]


def test_audit_model_default_grid_is_fixed_and_bonferroni_corrected(run_dir, capsys):
    out = audit_json(capsys, "--model", str(run_dir), "--delta", "0")
    grid = [[1, 0], [3, 0], [6, 0], [12, 0], [1, 1], [3, 3], [6, 6]]  # r = 24/32 -> 1, 1, 3, 6, 12: top r, r/2 + r/2
    assert out["guess_grid"] == [list(g) for g in guess_grid(M)] == grid
    assert out["delta"] == 0.0
    # the reported bound is at the corrected level: never above the uncorrected audit of the chosen pair
    plain = one_run_audit_epsilon(num_canaries=M, num_guesses=out["num_guesses"], num_correct=out["num_correct"])
    corrected = one_run_audit_epsilon(num_canaries=M, num_guesses=out["num_guesses"], num_correct=out["num_correct"],
                                      confidence=1 - 0.05 / len(grid))
    assert out["epsilon"] == pytest.approx(corrected, abs=1e-12) and corrected <= plain
    assert main(["audit", "--model", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "audited epsilon >=" in text and "run's epsilon" in text and "AUDITOR'S SECRET" in text


# --------------------------------------------------------------------------------------------- bad inputs
def test_bad_folders_and_options_exit_2_with_one_line(run_dir, tmp_path, capsys):
    def variant(name, edit=None, drop=(), file="report.json"):
        folder = tmp_path / name
        shutil.copytree(run_dir, folder)
        for f in drop:
            (folder / f).unlink()
        if edit is not None:
            report = json.loads((folder / file).read_text())
            edit(report)
            (folder / file).write_text(json.dumps(report))
        return str(folder)

    no_report = variant("no_report", drop=["report.json"])
    no_canaries = variant("no_canaries", drop=[AUDIT_SECRET_FILE])
    unfinished = variant("unfinished", edit=lambda r: r.update(finished=False, steps=2))
    short_mask = variant("short_mask", edit=lambda r: r["inclusion_mask"].pop(), file=AUDIT_SECRET_FILE)
    no_model = variant("no_model", drop=["config.json"])
    bad_json = variant("bad_json")
    (tmp_path / "bad_json" / "report.json").write_text("{not json")
    cases = [
        (["audit", "--model", str(tmp_path / "missing")], "not found"),
        (["audit", "--model", no_report], "no report.json"),
        (["audit", "--model", no_canaries], "private/audit_secret.json not found"),
        (["audit", "--model", unfinished], "stopped at step 2"),
        (["audit", "--model", short_mask], "inclusion_mask"),
        (["audit", "--model", no_model], "no config.json"),
        (["audit", "--model", bad_json], "not valid JSON"),
        (["audit", "--model", str(run_dir), "--guesses", "13"], "2K <= the run's 24"),
        (["audit", "--model", str(run_dir), "--guesses", "0"], "positive integer"),
        (["audit", "--model", str(run_dir), "--score", "reference"], "--score loss"),  # custom model: no base
        (["audit", "--model", str(run_dir), "--num-canaries", "10"], "--model alone"),
        (["audit", "--guesses", "3", "--num-canaries", "10", "--num-guesses", "5", "--num-correct", "5"], "--model"),
        (["finetune", "--audit-canaries", "-1", "--output-dir", str(tmp_path / "x")], "audit-canaries"),
    ]
    for argv, fragment in cases:
        assert fragment in fails_with_one_line(capsys, *argv), argv
    with pytest.raises(TypeError, match="audit-canaries must be an integer"):
        FinetuneConfig(audit_canaries=True).validate()


def test_reference_score_rebuilds_the_demo_base_model(tmp_path):
    """--score reference on a demo run: the rebuilt base is the run's starting point (oracle: its held-out
    perplexity equals the report's eval_perplexity_before), and the score is base NLL - fine-tuned NLL."""
    from dptrain.cli.audit import _reference_model, canary_scores
    from dptrain.finetune.data import synthetic_private_records
    from dptrain.finetune.loss import PadCollator, TokenizedTexts, perplexity

    out = tmp_path / "demo"
    cfg = FinetuneConfig(demo_records=48, demo_eval_records=8, pretrain_steps=2, batch_size=8, max_steps=1,
                         max_length=48, output_dir=str(out), progress=False, seed=3, audit_canaries=8)
    finetune(cfg)
    report = json.loads((out / "report.json").read_text())
    from dptrain.cli.attack import load_model

    tuned, tok = load_model(str(out))
    base = _reference_model(report["config"], tuned, out)
    held = synthetic_private_records(8, seed=4, canary_repeats=()).records
    ppl = perplexity(base, TokenizedTexts(held, tok, 48), PadCollator(tok.pad_token_id))
    assert ppl == pytest.approx(report["eval_perplexity_before"], rel=1e-5)
    texts = secret_of(out)["canaries"]
    ref = canary_scores(out, report["config"], texts, score="reference", batch_size=4)
    loss = canary_scores(out, report["config"], texts, score="loss", batch_size=4)
    oracle_base = _oracle_scores_of(base, tok, texts)  # -NLL under the base model
    np.testing.assert_allclose(ref, loss - oracle_base, atol=2e-6)  # float32 logits in the library


def _oracle_scores_of(model, tok, texts):
    out = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])  # (1, T)
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)  # (T-1, V)
            out.append(float(logp.gather(-1, ids[0, 1:, None]).mean()))
    return np.array(out)


def test_a_leaking_pipeline_is_flagged(run_dir, tmp_path, capsys):
    """A forged run whose 'trained on' canaries are exactly the top-scoring half and whose report claims
    epsilon 0.01: the audit (12 + 12 right at most, 7-point Bonferroni) must exceed it and say so."""
    folder = tmp_path / "forged"
    shutil.copytree(run_dir, folder)
    report, secret = json.loads((folder / "report.json").read_text()), secret_of(folder)
    scores = _oracle_scores(folder, secret["canaries"], 48)
    secret["inclusion_mask"] = [int(s > np.median(scores)) for s in scores]
    (folder / AUDIT_SECRET_FILE).write_text(json.dumps(secret))
    report.update(epsilon=0.01, delta=1e-6)
    (folder / "report.json").write_text(json.dumps(report))
    out = audit_json(capsys, "--model", str(folder))
    assert out["num_correct"] == out["num_guesses"] and out["epsilon"] > 0.01 and not out["consistent"]
    assert main(["audit", "--model", str(folder)]) == 0
    assert "AUDIT EXCEEDS THE RUN'S EPSILON" in capsys.readouterr().out
