"""Input checks shared by events, accountants and calibration; each error names the value found."""

from __future__ import annotations

import math
import numbers

__all__ = ["check_sample_rate", "check_noise_multiplier", "check_delta", "check_steps", "check_epsilon"]


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_sample_rate(sample_rate) -> float:
    """Poisson sample rate q must be a number in (0, 1]."""
    if not _is_real(sample_rate) or not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], found {sample_rate!r}")
    return float(sample_rate)


def check_noise_multiplier(noise_multiplier) -> float:
    """Noise multiplier sigma must be finite and >= 0 (0 means no privacy: epsilon = inf)."""
    if not _is_real(noise_multiplier) or not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be a finite number >= 0, found {noise_multiplier!r}")
    return float(noise_multiplier)


def check_delta(delta) -> float:
    """delta must be in (0, 1)."""
    if not _is_real(delta) or not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), found {delta!r}")
    return float(delta)


def check_epsilon(epsilon, name: str = "epsilon") -> float:
    """epsilon must be finite and >= 0."""
    if not _is_real(epsilon) or not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"{name} must be a finite number >= 0, found {epsilon!r}")
    return float(epsilon)


def check_steps(steps, name: str = "steps") -> int:
    """A step count must be an integer >= 0 (bools and floats are rejected)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"{name} must be an integer >= 0, found {steps!r}")
    return int(steps)
