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

from dptrain.validation import check_positive_int

__all__ = ["StatisticRelease", "StatisticReleases", "release_noise_multiplier", "release_statistics"]


def release_noise_multiplier(noise_std: float, coordinates: int) -> float:
    """Noise multiplier of a release of ``coordinates`` sensitivity-1 counts with per-coordinate std ``noise_std``."""
    return noise_std / math.sqrt(check_positive_int("coordinates", coordinates))


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



class StatisticReleases:
    """What one controller releases at its action steps: per-group unclipped counts and, with ``loss_bound``, the
    clipped loss sum, each step's release carried by that step's ``StepMechanism`` (joint with its gradient).

    ``noise_std``: per-coordinate noise std, default ``expected_batch_size / 20`` (Andrew et al. 2021).
    """

    def __init__(self, *, num_groups: int, expected_batch_size: float, noise_std: Optional[float] = None,
                 loss_bound: Optional[float] = None):
        self.expected_batch_size, self.loss_bound = expected_batch_size, loss_bound
        self.coordinates = num_groups + (loss_bound is not None)
        self.noise_std = noise_std or expected_batch_size / 20
        self.noise_multiplier = release_noise_multiplier(self.noise_std, self.coordinates)
        self.loss_sum = 0.0  # clipped per-sample losses of the current logical batch (private)

    def observe_losses(self, losses: torch.Tensor) -> None:
        """Adds the per-sample losses (B,) of a micro-batch, clipped to [0, loss_bound], to the batch's sum."""
        if self.loss_bound is None:
            raise ValueError("observe_losses needs SACController(loss_bound=...) (the per-sample loss clip)")
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            raise ValueError(f"losses must be a 1-D tensor of per-sample losses, found "
                             f"{getattr(losses, 'shape', type(losses).__name__)}")
        self.loss_sum += float(losses.detach().float().clamp(0, self.loss_bound).sum())

    def add_to(self, mechanism):
        """The step's mechanism with this release added (same batch: one joint Gaussian)."""
        return mechanism.with_release(self.noise_multiplier)

    def check_carried(self, mechanism, step: int) -> None:
        """Refuses to release unless ``mechanism`` (already accounted) carries exactly this release."""
        if len(mechanism.releases) != 1 or mechanism.releases[0] != self.noise_multiplier:
            raise RuntimeError(f"step {step}'s mechanism does not carry the controller's release "
                               f"({mechanism.releases}); refusing to release unaccounted statistics")

    def release(self, tracker, optimizer) -> StatisticRelease:
        """The noisy statistics of the batch the tracker holds, noise from the optimizer's secret source."""
        counts = [tracker.num_samples - tracker.clipped_count[g.name] for g in tracker.groups]  # private
        return release_statistics(
            counts, expected_batch_size=self.expected_batch_size,
            noise=optimizer.release_noise(self.coordinates, self.noise_std),
            loss_sum=self.loss_sum if self.loss_bound is not None else None, loss_bound=self.loss_bound,
        )

    def reset(self) -> None:
        """Forget the batch (after its release, or when its step is refused)."""
        self.loss_sum = 0.0
