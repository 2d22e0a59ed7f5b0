"""Privacy events: small frozen dataclasses describing what a mechanism released.

An accountant composes events; it supports the Gaussian mechanism, optionally Poisson-subsampled, and
self-compositions and compositions of those (the shape of every DP-SGD run).
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
    "flatten_event",
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


def flatten_event(event: PrivacyEvent, count: int = 1) -> list[tuple[float, float, int]]:
    """The ledger entries ``(noise_multiplier, sample_rate, steps)`` of ``event`` repeated ``count`` times.

    Raises ``TypeError`` for events the accountants cannot handle (e.g. sampling a composition).
    """
    count = check_steps(count, "count")
    if isinstance(event, GaussianEvent):
        return [(event.noise_multiplier, 1.0, count)] if count else []
    if isinstance(event, PoissonSampledEvent):
        if not isinstance(event.event, GaussianEvent):
            raise TypeError(
                "PoissonSampledEvent must wrap a GaussianEvent for these accountants, "
                f"found {type(event.event).__name__}"
            )
        return [(event.event.noise_multiplier, event.sample_rate, count)] if count else []
    if isinstance(event, SelfComposedEvent):
        return flatten_event(event.event, event.count * count)
    if isinstance(event, ComposedEvent):
        once = [entry for inner in event.events for entry in flatten_event(inner, 1)]
        return once * count
    raise TypeError(f"unsupported privacy event {type(event).__name__}")
