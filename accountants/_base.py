"""The accountant protocol: a ledger of privacy events and the methods every accountant shares."""

from __future__ import annotations

import abc
import copy
from typing import Iterable, Optional

from ._validation import check_delta, check_steps
from .events import ComposedEvent, GaussianEvent, PoissonSampledEvent, PrivacyEvent, SelfComposedEvent, sampled_gaussian

__all__ = ["Accountant", "UnsupportedEventError"]


class UnsupportedEventError(TypeError):
    """An accountant was asked to compose a privacy event it cannot account for."""


def _unsupported_part(event: PrivacyEvent) -> Optional[PrivacyEvent]:
    """The first part of ``event`` these accountants cannot compose; None when they support all of it."""
    if isinstance(event, GaussianEvent):
        return None
    if isinstance(event, PoissonSampledEvent):
        return None if isinstance(event.event, GaussianEvent) else event
    if isinstance(event, SelfComposedEvent):
        return _unsupported_part(event.event)
    if isinstance(event, ComposedEvent):
        return next((part for part in map(_unsupported_part, event.events) if part is not None), None)
    return event


def _step_groups(event: PrivacyEvent, count: int) -> list[tuple[PrivacyEvent, int]]:
    """A supported ``event`` repeated ``count`` times, as (one-step event, count) groups in order."""
    if count == 0:
        return []
    if isinstance(event, GaussianEvent):
        return [(event, count)]
    if isinstance(event, PoissonSampledEvent):  # q = 1 is the plain Gaussian: one canonical event for both
        return [(sampled_gaussian(event.sample_rate, event.event.noise_multiplier), count)]
    if isinstance(event, SelfComposedEvent):
        return _step_groups(event.event, event.count * count)
    once = [group for inner in event.events for group in _step_groups(inner, 1)]
    return once * count


def _step_parameters(event: PrivacyEvent) -> tuple[float, float]:
    """(noise_multiplier, sample_rate) of a one-step event of the ledger."""
    if isinstance(event, GaussianEvent):
        return event.noise_multiplier, 1.0
    return event.event.noise_multiplier, event.sample_rate


class Accountant(abc.ABC):
    """Composes privacy events into a ledger and converts it to (epsilon, delta).

    The ledger holds one-step events (a ``GaussianEvent``, or a ``PoissonSampledEvent`` of one) with their
    counts, oldest first; consecutive identical steps are merged, so T identical DP-SGD steps are one entry.
    ``state_dict()`` saves it, so a resumed run reports exactly the epsilon it would have reported.
    """

    name: str = "base"  # set by register_accountant

    def __init__(self) -> None:
        self._ledger: list[tuple[PrivacyEvent, int]] = []

    # -- composing -------------------------------------------------------------------------------------
    def supports(self, event) -> bool:
        """Whether ``compose(event)`` can account for ``event``."""
        return isinstance(event, PrivacyEvent) and _unsupported_part(event) is None

    def compose(self, event: PrivacyEvent, count: int = 1) -> "Accountant":
        """Add ``event`` repeated ``count`` times to the ledger; returns self."""
        if not isinstance(event, PrivacyEvent):
            raise TypeError(f"event must be a PrivacyEvent, found {type(event).__name__}")
        count = check_steps(count, "count")
        part = _unsupported_part(event)
        if part is not None:
            raise UnsupportedEventError(
                f"the {self.name} accountant cannot compose {part!r} (in {event!r}); it supports GaussianEvent, "
                "a PoissonSampledEvent of a GaussianEvent, and (self-)compositions of those"
            )
        for step, n in _step_groups(event, count):
            self._append(step, n)
        return self

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> "Accountant":
        """Record ``steps`` DP-SGD steps with this noise multiplier and Poisson sample rate; returns self."""
        return self.compose(sampled_gaussian(sample_rate, noise_multiplier), check_steps(steps))

    def replay(self, ledger: Iterable[tuple[PrivacyEvent, int]]) -> "Accountant":
        """Compose every ``(event, count)`` of ``ledger`` (e.g. another accountant's ``.ledger``); returns self."""
        for event, count in ledger:
            self.compose(event, count)
        return self

    def copy(self) -> "Accountant":
        """An independent accountant with the same settings and ledger (composing onto it leaves this one alone)."""
        twin = copy.copy(self)
        twin._ledger = list(self._ledger)
        return twin

    def _append(self, event: PrivacyEvent, count: int) -> None:
        if count == 0:
            return
        if self._ledger and self._ledger[-1][0] == event:
            self._ledger[-1] = (event, self._ledger[-1][1] + count)
        else:
            self._ledger.append((event, count))
        self._changed()

    def _changed(self) -> None:
        """Hook: the ledger changed (subclasses drop caches)."""

    # -- reading the ledger -----------------------------------------------------------------------------
    @property
    def ledger(self) -> tuple[tuple[PrivacyEvent, int], ...]:
        """The composed one-step events with their counts, oldest first."""
        return tuple(self._ledger)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The ledger as ``(noise_multiplier, sample_rate, count)`` tuples (sample rate 1: not subsampled)."""
        return [(*_step_parameters(event), count) for event, count in self._ledger]

    @property
    def steps(self) -> int:
        """Total number of composed steps."""
        return sum(count for _, count in self._ledger)

    def _no_privacy(self) -> bool:
        return any(sigma == 0 for sigma, _, _ in self.history)

    # -- conversion ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def get_epsilon(self, delta: float) -> float:
        """Smallest epsilon this accountant certifies at ``delta`` (inf when some step had sigma = 0)."""

    def _check_delta(self, delta) -> float:
        return check_delta(delta)

    # -- checkpointing ---------------------------------------------------------------------------------
    def _config(self) -> dict:
        """Settings that change the numbers (saved and checked on load)."""
        return {}

    def state_dict(self) -> dict:
        """The settings and the ledger as plain Python types (``history``: [noise_multiplier, sample_rate, count])."""
        return {"accountant": self.name, "history": [list(row) for row in self.history], **self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Replace the ledger with the one saved by ``state_dict()`` (same accountant, same settings)."""
        if not isinstance(state, dict) or "history" not in state or "accountant" not in state:
            raise ValueError(f"state must be a dict from state_dict() with 'accountant' and 'history', found {state!r}")
        if state["accountant"] != self.name:
            raise ValueError(f"state was saved by accountant {state['accountant']!r}, this is {self.name!r}")
        for key, value in self._config().items():
            if key not in state or state[key] != value:
                raise ValueError(f"state has {key}={state.get(key)!r}, this accountant {key}={value!r}")
        ledger = []
        for row in state["history"]:
            if len(row) != 3:
                raise ValueError(f"history rows are [noise_multiplier, sample_rate, count], found {row!r}")
            sigma, q, count = row
            ledger.append((sampled_gaussian(q, sigma), check_steps(count, "count")))
        self._ledger = []
        for event, count in ledger:
            self._append(event, count)
        self._changed()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, groups={len(self._ledger)})"
