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


def test_lora_trains_only_the_adapters(tmp_path, saved_model):
    out = _run(tmp_path, saved_model, "--lora", "--lora-r", "2", "--optimizer", "sgd", "--lr", "0.5")
    assert (out / "adapter" / "adapter_config.json").is_file()
    before, after = _weights(saved_model), _weights(out)  # out holds the merged model
    assert before.keys() == after.keys()
    untouched = [k for k in before if "c_attn" not in k and "c_proj" not in k]  # targets: c_attn, c_proj
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)  # embeddings, MLP c_fc, norms
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("attn.c_attn.weight"))
