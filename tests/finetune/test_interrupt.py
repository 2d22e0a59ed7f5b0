"""Ctrl-C during training: the run stops at the end of the step, writes the SECRET checkpoint (even before the first
periodic one) and says so; the same command plus --resume then continues exactly. A second Ctrl-C quits at once;
one before training starts says that nothing can be resumed."""

import json
import os
import signal

import pytest
import torch

import dptrain.finetune.trainer as trainer_module
from dptrain.cli import main
from dptrain.finetune import FinetuneConfig, TrainingInterrupted, finetune, load_checkpoint
from dptrain.finetune.api import CHECKPOINT_FILE
from tests.finetune.helpers import tiny_model_and_tokenizer, write_jsonl

TEXTS = [f"Note {i}: patient seen for follow-up, blood pressure {110 + i % 30}/{70 + i % 15}." for i in range(48)]


@pytest.fixture(autouse=True)
def ctrl_c_handled():
    """Python's own SIGINT handler, as in a terminal (a shell starts background jobs with SIGINT ignored, and then
    dptrain leaves it ignored too)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def ctrl_c_at(monkeypatch, calls, times=1):
    """SIGINT to this process (``times`` in a row) during the ``calls``-th per-sample loss (a forward pass)."""
    real, count = trainer_module.per_sample_lm_loss, [0]

    def loss(*args):
        count[0] += 1
        if count[0] == calls:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(trainer_module, "per_sample_lm_loss", loss)


def _config(out, **kw):
    return FinetuneConfig(**{**dict(batch_size=8, max_steps=6, max_length=48, output_dir=str(out), progress=False,
                                    seed=11, physical_batch_size=4, insecure_seed=3), **kw})


def _run(cfg):
    model, tok = tiny_model_and_tokenizer(seed=5)
    return finetune(cfg, model=model, tokenizer=tok, train_texts=TEXTS, eval_texts=TEXTS[:6])


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(tmp_path, monkeypatch):
    uninterrupted = _run(_config(tmp_path / "full"))
    ctrl_c_at(monkeypatch, calls=5)
    with pytest.raises(TrainingInterrupted) as info:
        _run(_config(tmp_path / "run"))  # checkpoint_every is 25: no periodic checkpoint before step 6
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)
    assert 1 <= state["step"] < 6 and f"after step {state['step']}/6" in str(info.value)
    assert "checkpoint saved to" in str(info.value) and "--resume" in str(info.value)
    monkeypatch.undo()
    resumed = _run(_config(tmp_path / "run", resume=True))
    assert resumed.finished and [h["step"] for h in resumed.history] == list(range(1, 7))
    assert abs(resumed.epsilon - uninterrupted.epsilon) < 1e-9
    a, b = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_cli_says_where_the_checkpoint_is_and_resume_finishes(tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "notes.jsonl", TEXTS)
    model, tok = tiny_model_and_tokenizer(seed=5)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    argv = ["finetune", "--model", str(tmp_path / "base"), "--data", str(data), "--batch-size", "8", "--max-steps",
            "5", "--max-length", "48", "--output-dir", str(tmp_path / "out"), "--json"]
    ctrl_c_at(monkeypatch, calls=2)
    assert main(argv) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("dptrain finetune: interrupted after step ") and "/5: checkpoint saved to " in last
    assert last.endswith("continue with the same command plus --resume") and "Traceback" not in last
    monkeypatch.undo()
    assert main(argv + ["--resume"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["steps"] == 5 and report["history"][-1]["step"] == 5


def test_second_ctrl_c_quits_at_once_without_saving(tmp_path, monkeypatch):
    ctrl_c_at(monkeypatch, calls=3, times=2)
    with pytest.raises(TrainingInterrupted, match="interrupted again: quit without saving"):
        _run(_config(tmp_path))
    assert not (tmp_path / CHECKPOINT_FILE).exists()


def test_ctrl_c_before_training_says_nothing_can_be_resumed(tmp_path, monkeypatch, capsys):
    import dptrain.finetune.demo as demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "pretrain_public", interrupted)
    assert main(["finetune", "--model", "tiny", "--output-dir", str(tmp_path / "out"), "--json"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("dptrain finetune: interrupted before DP training started: nothing to resume; run the command "
                   "again (with --overwrite if the output folder was created)")


def test_torch_load_alone_refuses_the_checkpoint_and_load_checkpoint_opens_it(tmp_path):
    _run(_config(tmp_path, stop_after=1))
    path = tmp_path / CHECKPOINT_FILE
    with pytest.raises(Exception):
        torch.load(path, weights_only=False)
    state = load_checkpoint(path)
    assert state["step"] == 1 and "engine" in state and state["fingerprint"]["delta"] == pytest.approx(1e-5)
