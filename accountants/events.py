"""Privacy events: small frozen dataclasses describing what a mechanism released (dp_accounting's model).

An accountant composes events; ``Accountant.supports(event)`` says which. Both accountants here support the
Gaussian mechanism, optionally Poisson-subsampled, and self-compositions and compositions of those (the shape
of every DP-SGD run).
"""

from __future__ import annotations

import dataclasses

from ._validation import check_noise_multiplier, check_sample_rate, check_steps

__all__ = [
    "PrivacyEvent",
    "GaussianEvent",
    "PoissonSampledEvent",
    "SelfComposedEvent",
    "ComposedEvent",
    "sampled_gaussian",
]


class PrivacyEvent:
    """Base class of all privacy events."""


@dataclasses.dataclass(frozen=True)
class GaussianEvent(PrivacyEvent):
    """Gaussian mechanism with L2 sensitivity 1 and noise std ``noise_multiplier`` (0: no privacy)."""

    noise_multiplier: float

    def __post_init__(self):
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier(self.noise_multiplier))


@dataclasses.dataclass(frozen=True)
class PoissonSampledEvent(PrivacyEvent):
    """``event`` run on a Poisson sample that includes each record with probability ``sample_rate``."""

    sample_rate: float
    event: PrivacyEvent

    def __post_init__(self):
        object.__setattr__(self, "sample_rate", check_sample_rate(self.sample_rate))
        if not isinstance(self.event, PrivacyEvent):
            raise TypeError(f"event must be a PrivacyEvent, found {type(self.event).__name__}")


@dataclasses.dataclass(frozen=True)
class SelfComposedEvent(PrivacyEvent):
    """``event`` repeated ``count`` times."""

    event: PrivacyEvent
    count: int

    def __post_init__(self):
        if not isinstance(self.event, PrivacyEvent):
            raise TypeError(f"event must be a PrivacyEvent, found {type(self.event).__name__}")
        check_steps(self.count, "count")


@dataclasses.dataclass(frozen=True)
class ComposedEvent(PrivacyEvent):
    """The events in ``events``, one after the other."""

    events: tuple

    def __post_init__(self):
        if isinstance(self.events, PrivacyEvent) or not hasattr(self.events, "__iter__"):
            raise TypeError(f"events must be a sequence of PrivacyEvent, found {type(self.events).__name__}")
        events = tuple(self.events)
        for event in events:
            if not isinstance(event, PrivacyEvent):
                raise TypeError(f"events must hold PrivacyEvent instances, found {type(event).__name__}")
        object.__setattr__(self, "events", events)


def sampled_gaussian(sample_rate: float, noise_multiplier: float) -> PrivacyEvent:
    """One DP-SGD step: a Gaussian of ``noise_multiplier``, Poisson-sampled unless ``sample_rate`` is 1."""
    gaussian = GaussianEvent(noise_multiplier)
    return gaussian if check_sample_rate(sample_rate) == 1 else PoissonSampledEvent(sample_rate, gaussian)
