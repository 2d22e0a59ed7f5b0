"""dptrain's C helpers (``dptrain/csrc``), compiled with the system's C compiler on first use and cached.

The noise's Box-Muller transform in torch ops makes seven passes over memory and calls torch's log, cos and sin;
in one vectorised C loop it is several times faster, and a plain C library called through ctypes releases the GIL
and starts no OpenMP team, so the noise threads run it side by side. Without a compiler (or with
``DPTRAIN_NATIVE=0``) ``library()`` is None and the callers use their torch references, with a warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

__all__ = ["library"]

_SOURCE = Path(__file__).with_name("csrc") / "keystream_normal.c"
_FLAGS = ["-O3", "-std=c11", "-fno-math-errno", "-shared", "-fPIC"]
_SIGNATURES = {
    "keystream_normals": [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_float, ctypes.c_void_p],
    "scale_add": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_float],
}


def _cache_dir() -> Path:
    root = os.environ.get("DPTRAIN_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.expanduser("~/.cache"), "dptrain")
    return Path(root)


def _compile(compiler: str, flags: list) -> Path:
    """The shared library for this source, flags, compiler and machine: built once, then reused."""
    source = _SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    tag = hashlib.sha256(source + " ".join(flags + [version, platform.machine()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"keystream_normal-{tag}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)  # then renamed: processes may race here
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, "-o", partial, str(_SOURCE), "-lm"], capture_output=True, text=True,
                           check=True)
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return target


def _build(compiler: str) -> Path:
    """With per-CPU clones of the loops (x86-64 and GCC-style compilers), else without (other compilers, no ifunc)."""
    try:
        return _compile(compiler, _FLAGS)
    except subprocess.CalledProcessError:
        return _compile(compiler, _FLAGS + ["-DDPTRAIN_PLAIN"])


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The loaded C helpers, or None (``DPTRAIN_NATIVE=0``, no C compiler, or a failed build: warned once)."""
    if os.environ.get("DPTRAIN_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if compiler is None:
            raise FileNotFoundError("no C compiler (cc, gcc or $CC) on the PATH")
        return _load(_build(compiler))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(f"dptrain's C noise transform is unavailable ({str(detail).strip()[:300]}); the noise is drawn "
                      f"with torch ops, several times slower", RuntimeWarning, stacklevel=2)
        return None


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
    return lib
