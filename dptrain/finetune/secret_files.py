"""The SECRET files of a run, kept apart from what is released: ``<output_dir>/private/`` (mode 0700).

- ``private/checkpoint.pt``: the resume state. It holds the noise and sampler keys and keystream positions (anyone
  who has them can regenerate the noise and subtract it from the released weights) and, with ``--error-feedback``, the
  error-feedback buffer (unclipped gradient residues).
- ``private/audit_secret.json``: the one-run audit's canaries and inclusion mask, drawn from secret entropy
  (never from the run's public seed); ``dptrain audit --model`` reads it, a resumed run rebuilds its data from it.
- ``private/members.jsonl`` and ``private/nonmembers.jsonl`` (runs on your own data with held-out records): the
  records trained on (at most 10,000, a seeded sample beyond) and the held-out ones, for ``dptrain attack mia
  --model``. Which records were NOT trained on is membership information too, so it is never released.

The checkpoint's payload is a ``torch.save`` dict behind a header line and a SHA-256 line; open it with
``dptrain.finetune.load_checkpoint(path)`` (``torch.load`` alone refuses the header).

Both are written with mode 0600. Everything else in ``output_dir`` (model, tokenizer, report.json, training.png,
``adapter/``) is the release.
"""

from __future__ import annotations

import json
import os
import random
import secrets
from pathlib import Path
from typing import Any, Dict, List, Sequence

from dptrain.finetune.data import AUDIT_CANARY_TEMPLATE, AuditCanaries, audit_canaries
from dptrain.validation import is_integer

__all__ = ["PRIVATE_DIR", "CHECKPOINT_FILE", "AUDIT_SECRET_FILE", "MEMBERS_FILE", "NONMEMBERS_FILE",
           "LEGACY_CHECKPOINT", "SECRET_FILES_NOTE", "private_dir", "write_secret", "new_audit_canaries",
           "save_audit_secret", "load_audit_canaries", "save_membership"]

PRIVATE_DIR = "private"
CHECKPOINT_FILE = f"{PRIVATE_DIR}/checkpoint.pt"
AUDIT_SECRET_FILE = f"{PRIVATE_DIR}/audit_secret.json"
MEMBERS_FILE, NONMEMBERS_FILE = f"{PRIVATE_DIR}/members.jsonl", f"{PRIVATE_DIR}/nonmembers.jsonl"
MAX_MEMBERS_WRITTEN = 10_000
LEGACY_CHECKPOINT = "checkpoint.pt"  # where older versions wrote it: inside the released folder

SECRET_FILES_NOTE = ("SECRET, never publish or share: files under private/ (owner-only, mode 0600). checkpoint.pt "
                     "holds the noise and sampler keys (they regenerate the noise and the batches) and error-feedback "
                     "buffers (open it with dptrain.finetune.load_checkpoint); audit_secret.json holds the audit "
                     "canaries and which were trained on; members.jsonl / nonmembers.jsonl hold records trained on "
                     "and held out (for 'dptrain attack mia --model').")
AUDIT_SECRET_NOTE = ("AUDITOR'S SECRET: the one-run audit canaries and their inclusion mask (1 = trained on once), "
                     "drawn from secret entropy. Never feed it back into training or any released statistic, never "
                     "publish it. Used by 'dptrain audit --model' and by --resume.")


def private_dir(out) -> Path:
    """``out/private``, created if missing, with mode 0700 (owner only) in any case."""
    folder = Path(out) / PRIVATE_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def write_secret(path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte on, via a temporary file renamed into place
    (a crash never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.chmod(tmp, 0o600)  # an old .tmp keeps its mode through O_TRUNC
        f.write(data)
    os.replace(tmp, path)


def new_audit_canaries(num: int) -> AuditCanaries:
    """``num`` audit canaries and their coins from a 63-bit seed of secret entropy (``secrets``)."""
    return audit_canaries(num, seed=secrets.randbits(63))


def save_audit_secret(out, canaries: AuditCanaries) -> Path:
    """``out/private/audit_secret.json`` (mode 0600): the canaries, their inclusion mask and the secret seed."""
    record = {"note": AUDIT_SECRET_NOTE, "template": AUDIT_CANARY_TEMPLATE, "seed": canaries.seed,
              "num_canaries": len(canaries.texts), "num_included": sum(canaries.included),
              "canaries": list(canaries.texts), "inclusion_mask": [int(b) for b in canaries.included]}
    path = private_dir(out) / Path(AUDIT_SECRET_FILE).name
    write_secret(path, (json.dumps(record, indent=2) + "\n").encode())
    return path


def load_audit_canaries(out, num: int) -> AuditCanaries:
    """The canaries of ``out/private/audit_secret.json`` (rebuilt from its seed and checked against its texts and
    mask), for resuming a run with ``num`` audit canaries."""
    path = Path(out) / AUDIT_SECRET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume a run with audit canaries without its audit secret: {path} is missing")
    try:
        record: Dict[str, Any] = json.loads(path.read_text())
        seed = record["seed"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a dptrain audit secret (expected JSON with a 'seed')") from None
    if not is_integer(seed) or record.get("num_canaries") != num:
        raise ValueError(f"{path} holds {record.get('num_canaries')!r} canaries (seed {type(seed).__name__}), this "
                         f"run has --audit-canaries {num}")
    canaries = audit_canaries(num, seed=seed)
    if record.get("canaries") != canaries.texts or record.get("inclusion_mask") != [int(b) for b in canaries.included]:
        raise ValueError(f"{path} does not match its own seed (edited?); refusing to resume")
    return canaries


def save_membership(out, members: Sequence[str], nonmembers: Sequence[str], *, seed: int) -> List[str]:
    """``out/private/members.jsonl`` (records trained on, at most ``MAX_MEMBERS_WRITTEN``: a seeded sample beyond)
    and ``nonmembers.jsonl`` (held-out records), mode 0600; records in both lists are left out of both. Returns the
    two paths relative to ``out``."""
    held, trained = set(nonmembers), set(members)
    members = list(dict.fromkeys(t for t in members if t not in held))
    nonmembers = list(dict.fromkeys(t for t in nonmembers if t not in trained))
    if len(members) > MAX_MEMBERS_WRITTEN:
        members = random.Random(seed).sample(members, MAX_MEMBERS_WRITTEN)
    folder = private_dir(out)
    for name, texts in ((MEMBERS_FILE, members), (NONMEMBERS_FILE, nonmembers)):
        write_secret(folder / Path(name).name, "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    return [MEMBERS_FILE, NONMEMBERS_FILE]
