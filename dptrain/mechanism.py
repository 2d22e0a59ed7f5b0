"""``StepMechanism``: what one logical step releases about its batch, built once per step.

The DP optimizer builds one immutable mechanism per logical step; the noise is drawn from it and the ledger
event is recorded from it, so the two can never disagree. Plugins (error feedback, the controller) change it
only through the optimizer's ``mechanism_hooks``, which return a modified copy.

The gradient release is the clipped sum plus N(0, noise_std^2 I); its sensitivity to one record is
``sensitivity`` for the adjacency of ``sampling``:
- ``"poisson"``: add/remove one record, each record in each batch with probability ``sample_rate``;
- ``"full"``: every step as a full-batch Gaussian mechanism, no amplification (error feedback's bound);
- ``"fixed"``: fixed batches from the loader's order, replace-one adjacency: a record is in exactly one batch
  per epoch, so only one step per epoch is charged (the engine's ledger does that).
Statistic releases of the SAME batch (``releases``: noise multipliers of Gaussian mechanisms with sensitivity 1)
are one Gaussian mechanism with the gradient on the same sample: multipliers combine as
z = (z_grad^-2 + sum_j z_j^-2)^(-1/2) (Andrew, Thakkar, McMahan, Ramaswamy 2021, Thm 1), subsampled once.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

from dptrain.accountants import GaussianEvent, PoissonSampledEvent, PrivacyEvent
from dptrain.validation import check_choice, check_nonnegative, check_positive

__all__ = ["StepMechanism", "SAMPLING_SCHEMES", "joint_noise_multiplier"]

SAMPLING_SCHEMES = ("poisson", "full", "fixed")


def joint_noise_multiplier(*multipliers: float) -> float:
    """The noise multiplier of several Gaussian mechanisms run on the same batch, as one mechanism."""
    if any(z == 0 for z in multipliers):
        return 0.0
    return sum(z**-2 for z in multipliers) ** -0.5


@dataclasses.dataclass(frozen=True)
class StepMechanism:
    """One logical step's release: Gaussian noise of std ``noise_std`` on a sum of sensitivity ``sensitivity``."""

    noise_std: float
    sensitivity: float
    sample_rate: float
    sampling: str = "poisson"
    releases: Tuple[float, ...] = ()  # noise multipliers of same-batch statistic releases (sensitivity 1 each)

    def __post_init__(self):
        check_choice("sampling", self.sampling, SAMPLING_SCHEMES)
        check_nonnegative("noise_std", self.noise_std)
        check_positive("sensitivity", self.sensitivity)
        object.__setattr__(self, "releases", tuple(float(z) for z in self.releases))

    @property
    def gradient_noise_multiplier(self) -> float:
        return self.noise_std / self.sensitivity

    @property
    def noise_multiplier(self) -> float:
        """Of the whole step (gradient and same-batch releases) as one Gaussian mechanism."""
        return joint_noise_multiplier(self.gradient_noise_multiplier, *self.releases)

    def with_release(self, noise_multiplier: float) -> "StepMechanism":
        """This mechanism plus a release of the same batch (a Gaussian with that multiplier, sensitivity 1)."""
        return dataclasses.replace(self, releases=self.releases + (float(noise_multiplier),))

    def event(self) -> PrivacyEvent:
        """The ledger event of one appearance of a record (for ``"fixed"``: its one batch of an epoch)."""
        gaussian = GaussianEvent(self.noise_multiplier)
        if self.sampling == "poisson" and self.sample_rate < 1:
            return PoissonSampledEvent(self.sample_rate, gaussian)
        return gaussian
