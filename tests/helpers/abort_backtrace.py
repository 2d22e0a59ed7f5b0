"""A SIGABRT handler to preload into subprocesses (Linux, with a C compiler): a rank that aborts after its Python
code ended leaves its native backtrace and thread names in its stderr (see abort_backtrace.c)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict

from dptrain.native import c_compiler

SOURCE = Path(__file__).with_name("abort_backtrace.c")


def preload_env(env: Dict[str, str], build_dir: Path) -> Dict[str, str]:
    """``env`` with the handler added to LD_PRELOAD, or unchanged where it cannot be built (not Linux, no compiler)."""
    compiler = c_compiler()
    if not sys.platform.startswith("linux") or compiler is None:
        return env
    library = build_dir / "abort_backtrace.so"
    command = [*compiler, "-O1", "-shared", "-fPIC", "-o", str(library), str(SOURCE)]
    built = subprocess.run(command, capture_output=True)
    if built.returncode != 0:
        return env
    return {**env, "LD_PRELOAD": " ".join(filter(None, [str(library), env.get("LD_PRELOAD")]))}
