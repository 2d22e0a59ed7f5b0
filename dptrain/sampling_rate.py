"""The sampling rate a Poisson sampler can realise exactly (torch-free: the budget CLI plans with it too)."""

import math

__all__ = ["realizable_rate"]


def realizable_rate(sample_rate: float) -> float:
    """``sample_rate`` rounded up to a multiple of 2^-53: exactly the probability that an fp64 uniform (k 2^-53,
    k uniform below 2^53) falls below it, so the sampler includes each example with the rate the ledger charges
    (an fp32 uniform, k 2^-24, realises ceil(q 2^24) / 2^24: 1.3% above q = 1e-6)."""
    return math.ceil(sample_rate * 2.0**53) / 2.0**53
