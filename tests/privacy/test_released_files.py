"""What `dptrain finetune` releases holds no secret: no generator state anywhere outside ``private/``, no audit
secret (nor anything that determines it) in report.json; the secrets sit in ``private/`` (folder 0700, files
0600), and ``--resume`` continues from ``private/checkpoint.pt`` (and the audit secret beside it).

The scanner is shown to work on the checkpoint itself, where the generator states are (so the scan can fail).
"""

import json
import re
import shutil
import stat

import pytest
import torch

from dptrain.cli import main
from dptrain.finetune import FinetuneConfig, finetune
from dptrain.finetune.api import AUDIT_SECRET_FILE, CHECKPOINT_FILE
from dptrain.finetune.checkpoint import load_checkpoint
from dptrain.finetune.data import audit_canaries
from tests.finetune.helpers import tiny_model_and_tokenizer, write_jsonl

TEXTS = [f"Visit {i}: patient reports mild pain, dose {i % 7} mg." for i in range(24)]
M, SEED = 16, 4
SECRET_KEY = re.compile(r"generator|rng|random_state|(noise|sampler).*state|^(noise|sampler)$", re.IGNORECASE)
MT19937_STATE_BYTES = 5056  # torch CPU generator state: a uint8 tensor of this size
AES_KEY_BYTES = 32  # the CPU noise's keystream key: a uint8 tensor of this size


def secrets_in(obj, path=""):
    """``(kind, path)`` of everything in a loaded file that looks like generator state: a CPU generator state
    tensor, a noise key, a key named like one, or a long list of integers (a state serialised to JSON or a tuple)."""
    found = []
    if isinstance(obj, torch.Tensor):
        if obj.dtype == torch.uint8 and obj.numel() == MT19937_STATE_BYTES:
            found.append(("tensor", path))
        if obj.dtype == torch.uint8 and obj.numel() == AES_KEY_BYTES:
            found.append(("aes key", path))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and SECRET_KEY.search(k):
                found.append(("key", f"{path}/{k}"))
            found += secrets_in(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        if len(obj) >= 600 and all(isinstance(v, int) for v in obj):
            found.append(("ints", path))
        for i, v in enumerate(obj):
            found += secrets_in(v, f"{path}[{i}]")
    return found


def load_any(file):
    if file.suffix == ".json":
        return json.loads(file.read_text())
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=False)  # .pt, .bin


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A LoRA run with audit canaries through the CLI (adapter/ is released too), from a saved tiny model."""
    root = tmp_path_factory.mktemp("released")
    model, tok = tiny_model_and_tokenizer(seed=1, max_length=48)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    data = write_jsonl(root / "notes.jsonl", TEXTS)
    out = root / "run"
    assert main(["finetune", "--model", str(root / "base"), "--data", str(data), "--lora", "--lora-r", "2",
                 "--batch-size", "8", "--max-steps", "2", "--max-length", "48", "--audit-canaries", str(M),
                 "--seed", str(SEED), "--checkpoint-every", "1", "--output-dir", str(out), "--json"]) == 0
    return out


def test_released_files_hold_no_generator_state(run_dir):
    released = [f for f in run_dir.rglob("*") if f.is_file() and "private" not in f.relative_to(run_dir).parts]
    names = {f.relative_to(run_dir).as_posix() for f in released}
    assert {"report.json", "training.png", "config.json", "model.safetensors", "adapter/adapter_config.json"} <= names
    assert not [n for n in names if re.search(r"checkpoint|secret|\.pt$|\.tmp$", n)], names
    scanned = [f for f in released if f.suffix in (".json", ".pt", ".safetensors", ".bin")]
    assert len(scanned) >= 5
    for file in scanned:
        assert secrets_in(load_any(file)) == [], file
    # control: the scanner finds the sampler's generator state and the noise keys where they are, in the checkpoint
    kinds = {kind for kind, _ in secrets_in(load_checkpoint(run_dir / CHECKPOINT_FILE))}
    assert kinds == {"tensor", "aes key", "key", "ints"}


def test_secret_files_are_owner_only_and_named_in_the_report(run_dir):
    private = run_dir / "private"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert sorted(p.name for p in private.iterdir()) == ["audit_secret.json", "checkpoint.pt"]
    for file in private.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    report = json.loads((run_dir / "report.json").read_text())
    assert report["secret_files"] == [CHECKPOINT_FILE, AUDIT_SECRET_FILE]
    assert "SECRET" in report["secret_files_note"]
    privacy = report["privacy"]
    assert privacy["private"] and not privacy["noise_seed_given"] and not privacy["secure_mode"]
    assert "eval_perplexity" in " ".join(privacy["not_private"]) and "dataset_size" in privacy["not_private"]


def test_report_holds_no_audit_secret_nor_what_determines_it(run_dir):
    text = (run_dir / "report.json").read_text()
    report = json.loads(text)
    secret = json.loads((run_dir / AUDIT_SECRET_FILE).read_text())
    assert len(secret["canaries"]) == M and "AUDITOR'S SECRET" in secret["note"]
    assert "inclusion_mask" not in text and "AUDITORS_SECRET" not in text and str(secret["seed"]) not in text
    assert not any(c in text for c in secret["canaries"])
    # the secret file is consistent with its own seed ...
    rebuilt = audit_canaries(M, seed=secret["seed"])
    assert rebuilt.texts == secret["canaries"] and [int(b) for b in rebuilt.included] == secret["inclusion_mask"]
    # ... which no released setting determines: re-deriving from the config finds none of the canaries
    cfg = report["config"]
    assert cfg["audit_canaries"] == M and cfg["seed"] == SEED
    for guess in {cfg["seed"], cfg["seed"] + 1, 0}:
        assert not set(audit_canaries(M, seed=guess).texts) & set(secret["canaries"]), guess


def test_resume_after_an_interruption_uses_the_private_checkpoint(tmp_path):
    def config(**kw):
        return FinetuneConfig(batch_size=8, max_steps=3, max_length=48, output_dir=str(tmp_path / "run"),
                              progress=False, checkpoint_every=1, audit_canaries=8, **kw)

    def run(cfg):
        model, tok = tiny_model_and_tokenizer(seed=2)
        return finetune(cfg, model=model, tokenizer=tok, train_texts=TEXTS)

    stopped = run(config(stop_after=1))
    out = tmp_path / "run"
    assert not stopped.finished and (out / CHECKPOINT_FILE).is_file() and (out / AUDIT_SECRET_FILE).is_file()
    secret = (out / AUDIT_SECRET_FILE).read_text()
    shutil.copytree(out, tmp_path / "copy")
    resumed = run(config(resume=True))  # rebuilds the canaries from the audit secret (else: data_sha256 refused)
    assert resumed.finished and resumed.steps == 3 and [h["step"] for h in resumed.history] == [1, 2, 3]
    assert (out / AUDIT_SECRET_FILE).read_text() == secret
    assert stat.S_IMODE((out / CHECKPOINT_FILE).stat().st_mode) == 0o600
    # without the private checkpoint there is nothing to resume; without the audit secret neither
    (tmp_path / "copy" / AUDIT_SECRET_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="audit secret"):
        run(FinetuneConfig(**{**config(resume=True).to_dict(), "output_dir": str(tmp_path / "copy")}))
    (out / CHECKPOINT_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        run(config(resume=True))


def test_overwrite_removes_the_old_runs_secrets_and_no_eval_skips_the_held_out_metrics(tmp_path):
    out = tmp_path / "run"
    model, tok = tiny_model_and_tokenizer(seed=2)
    first = finetune(FinetuneConfig(batch_size=8, max_steps=1, max_length=48, output_dir=str(out), progress=False,
                                    audit_canaries=8), model=model, tokenizer=tok, train_texts=TEXTS,
                     eval_texts=TEXTS[:4])
    assert first.eval_perplexity_before > 1 and first.eval_perplexity > 1
    (out / "checkpoint.pt").write_bytes(b"an old layout's checkpoint")
    old = (out / CHECKPOINT_FILE).read_bytes()
    model, tok = tiny_model_and_tokenizer(seed=2)
    finetune(FinetuneConfig(batch_size=8, max_steps=1, max_length=48, output_dir=str(out), progress=False,
                            overwrite=True, evaluate=False), model=model, tokenizer=tok, train_texts=TEXTS,
             eval_texts=TEXTS[:4])
    assert not (out / AUDIT_SECRET_FILE).exists() and not (out / "checkpoint.pt").exists()
    assert (out / CHECKPOINT_FILE).read_bytes() != old
    report = json.loads((out / "report.json").read_text())
    assert report["eval_perplexity_before"] is None and report["eval_perplexity"] is None  # --no-eval
    assert "skipped" in report["privacy"]["not_private"]["eval_perplexity_before, eval_perplexity"]
