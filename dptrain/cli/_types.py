"""argparse value types shared by the sub-commands: bad values become one-line usage errors."""

from __future__ import annotations

import argparse
import math
import sys

__all__ = ["positive_int", "nonneg_int", "finite_float", "one_line_errors"]


def one_line_errors(parser: argparse.ArgumentParser, command: str) -> None:
    """argparse usage errors of ``dptrain COMMAND`` as one line on stderr, exit status 2 (no usage block)."""

    def error(message: str):
        print(f"dptrain {command}: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error


def _integer(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    return _integer(text, 0, "an integer >= 0")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, found {text!r}")
    return value
