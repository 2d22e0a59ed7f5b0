"""Write one benchmark's section of ``benchmarks/RESULTS.md`` in place, leaving the others alone, with the machine,
date and command of the run. Imports nothing from the package: ``examples/`` load it as a top-level module."""

from __future__ import annotations

import datetime
import platform
import re
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
_HEADER = "# Benchmark results\n\nEach section is written by the script named in it; rerun the command to refresh it.\n"


def machine_description() -> str:
    """One line naming the CPU/GPU, core count and library versions of this run."""
    import os

    parts = [platform.processor() or platform.machine(), f"{os.cpu_count()} cores", f"Python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            parts.insert(0, torch.cuda.get_device_name())
    except ImportError:
        pass
    return ", ".join(parts)


def run_command() -> str:
    """The command line of this run as typed from the repository root: ``python -m benchmarks.<name> ...`` for a
    module run with ``-m`` (whose ``sys.argv[0]`` is the file's full path), else ``python <script> ...``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    return shlex.join(["python", *program, *sys.argv[1:]])


def write_section(name: str, body: str, command: str | None = None) -> None:
    """Replace (or append) the section ``name`` with ``body`` plus machine, date and command (default: this
    run's, ``run_command()``)."""
    command = command or run_command()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"<!-- BEGIN {name} -->\n## {name}\n\n"
        f"- machine: {machine_description()}\n- date: {stamp}\n- command: `{command}`\n\n"
        f"{body.strip()}\n<!-- END {name} -->\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else _HEADER
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)
