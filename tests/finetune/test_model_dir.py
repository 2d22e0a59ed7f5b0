"""`--model <dir>`: a tiny model saved with save_pretrained is fine-tuned through the CLI, full and LoRA."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dptrain.cli import main
from tests.finetune.helpers import tiny_model_and_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    model, tok = tiny_model_and_tokenizer(seed=3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _run(tmp_path, saved_model, *extra):
    data = write_jsonl(tmp_path / "notes.jsonl", [f"Visit {i}: patient reports mild pain, dose {i % 7} mg." for i in range(40)])
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(saved_model), "--data", str(data), "--batch-size", "8", "--max-steps", "3",
            "--max-length", "48", "--output-dir", str(out), "--json", *extra]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 3 and report["epsilon"] <= report["target_epsilon"] + 1e-9
    assert report["noise_multiplier"] > 0 and report["dataset_size"] == 40
    assert (out / "private" / "checkpoint.pt").is_file() and (out / "training.png").stat().st_size > 0
    assert not (out / "checkpoint.pt").exists() and report["secret_files"] == ["private/checkpoint.pt"]
    return out


def _weights(folder):
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def test_full_finetuning_from_a_saved_folder(tmp_path, saved_model, capsys):
    out = _run(tmp_path, saved_model)
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 3
    before, after = _weights(saved_model), _weights(out)
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("c_attn.weight"))


def test_lora_trains_only_the_adapters(tmp_path, saved_model, capsys):
    out = _run(tmp_path, saved_model, "--lora", "--lora-r", "2", "--optimizer", "sgd", "--lr", "0.5")
    assert (out / "adapter" / "adapter_config.json").is_file()
    printed = json.loads(capsys.readouterr().out)  # the file lists name what is there, adapter/ included
    assert {"adapter/", "model.safetensors", "report.json"} <= set(printed["released_files"])
    assert printed["secret_files"] == ["private/checkpoint.pt"] and "private/" not in printed["released_files"]
    before, after = _weights(saved_model), _weights(out)  # out holds the merged model
    assert before.keys() == after.keys()
    untouched = [k for k in before if "c_attn" not in k and "c_proj" not in k]  # targets: c_attn, c_proj
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)  # embeddings, MLP c_fc, norms
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("attn.c_attn.weight"))


def test_hub_names_without_network_fail_at_once_or_use_the_cache(monkeypatch):
    """One quick request decides: an unreachable hub gives a one-line error naming the way out, unless the model is
    in the local cache (then it loads from there, no retries); HF_HUB_OFFLINE skips the request."""
    import huggingface_hub
    from huggingface_hub import constants

    from dptrain.finetune.modeling import _resolve_model_source

    class NoNetwork:
        def head(self, url, timeout):
            raise ConnectionError(f"cannot reach {url}")

    monkeypatch.setattr(huggingface_hub, "get_session", lambda: NoNetwork())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cache = {}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda name, file: cache.get(name))
    with pytest.raises(FileNotFoundError, match=r"cannot load model 'org/model': no such local folder, and .* is "
                                                r"unreachable \(ConnectionError: cannot reach .*HF_HUB_OFFLINE=1"):
        _resolve_model_source("org/model")
    cache["org/model"] = "/cache/org/model/config.json"
    assert _resolve_model_source("org/model") is True  # local files only
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert _resolve_model_source("org/model") is True
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        _resolve_model_source("org/other")
