"""The training loss, released with DP: each logical step's mean loss, noised and accounted with that step.

The per-sample losses of the batch, clipped to [0, bound], are summed (sensitivity ``bound``), noised with std
z_l * bound (z_l = ``factor`` * z, from the optimizer's secret noise source) and divided by the expected batch
size. Gradient and loss are two Gaussian releases of the SAME Poisson batch, i.e. one subsampled Gaussian of
multiplier (z_g^-2 + z_l^-2)^-1/2 (``StepMechanism.with_release``); the gradient's multiplier is raised to
z_g = (z^-2 - z_l^-2)^-1/2 (3% at factor 4) so that this is the calibrated z: the ledger, and so epsilon, are
those of the run without the release.
"""

from __future__ import annotations

from typing import Optional

import torch

from dptrain import distributed

__all__ = ["LossRelease", "LOSS_BOUND", "LOSS_RELEASE_FACTOR"]

LOSS_BOUND = 10.0  # nats: per-sample losses are clipped to [0, LOSS_BOUND] before the noisy release
LOSS_RELEASE_FACTOR = 4.0  # the loss release's noise multiplier, in multiples of the step's


class LossRelease:
    """Attached to a DP optimizer with plain mechanism and noise (no controller, no error feedback): ``add`` the
    per-sample losses of each micro-batch; after each step, ``released`` is that step's DP-noised mean loss."""

    def __init__(self, optimizer, *, bound: float = LOSS_BOUND, factor: float = LOSS_RELEASE_FACTOR):
        z = optimizer.noise_multiplier
        if not z > 0:
            raise ValueError(f"a DP loss release needs noise: found noise multiplier {z!r}")
        self.bound = bound
        self.noise_multiplier = factor * z
        optimizer.noise_multiplier = (z**-2 - self.noise_multiplier**-2) ** -0.5
        optimizer.mechanism_hooks.append(lambda opt, mechanism: mechanism.with_release(self.noise_multiplier))
        optimizer.step_callbacks.append(self._publish)
        self._clipped_sum = 0.0
        self.released: Optional[float] = None

    def add(self, losses: torch.Tensor) -> None:
        """Per-sample losses (B,) of a micro-batch of the current logical batch (private: only summed, clipped)."""
        self._clipped_sum += float(losses.detach().clamp(0, self.bound).sum())

    def _publish(self, optimizer, mechanism) -> None:
        world = distributed.rank_and_world()[1]
        std = self.noise_multiplier * self.bound / world**0.5  # this rank's share of the noise on the sum
        total = optimizer.release_noise(1, std) + self._clipped_sum  # (1,) float64
        if world > 1:
            (total,) = distributed.all_reduce_sum([total.to(optimizer.tracker.params[0].device)])
        self.released = float(total) / optimizer.expected_batch_size
        self._clipped_sum = 0.0
