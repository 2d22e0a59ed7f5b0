"""The ``dptrain`` command line: one sub-command per module in this package.

Each sub-command module exposes ``add_parser(subparsers)`` (registers its parser and sets
``func``) and is listed in ``_COMMANDS``. Bad input raises ``ValueError``/``TypeError`` (or
``CLIError``); ``main`` turns it into a one-line message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any, Sequence

__all__ = ["main", "CLIError", "emit", "is_rank0"]

# sub-command name -> module under dptrain.cli that defines add_parser(subparsers)
_COMMANDS = {
    "budget": "budget",
    "finetune": "finetune",
    "attack": "attack",
    "audit": "audit",
    "federated": "federated",
}


class CLIError(Exception):
    """Bad command-line input; printed as one line, exit status 2."""


def emit(result: dict[str, Any], human: str, as_json: bool) -> None:
    """Print ``result`` as one JSON object (``--json``) or the human-readable text."""
    if as_json:
        print(json.dumps(result, sort_keys=True, default=float))
    else:
        print(human)


class _OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line (no usage dump), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that sub-command's module is imported (fast start-up)."""
    parser = _OneLineErrors(
        prog="dptrain",
        description="Differentially private training toolkit for PyTorch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'dptrain <command> --help' for the options and examples of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, module_name in _COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        importlib.import_module(f"dptrain.cli.{module_name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=argv[0] if argv and argv[0] in _COMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        _error_line(f"dptrain {args.command}: error: {err}")
        return 2
    except KeyboardInterrupt as err:
        _error_line(f"dptrain {args.command}: {str(err) or 'interrupted'}")
        return 130


def is_rank0() -> bool:
    """Whether this process is rank 0 of its launcher (torchrun's RANK), or alone: it prints for all of them."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("RANK", "0") == "0"


def _error_line(line: str) -> None:
    """Print ``line`` on stderr once: under torchrun only rank 0 prints, and every rank hands it to the launcher
    (TORCHELASTIC_ERROR_FILE), whose failure summary then shows it instead of a link to enable tracebacks."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:
            pass
    if is_rank0():
        print(line, file=sys.stderr)
