"""Argument checks shared by the whole library, so every mistake reads the same way.

Each check returns the value converted (``float`` or ``int``) or raises in one line naming the argument, what
was expected and what was found: ``TypeError`` for a wrong type (a bool is never a number), ``ValueError`` for a
wrong value (out of range, NaN or inf, an unknown choice). Numpy scalars count as numbers. No torch import:
``dptrain.accountants`` uses these without torch.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

__all__ = [
    "check_number", "check_positive", "check_nonnegative", "check_fraction", "check_probability",
    "check_int", "check_positive_int", "check_optional_int", "check_bool", "check_choice", "is_number", "is_integer",
]


def is_number(value: Any) -> bool:
    """A real number, Python or numpy, and not a bool (True is an int to Python, never a number here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """An integer, Python or numpy, and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(name: str, value: Any, expected: str) -> float:
    if not is_number(value):
        raise TypeError(f"{name} must be {expected}, found {value!r} ({type(value).__name__})")
    return float(value)


def check_number(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number in the interval from ``low`` to ``high`` (ends closed unless ``*_open``)."""
    expected = _interval(low, high, low_open, high_open)
    x = _real(name, value, expected)
    above = x > low if low_open else x >= low
    below = x < high if high_open else x <= high
    if not (math.isfinite(x) and above and below):
        raise ValueError(f"{name} must be {expected}, found {value!r}")
    return x


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0."""
    return check_number(name, value, low=0.0, low_open=True)


def check_nonnegative(name: str, value: Any) -> float:
    """A finite number >= 0."""
    return check_number(name, value, low=0.0)


def check_fraction(name: str, value: Any, *, closed_right: bool) -> float:
    """A number in (0, 1] (``closed_right``) or [0, 1)."""
    return check_number(name, value, low=0.0, high=1.0, low_open=closed_right, high_open=not closed_right)


def check_probability(name: str, value: Any) -> float:
    """A number in (0, 1)."""
    return check_number(name, value, low=0.0, high=1.0, low_open=True, high_open=True)


def check_int(name: str, value: Any, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """An integer (Python or numpy, not bool) in [minimum, maximum]."""
    expected = "an integer" + _int_range(minimum, maximum)
    if not is_integer(value):
        raise TypeError(f"{name} must be {expected}, found {value!r} ({type(value).__name__})")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {expected}, found {value!r}")
    return int(value)


def check_positive_int(name: str, value: Any) -> int:
    """An integer >= 1."""
    return check_int(name, value, minimum=1)


def check_optional_int(name: str, value: Any) -> Optional[int]:
    """None or an integer (e.g. a seed)."""
    if value is None:
        return None
    if not is_integer(value):
        raise TypeError(f"{name} must be an integer or None, found {value!r} ({type(value).__name__})")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """A bool (an integer 0/1 is not one: flags are never counts)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, found {value!r} ({type(value).__name__})")
    return value


def check_choice(name: str, value: Any, options: Sequence[str]) -> str:
    """One of ``options``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, found {value!r}")
    return value


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if low > -math.inf and high < math.inf:
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low > -math.inf:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high < math.inf:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def _int_range(minimum: Optional[int], maximum: Optional[int]) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return "" if maximum is None else f" <= {maximum}"
