"""``dptrain attack mia|canary`` and ``dptrain audit`` on a tiny saved GPT-2: JSON keys, closed-form
properties (identical member/non-member sets give AUC 0.5; the best-ranked candidate of a fully enumerated
template has exposure log2 |R|), audit golden values, and one-line errors with exit status 2."""

import json
import math

import numpy as np
import pytest
import torch

from dptrain.attacks.metrics import METRIC_KEYS
from dptrain.cli import main
from tests.helpers.cli import fails_with_one_line
from dptrain.cli.attack import demo_canaries, demo_records
from dptrain.finetune.modeling import tiny_gpt2
from dptrain.finetune.tokenizer import byte_tokenizer

DEMO_CONFIG = {"data": None, "eval_data": None, "model": None, "seed": 3, "demo_records": 120,
               "demo_eval_records": 30, "max_length": 64}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 1-layer GPT-2 (n_embd 32) with the demo's byte tokenizer, saved like a demo run of dptrain finetune."""
    folder = tmp_path_factory.mktemp("model")
    tok = byte_tokenizer(model_max_length=64)
    model = tiny_gpt2(len(tok), n_positions=64, n_layer=1, n_embd=32, n_head=2, seed=0,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "report.json").write_text(json.dumps({"config": DEMO_CONFIG}))
    return folder


def run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


# ------------------------------------------------------------------------------------------------------- mia
def test_mia_demo_records_regenerated_and_metrics_valid(model_dir, capsys):
    out = run_json(capsys, "attack", "mia", "--model", str(model_dir))
    assert set(out) == {"loss", "min_k", "zlib"}
    for metrics in out.values():
        assert set(metrics) == set(METRIC_KEYS)
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    members, nonmembers = demo_records(DEMO_CONFIG)
    canary_texts = {c["template"].split("{")[0] for c in demo_canaries(DEMO_CONFIG)}
    assert members and nonmembers and not set(members) & set(nonmembers)
    assert not any(m.startswith(prefix) for m in members for prefix in canary_texts)


def test_mia_identical_sets_give_chance_and_reference_adds_a_score(model_dir, tmp_path, capsys):
    texts = ["Patient seen today, no complaints.", "The weather is calm.", "Plan: continue metformin 500 mg.",
             "Follow-up labs ordered for next month."]
    members = write_jsonl(tmp_path / "m.jsonl", texts)
    (tmp_path / "n.txt").write_text("\n".join(texts) + "\n")
    plot = tmp_path / "roc.png"
    out = run_json(capsys, "attack", "mia", "--model", str(model_dir), "--members", members,
                   "--nonmembers", str(tmp_path / "n.txt"), "--reference-model", str(model_dir), "--plot", str(plot))
    assert set(out) == {"loss", "min_k", "zlib", "reference"}
    for metrics in out.values():  # same records on both sides: every score ties pairwise -> AUC exactly 1/2
        assert metrics["auc"] == pytest.approx(0.5, abs=1e-12)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mia_human_table(model_dir, capsys):
    assert main(["attack", "mia", "--model", str(model_dir)]) == 0
    text = capsys.readouterr().out
    assert "members" in text and "AUC" in text and "min_k" in text


# ---------------------------------------------------------------------------------------------------- canary
def test_canary_demo_json(model_dir, capsys):
    out = run_json(capsys, "attack", "canary", "--model", str(model_dir), "--num-references", "50")
    expected = demo_canaries(DEMO_CONFIG)
    assert [c["repeats"] for c in out["canaries"]] == [c["repeats"] for c in expected] == [1, 1, 1, 4, 4, 16]
    for row in out["canaries"]:
        assert row["max_exposure"] == pytest.approx(math.log2(10**6))
        assert 0.0 <= row["exposure"] <= row["max_exposure"] and row["num_references"] == 50
        assert row["text"].startswith("The secret code of ")
    assert out["mean_exposure"] == pytest.approx(np.mean([r["exposure"] for r in out["canaries"]]))


def _sum_nll(folder, texts):
    """Independent oracle: total NLL of each text by one plain forward pass (texts of equal token length, no
    padding, no attention mask)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tok(t)["input_ids"] for t in texts])  # (N, T)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)  # (N, T-1, V)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(1).numpy()  # (N,)


def test_canary_best_candidate_of_enumerated_space_has_full_exposure(model_dir, tmp_path, capsys):
    template = "Room {d}{d} is free."
    candidates = [template.replace("{d}{d}", f"{i:02d}") for i in range(100)]
    nll = _sum_nll(model_dir, candidates)
    best, worst = int(np.argmin(nll)), int(np.argmax(nll))
    file = tmp_path / "c.jsonl"
    file.write_text(json.dumps({"template": template, "secret": f"{best:02d}"}) + "\n"
                    + json.dumps({"template": template, "secret": f"{worst:02d}"}) + "\n")
    out = run_json(capsys, "attack", "canary", "--model", str(model_dir), "--canaries", str(file),
                   "--num-references", "1000")  # capped at |R| = 100: the whole space
    top, bottom = out["canaries"]
    assert top["num_references"] == 100
    assert top["exposure"] == pytest.approx(math.log2(100))  # rank 1 of 100
    assert top["log_perplexity"] == pytest.approx(nll[best], rel=1e-4)
    assert bottom["exposure"] < 0.05  # last of 100: -log2(99.5 / 100)


# ----------------------------------------------------------------------------------------------------- audit
@pytest.mark.parametrize("m,r,v,eps", [(100, 100, 100, 3.49), (100, 100, 90, 1.63), (1000, 1000, 1000, 5.81)])
def test_audit_calculator_golden(capsys, m, r, v, eps):
    out = run_json(capsys, "audit", "--num-canaries", str(m), "--num-guesses", str(r), "--num-correct", str(v))
    assert out["audit"] == "one-run" and round(out["epsilon"], 2) == eps
    assert main(["audit", "--num-canaries", str(m), "--num-guesses", str(r), "--num-correct", str(v)]) == 0
    assert f"epsilon >= {eps:.2f}" in capsys.readouterr().out


def test_audit_multi_run_scores(tmp_path, capsys):
    rng = np.random.default_rng(0)
    same = tmp_path / "null.json"
    same.write_text(json.dumps({"member": rng.normal(size=500).tolist(), "nonmember": rng.normal(size=500).tolist()}))
    out = run_json(capsys, "audit", "--scores", str(same))
    assert out["audit"] == "multi-run" and out["epsilon"] == 0.0  # null scores never audit above 0
    apart = tmp_path / "apart.json"
    apart.write_text(json.dumps({"member": [10.0] * 500, "nonmember": rng.normal(size=500).tolist()}))
    out = run_json(capsys, "audit", "--scores", str(apart))
    # separated; threshold 10 passes every audited member and no non-member; halves of 250: TPR_lo = 0.025^(1/250), FPR_hi = 1 - 0.025^(1/250) (one-sided CP)
    q = 0.025 ** (1 / 250)
    assert out["epsilon"] == pytest.approx(math.log(q / (1 - q)), rel=1e-6)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_exit_2_with_one_line(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    good = write_jsonl(tmp_path / "good.jsonl", ["hello there"])
    nan = tmp_path / "nan.json"
    nan.write_text('{"member": [1.0, NaN, 2.0], "nonmember": [0.0, 1.0]}')
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    cases = [
        (["attack", "mia", "--model", str(tmp_path / "missing")], "not found"),
        (["attack", "mia", "--model", str(model_dir), "--members", str(empty), "--nonmembers", good], "no records"),
        (["attack", "mia", "--model", str(model_dir), "--members", good], "both"),
        (["attack", "mia", "--model", str(plain)], "not a demo run"),
        (["attack", "canary", "--model", str(model_dir), "--num-references", "0"], "positive integer"),
        (["attack", "canary", "--model", str(model_dir), "--canaries", str(empty)], "no canary"),
        (["attack"], "name an attack"),
        (["audit", "--scores", str(nan)], "finite"),
        (["audit", "--num-canaries", "10", "--num-guesses", "20", "--num-correct", "5"], "num_guesses"),
        (["audit", "--num-canaries", "10", "--num-guesses", "5"], "--num-correct"),
        (["audit", "--scores", str(nan), "--num-canaries", "3"], "not both"),
        (["audit", "--num-canaries", "10", "--num-guesses", "5", "--num-correct", "5", "--confidence", "nan"], "finite"),
    ]
    for argv, fragment in cases:
        assert fragment in fails_with_one_line(capsys, *argv), argv
