"""argparse value types shared by the sub-commands: bad values become one-line usage errors."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable, Optional

__all__ = ["positive_int", "nonneg_int", "finite_float", "fraction", "one_line_errors"]


def one_line_errors(parser: argparse.ArgumentParser, command: str) -> None:
    """argparse usage errors of ``dptrain COMMAND`` as one line on stderr, exit status 2 (no usage block)."""

    def error(message: str):
        print(f"dptrain {command}: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error


def _parsed(text: str, parse: Callable[[str], Any], accept: Callable[[Any], bool], expected: str,
            unparsable: Optional[str] = None) -> Any:
    """``parse(text)`` if it parses and ``accept`` takes it, else a usage error naming what was expected."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {unparsable or expected}, found {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}")
    return value


def positive_int(text: str) -> int:
    return _parsed(text, int, lambda n: n >= 1, "a positive integer")


def nonneg_int(text: str) -> int:
    return _parsed(text, int, lambda n: n >= 0, "an integer >= 0")


def finite_float(text: str) -> float:
    return _parsed(text, float, math.isfinite, "a finite number", unparsable="a number")


def fraction(text: str) -> float:
    return _parsed(text, float, lambda x: 0.0 < x <= 1.0, "a number in (0, 1]")  # also refuses NaN
