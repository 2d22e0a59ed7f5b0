"""Resume from the SECRET checkpoint in ``output_dir/private/``: stopped after k steps and resumed == uninterrupted
(with the same --insecure-seed, parameters and epsilon); the same checkpoint resumed twice without any insecure
seed gives identical weights (its generator states are the secret that makes the resume exact); secure mode
resumes with fresh entropy; bad checkpoints are refused."""

import shutil

import pytest
import torch

from dptrain.finetune import FinetuneConfig, finetune
from dptrain.finetune.api import CHECKPOINT_FILE
from dptrain.finetune.checkpoint import load_checkpoint
from tests.finetune.helpers import tiny_model_and_tokenizer

TEXTS = [f"Note {i}: patient seen for follow-up, blood pressure {110 + i % 30}/{70 + i % 15}." for i in range(48)]


def _config(out, **kw):
    base = dict(batch_size=8, max_steps=4, max_length=48, lr=3e-3, output_dir=str(out), progress=False,
                checkpoint_every=2, seed=11, physical_batch_size=4)
    base.update(kw)
    return FinetuneConfig(**base)


def _run(cfg):
    model, tok = tiny_model_and_tokenizer(seed=5)
    return finetune(cfg, model=model, tokenizer=tok, train_texts=TEXTS, eval_texts=TEXTS[:6])


def _params(result):
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module", params=[False, True], ids=["full", "lora"])
def lora_and_uninterrupted(request, tmp_path_factory):
    cfg = _config(tmp_path_factory.mktemp("full"), lora=request.param, lora_r=2, insecure_seed=3)
    return request.param, _run(cfg)


def test_stopped_and_resumed_equals_uninterrupted(tmp_path, lora_and_uninterrupted):
    lora, uninterrupted = lora_and_uninterrupted
    stopped = _run(_config(tmp_path, stop_after=2, lora=lora, lora_r=2, insecure_seed=3))
    assert not stopped.finished and stopped.steps == 2 and (tmp_path / CHECKPOINT_FILE).is_file()
    assert not (tmp_path / "checkpoint.pt").exists()  # never in the released folder
    resumed = _run(_config(tmp_path, resume=True, lora=lora, lora_r=2, insecure_seed=3))
    assert resumed.finished and resumed.steps == uninterrupted.steps == 4
    assert abs(resumed.epsilon - uninterrupted.epsilon) <= 1e-6
    a, b = _params(uninterrupted), _params(resumed)
    assert _max_diff(a, b) <= 1e-6
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    # and the run really moved the weights (the equality above is not trivial)
    fresh = tiny_model_and_tokenizer(seed=5)[0].state_dict()  # LoRA runs hold the merged model
    assert _max_diff(a, fresh) > 1e-4


def test_same_checkpoint_resumed_twice_is_identical_without_insecure_seed(tmp_path):
    """OS-entropy noise: the saved generator states alone make the two continuations bit-identical, while
    two fresh runs with the same --seed differ (the noise does not come from the seed)."""
    first = tmp_path / "a"
    stopped = _run(_config(first, stop_after=2))
    assert not stopped.finished and stopped.privacy["private"] and not stopped.privacy["noise_seed_given"]
    second = tmp_path / "b"
    shutil.copytree(first, second)
    a = _params(_run(_config(first, resume=True)))
    b = _params(_run(_config(second, resume=True)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = _params(_run(_config(tmp_path / "c")))  # same --seed, fresh entropy
    assert _max_diff(a, other) > 1e-4


def test_secure_mode_checkpoint_has_no_generator_state_and_resumes(tmp_path):
    stopped = _run(_config(tmp_path, stop_after=2, secure_mode=True))
    assert stopped.privacy["secure_mode"] and stopped.steps == 2
    engine = load_checkpoint(tmp_path / CHECKPOINT_FILE)["engine"]
    assert engine["noise"]["generators"] == {} and set(engine["sampler"]) == {"drawn"}
    resumed = _run(_config(tmp_path, resume=True, secure_mode=True))
    assert resumed.finished and resumed.steps == 4 and [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="secure_mode"):
        _run(_config(tmp_path, resume=True))  # a secure run is continued in secure mode only


def test_mismatched_or_corrupted_checkpoint_is_refused(tmp_path):
    _run(_config(tmp_path, stop_after=2))
    with pytest.raises(ValueError, match="different run.*lr"):
        _run(_config(tmp_path, resume=True, lr=1e-2))
    other_data = TEXTS[::-1]
    model, tok = tiny_model_and_tokenizer(seed=5)
    with pytest.raises(ValueError, match="data_sha256"):
        finetune(_config(tmp_path, resume=True), model=model, tokenizer=tok, train_texts=other_data)
    path = tmp_path / CHECKPOINT_FILE
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted"):
        _run(_config(tmp_path, resume=True))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a dptrain finetune checkpoint"):
        _run(_config(tmp_path, resume=True))


def test_checkpoint_in_the_old_released_location_is_not_read(tmp_path):
    _run(_config(tmp_path, stop_after=2))
    (tmp_path / CHECKPOINT_FILE).rename(tmp_path / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match="SECRET in the released folder: move it to"):
        _run(_config(tmp_path, resume=True))
