"""The checks of the accounting quantities (``dptrain.validation`` under their domain names)."""

from __future__ import annotations

from dptrain.validation import check_fraction, check_int, check_nonnegative, check_probability

__all__ = ["check_sample_rate", "check_noise_multiplier", "check_delta", "check_steps", "check_epsilon"]


def check_sample_rate(sample_rate) -> float:
    """Poisson sample rate q in (0, 1]."""
    return check_fraction("sample_rate", sample_rate, closed_right=True)


def check_noise_multiplier(noise_multiplier) -> float:
    """Noise multiplier sigma, finite and >= 0 (0 means no privacy: epsilon = inf)."""
    return check_nonnegative("noise_multiplier", noise_multiplier)


def check_delta(delta) -> float:
    """delta in (0, 1)."""
    return check_probability("delta", delta)


def check_epsilon(epsilon, name: str = "epsilon") -> float:
    """epsilon, finite and >= 0."""
    return check_nonnegative(name, epsilon)


def check_steps(steps, name: str = "steps") -> int:
    """A step count, an integer >= 0."""
    return check_int(name, steps, minimum=0)
