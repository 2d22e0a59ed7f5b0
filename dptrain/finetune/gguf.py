"""GGUF checkpoints (llama.cpp's one-file format: weights, config and tokenizer) as ordinary fp32 models.

``transformers`` reads GGUF itself (``from_pretrained(folder, gguf_file=...)``, with the ``gguf`` package) and
dequantizes every weight to fp32; that takes ~30-45 s for a 135M model on 2 CPU cores. The result is saved once
as a plain ``save_pretrained`` folder (model and tokenizer) in the cache, and later runs load that folder in a
few seconds. The cache folder is keyed by the GGUF file's resolved path, size and modification time and by the
transformers version, so a changed or replaced file is converted again:

    $DPTRAIN_CACHE/gguf/<key>/          (default: $XDG_CACHE_HOME/dptrain, else ~/.cache/dptrain)

Deleting the cache folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

__all__ = ["CACHE_ENV", "default_cache_dir", "find_gguf", "cache_key", "converted_folder", "convert_gguf"]

logger = logging.getLogger(__name__)

CACHE_ENV = "DPTRAIN_CACHE"
INSTALL_HINT = 'pip install gguf (in the dptrain checkout: pip install -e ".[hf,gguf]")'
_SOURCE_FILE = "dptrain_gguf_source.json"  # written last: a folder without it is an unfinished conversion


def default_cache_dir() -> Path:
    """``$DPTRAIN_CACHE``, else ``$XDG_CACHE_HOME/dptrain``, else ``~/.cache/dptrain``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dptrain"


def find_gguf(path: Union[str, Path]) -> Path:
    """The ``.gguf`` file at ``path``: the file itself, or the one ``.gguf`` file in a folder."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"{p} is not a .gguf file")
        return p.resolve()
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if len(found) == 1:
            return found[0].resolve()
        if not found:
            raise FileNotFoundError(f"no .gguf file in {p}")
        raise ValueError(f"{p} holds {len(found)} .gguf files ({', '.join(f.name for f in found)}): pass one of them")
    raise FileNotFoundError(f"GGUF file not found: {p}")


def cache_key(gguf_file: Path) -> str:
    """16 hex digits from the file's resolved path, size, mtime (ns) and the transformers version."""
    import transformers

    st = Path(gguf_file).stat()
    text = f"{Path(gguf_file).resolve()}|{st.st_size}|{st.st_mtime_ns}|transformers {transformers.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def converted_folder(path: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """The cached fp32 ``save_pretrained`` folder of the GGUF file at ``path`` (a file, or a folder holding one),
    converting it first when it is not in the cache yet."""
    gguf_file = find_gguf(path)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / "gguf" / cache_key(gguf_file)
    if (folder / _SOURCE_FILE).is_file():
        return folder
    logger.warning("converting %s to fp32 (once; cached in %s)", gguf_file.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))  # same file system: atomic rename
    try:
        convert_gguf(gguf_file, work)
        st = gguf_file.stat()
        (work / _SOURCE_FILE).write_text(json.dumps({"gguf_file": str(gguf_file), "size": st.st_size,
                                                     "mtime_ns": st.st_mtime_ns}, indent=2) + "\n")
        try:
            work.rename(folder)
        except OSError:  # another process finished the same conversion first: keep theirs
            if not (folder / _SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_file`` to fp32 with transformers' own GGUF reader and ``save_pretrained`` the model and
    its tokenizer (read from the same file) into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dptrain.finetune.modeling import torch_layers_only

    folder, name = str(gguf_file.parent), gguf_file.name
    kwargs = {}
    try:  # transformers >= 5: ask for plain dense layers even where GGUF matmul kernels are installed
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs,
                                                     **torch_layers_only())
    except ImportError as err:
        raise ImportError(f"reading {name} needs the gguf package: {INSTALL_HINT} ({str(err).splitlines()[0]})") \
            from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense fp32 now; drop the marker that blocks save_pretrained
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
