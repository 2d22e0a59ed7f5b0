"""Resume: stopped after k steps and resumed == uninterrupted (parameters and epsilon); bad checkpoints refused."""

import pytest
import torch

from dptrain.finetune import FinetuneConfig, finetune
from dptrain.finetune.api import CHECKPOINT_NAME
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


@pytest.fixture(scope="module", params=[False, True], ids=["full", "lora"])
def lora_and_uninterrupted(request, tmp_path_factory):
    return request.param, _run(_config(tmp_path_factory.mktemp("full"), lora=request.param, lora_r=2))


def test_stopped_and_resumed_equals_uninterrupted(tmp_path, lora_and_uninterrupted):
    lora, uninterrupted = lora_and_uninterrupted
    stopped = _run(_config(tmp_path, stop_after=2, lora=lora, lora_r=2))
    assert not stopped.finished and stopped.steps == 2 and (tmp_path / CHECKPOINT_NAME).is_file()
    resumed = _run(_config(tmp_path, resume=True, lora=lora, lora_r=2))
    assert resumed.finished and resumed.steps == uninterrupted.steps == 4
    assert abs(resumed.epsilon - uninterrupted.epsilon) <= 1e-6
    a, b = _params(uninterrupted), _params(resumed)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    # and the run really moved the weights (the equality above is not trivial)
    fresh = tiny_model_and_tokenizer(seed=5)[0].state_dict()  # LoRA runs hold the merged model
    assert max(float((a[k] - fresh[k]).abs().max()) for k in a) > 1e-4


def test_mismatched_or_corrupted_checkpoint_is_refused(tmp_path):
    _run(_config(tmp_path, stop_after=2))
    with pytest.raises(ValueError, match="different run.*lr"):
        _run(_config(tmp_path, resume=True, lr=1e-2))
    other_data = TEXTS[::-1]
    model, tok = tiny_model_and_tokenizer(seed=5)
    with pytest.raises(ValueError, match="data_sha256"):
        finetune(_config(tmp_path, resume=True), model=model, tokenizer=tok, train_texts=other_data)
    path = tmp_path / CHECKPOINT_NAME
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted"):
        _run(_config(tmp_path, resume=True))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a dptrain finetune checkpoint"):
        _run(_config(tmp_path, resume=True))
