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
import shlex
import shutil
import stat
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


def _private_cache_dir() -> Path:
    """The cache folder, created owner-only; refused unless this user owns it and nobody else may write to it (a
    library planted there would draw the noise)."""
    folder = _cache_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{folder} is not this user's alone (owner uid {info.st_uid}, mode "
                              f"{stat.S_IMODE(info.st_mode):o}); set DPTRAIN_CACHE to a private folder")
    return folder


def _compile(compiler: list, flags: list) -> Path:
    """The shared library for this source, flags, compiler and machine: built once, then reused."""
    source = _SOURCE.read_bytes()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=True).stdout
    tag = hashlib.sha256(source + " ".join(flags + [version, platform.machine()]).encode()).hexdigest()[:16]
    target = _private_cache_dir() / f"keystream_normal-{tag}.so"
    if not target.exists():
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)  # then renamed: processes may race here
        os.close(fd)
        try:
            subprocess.run([*compiler, *flags, "-o", partial, str(_SOURCE), "-lm"], capture_output=True, text=True,
                           check=True)
            os.chmod(partial, 0o700)  # whatever the umask: _load refuses a library others may write to
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return target


def _build(compiler: list) -> Path:
    """With per-CPU clones of the loops (x86-64 and GCC-style compilers), else without (other compilers, no ifunc)."""
    try:
        return _compile(compiler, _FLAGS)
    except subprocess.CalledProcessError:
        return _compile(compiler, _FLAGS + ["-DDPTRAIN_PLAIN"])


def c_compiler() -> Optional[list]:
    """The C compiler's command ($CC, which may carry arguments, else cc or gcc on the PATH), or None."""
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return None if found is None else shlex.split(found)


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The loaded C helpers, or None (``DPTRAIN_NATIVE=0``, no C compiler, or a failed build: warned once)."""
    if os.environ.get("DPTRAIN_NATIVE", "1") == "0":
        return None
    compiler = c_compiler()
    try:
        if compiler is None:
            raise FileNotFoundError("no C compiler (cc, gcc or $CC) on the PATH")
        path = _build(compiler)
        try:
            return _load(path)
        except OSError:  # a damaged or wrong file in the cache: built once more
            path.unlink()
            return _load(_build(compiler))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(f"dptrain's C noise transform is unavailable ({str(detail).strip()[:300]}); the noise is drawn "
                      f"with torch ops, several times slower", RuntimeWarning, stacklevel=2)
        return None


_LOADED_FDS: list = []  # open for the process's life: a closed number reused would name another file to the loader


def _load(path: Path) -> ctypes.CDLL:
    """The library at ``path``, after a known-answer test against the torch reference (OSError if it fails). It must
    be a regular file (not a link) of this user's that nobody else may write to; it is checked and loaded through one
    open file, so nothing can swap it in between."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # a link: OSError
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise OSError(f"{path} is not a file of this user's alone (owner uid {info.st_uid}, mode "
                          f"{stat.S_IMODE(info.st_mode):o})")
        opened = f"/proc/self/fd/{fd}"  # Linux; elsewhere the path, checked just before
        lib = ctypes.CDLL(opened if os.path.exists(opened) else str(path))
    except OSError:
        os.close(fd)
        raise
    _LOADED_FDS.append(fd)
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
    _check_known_answers(lib, path)
    return lib


def _check_known_answers(lib: ctypes.CDLL, path: Path) -> None:
    """Every quadrant and radius on fixed words (and the largest, smallest and wrapping ones), with a pair count that
    leaves a vector loop a tail and two scales: the values within 2^-18 of torch's formula in fp64, nothing written
    past them, and scale_add exact. It guards against damage; a library crafted to pass it is the cache check's job."""
    import torch

    for pairs, scale in ((1031, 0.5**0.5), (17, 3.7), (1, 0.25)):
        index = torch.arange(4 * pairs, dtype=torch.int64)
        words = (index * 2654435761 + 12345) % (1 << 32)  # (4 * pairs,) spread over all 32-bit words
        words[: min(4, 4 * pairs)] = torch.tensor([0, (1 << 24) - 1, (1 << 32) - 1, 1 << 24])[: 4 * pairs]
        words = words.to(torch.int32)
        values = torch.full((2 * pairs + 1,), 7.0)  # the last one must stay untouched
        lib.keystream_normals(words.data_ptr(), pairs, scale, values.data_ptr())
        low = (words.to(torch.int64) & 0xFFFFFF).add_(1).double().mul_(2.0**-24).view(2, 2, pairs)
        radius, angle = (-2 * low[:, 0].log()).sqrt(), 2 * torch.pi * low[:, 1]  # (2 draws, pairs)
        expected = torch.cat([(radius * angle.cos()).sum(0), (radius * angle.sin()).sum(0)]) * scale
        if not (values[:-1].double() - expected).abs().max() < 2.0**-18 * max(1.0, scale) or values[-1] != 7.0:
            raise OSError(f"{path} fails its known-answer test")
    out, add = torch.arange(9.0), torch.full((9,), 0.25)
    lib.scale_add(out.data_ptr(), add.data_ptr(), 9, 0.5)
    if not torch.equal(out, torch.arange(9.0) / 2 + 0.25):
        raise OSError(f"{path} fails its known-answer test")
