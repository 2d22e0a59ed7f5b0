"""A run on your own data: the held-out split's members and non-members go to the SECRET private/ folder (so that
`dptrain attack mia --model` works on it) and never into the release; the DP training loss is exactly the clipped
loss sum plus the noise its mechanism claims, at no cost in epsilon; one default delta everywhere."""

import json
import math
import stat

import pytest

from dptrain.cli import main
from dptrain.finetune import FinetuneConfig, default_delta, finetune
from dptrain.loss_release import LOSS_BOUND, LOSS_RELEASE_FACTOR
from dptrain.noise import GaussianNoise
from tests.finetune.helpers import tiny_model_and_tokenizer, write_jsonl

TEXTS = [f"Visit {i}: patient {i % 13} reports mild pain, dose {i % 7} mg." for i in range(120)]


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    model, tok = tiny_model_and_tokenizer(seed=3, max_length=48)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    (root / "notes.csv").write_text("id,note\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(TEXTS)))
    out = root / "run"
    assert main(["finetune", "--model", str(root / "base"), "--data", str(root / "notes.csv"), "--text-column", "note",
                 "--batch-size", "12", "--max-steps", "3", "--max-length", "48", "--output-dir", str(out),
                 "--json"]) == 0
    return out


def test_members_and_non_members_are_secret_files_and_attack_mia_uses_them(own_run, capsys):
    report_text = (own_run / "report.json").read_text()
    report = json.loads(report_text)
    assert report["dataset_size"] == 108 and report["secret_files"] == [
        "private/checkpoint.pt", "private/members.jsonl", "private/nonmembers.jsonl"]
    members = [json.loads(line)["text"] for line in (own_run / "private/members.jsonl").read_text().splitlines()]
    held = [json.loads(line)["text"] for line in (own_run / "private/nonmembers.jsonl").read_text().splitlines()]
    assert len(members) == 108 and len(held) == 12 and sorted(members + held) == sorted(TEXTS)
    for name in ("members.jsonl", "nonmembers.jsonl"):
        assert stat.S_IMODE((own_run / "private" / name).stat().st_mode) == 0o600
    assert not any(t in report_text for t in held)  # which records were held out is not released
    capsys.readouterr()
    assert main(["attack", "mia", "--model", str(own_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"loss", "zlib", "min_k"} and 0 <= result["loss"]["auc"] <= 1


def test_dp_train_loss_is_the_clipped_sum_plus_the_claimed_noise_and_costs_no_epsilon(tmp_path):
    """With an insecure seed the release noise can be regenerated: released * B - true clipped sum == that noise.
    The same run without the release has the same epsilon and a gradient multiplier lower by sqrt(15/16)."""
    def run(**kw):
        model, tok = tiny_model_and_tokenizer(seed=5, max_length=48)
        cfg = FinetuneConfig(batch_size=8, max_steps=3, max_length=48, progress=False, insecure_seed=7,
                             debug_train_loss=True, **kw)
        return finetune(cfg, model=model, tokenizer=tok, train_texts=TEXTS[:48])

    with_loss, without = run(), run(dp_train_loss=False)
    z = without.noise_multiplier  # the calibrated multiplier
    assert with_loss.noise_multiplier == pytest.approx(z / math.sqrt(1 - LOSS_RELEASE_FACTOR**-2), rel=1e-12)
    assert with_loss.step_noise_multiplier == pytest.approx(z, rel=1e-12)
    assert with_loss.epsilon == pytest.approx(without.epsilon, rel=1e-9) and with_loss.epsilon <= 3.0 + 1e-9
    noise = GaussianNoise(7, rank=0)  # the optimizer's noise source with this seed: its "release" stream
    for h in with_loss.history:
        assert h["train_loss"] < LOSS_BOUND  # so clipping to [0, 10] changed nothing: the sum is loss * rows
        drawn = float(noise.sample(1, LOSS_RELEASE_FACTOR * z * LOSS_BOUND)[0])
        assert h["dp_train_loss"] * 8 - h["train_loss"] * h["batch_size"] == pytest.approx(drawn, abs=1e-6)
    assert all("dp_train_loss" not in h for h in without.history)
    assert "dp_train_loss" in with_loss.privacy["dp"][1] and len(without.privacy["dp"]) == 1


def test_budget_finetune_and_dptrainer_share_the_default_delta(tmp_path, capsys):
    from transformers import TrainingArguments

    from dptrain.finetune.loss import TokenizedTexts
    from dptrain.integrations.hf import DPTrainer

    n = len(TEXTS)
    model, tok = tiny_model_and_tokenizer(seed=5, max_length=48)
    result = finetune(FinetuneConfig(batch_size=12, max_steps=4, max_length=48, progress=False, evaluate=False),
                      model=model, tokenizer=tok, train_texts=TEXTS)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = DPTrainer(model=model, args=args, train_dataset=TokenizedTexts(TEXTS, tok, 48), noise_multiplier=1.0)
    assert result.delta == trainer.target_delta == default_delta(n) == min(1e-5, n**-1.1)
    capsys.readouterr()
    assert main(["budget", "--dataset-size", str(n), "--batch-size", "12", "--steps", "4", "--noise-multiplier",
                 repr(result.step_noise_multiplier), "--json"]) == 0
    budget = json.loads(capsys.readouterr().out)
    assert budget["delta"] == result.delta and budget["epsilon"] == pytest.approx(result.epsilon, rel=1e-6)
    assert "min(1e-5, 1/N^1.1)" in budget["delta_rule"]
