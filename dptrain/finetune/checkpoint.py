"""Integrity-checked training checkpoints.

File layout: a magic line, the SHA-256 of the payload, then the ``torch.save`` payload. A truncated or
altered file fails the hash check and is refused instead of being loaded with silently wrong values.
Writes go to a temporary file first and are renamed into place, so a crash never leaves half a checkpoint.
A checkpoint is SECRET (the noise and sampler keys and positions): the file is written with mode 0600.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Dict

import torch

from dptrain.finetune.secret_files import write_secret

__all__ = ["save_checkpoint", "load_checkpoint", "compare_fingerprints"]

_MAGIC = b"DPTRAIN-FINETUNE-CHECKPOINT v1\n"


def save_checkpoint(path, payload: Dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` (owner-only, mode 0600)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    write_secret(path, _MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)


def load_checkpoint(path) -> Dict[str, Any]:
    """The payload; ``FileNotFoundError`` if missing, ``ValueError`` if corrupted or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    raw = path.read_bytes()
    if not raw.startswith(_MAGIC):
        raise ValueError(f"{path} is not a dptrain finetune checkpoint (bad header); refusing to resume")
    digest, _, data = raw[len(_MAGIC):].partition(b"\n")
    if hashlib.sha256(data).hexdigest().encode() != digest:
        raise ValueError(f"{path} is corrupted (checksum mismatch); refusing to resume")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise ValueError(f"{path} could not be read ({type(err).__name__}: {err}); refusing to resume") from None
    if not isinstance(payload, dict) or "fingerprint" not in payload:
        raise ValueError(f"{path} has no run fingerprint; refusing to resume")
    return payload


def compare_fingerprints(saved: Dict[str, Any], current: Dict[str, Any]) -> None:
    """``ValueError`` listing every setting in which the checkpoint's run differs from this one."""
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        shown = "; ".join(d if len(d) < 160 else d[:157] + "..." for d in diffs[:4])
        more = f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise ValueError(f"checkpoint belongs to a different run ({shown}{more}); use the same model, data and "
                         "settings, or start over with --overwrite")
