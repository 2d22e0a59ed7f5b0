"""Gaussian release of per-batch statistics the controller observes (private quantile estimation style).

For one logical (Poisson-sampled) batch, the released vector is

    v = [u_1, ..., u_G, (l)] + N(0, s^2 I),   u_g = #{i : ||g_i||_g <= C_g},  l = sum_i min(max(loss_i, 0), L) / L

(Andrew et al. 2021 release u_g with s = m/20, m the expected batch size). Adding or removing one sample
changes each coordinate by at most 1, so the L2 sensitivity of the k-coordinate vector is sqrt(k): a Gaussian
mechanism with noise multiplier s / sqrt(k) on the SAME Poisson batch as that step's gradient. The two are
accounted as one subsampled Gaussian (``StepMechanism.with_release``; Andrew et al. 2021, Thm 1), never as
independently sampled events. The noise comes from the DP optimizer's secret source. The estimates divide by
the public expected batch size m, never by the private actual batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

__all__ = ["StatisticRelease", "release_noise_multiplier", "release_statistics"]


def release_noise_multiplier(noise_std: float, coordinates: int) -> float:
    """Noise multiplier of a release of ``coordinates`` sensitivity-1 counts with per-coordinate std ``noise_std``."""
    if coordinates <= 0:
        raise ValueError(f"coordinates must be > 0, found {coordinates}")
    return noise_std / math.sqrt(coordinates)


@dataclass
class StatisticRelease:
    """What one release made public: unclipped fractions per group and, optionally, the mean bounded loss."""

    unclipped_fraction: List[float]
    loss: Optional[float]


def release_statistics(
    unclipped_counts: Sequence[int], *, expected_batch_size: float, noise: torch.Tensor,
    loss_sum: Optional[float] = None, loss_bound: Optional[float] = None,
) -> StatisticRelease:
    """Add the Gaussian ``noise`` (k,) to the private counts (and the bounded loss sum); normalise by the
    expected batch."""
    values = [float(u) for u in unclipped_counts]
    if loss_sum is not None:
        values.append(loss_sum / loss_bound)  # sensitivity 1 after dividing by the per-sample bound
    if noise.shape != (len(values),):
        raise ValueError(f"noise must have shape ({len(values)},), found {tuple(noise.shape)}")
    noisy = torch.tensor(values, dtype=torch.float64) + noise.to(torch.float64)  # (k,)
    noisy = (noisy / expected_batch_size).tolist()
    if loss_sum is None:
        return StatisticRelease(noisy, None)
    return StatisticRelease(noisy[:-1], noisy[-1] * loss_bound)

