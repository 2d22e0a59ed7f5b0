"""The accountant protocol: a ledger of composed Gaussian steps and the methods every accountant shares."""

from __future__ import annotations

import abc

from ._validation import check_delta, check_noise_multiplier, check_sample_rate, check_steps
from .events import GaussianEvent, PoissonSampledEvent, PrivacyEvent, flatten_event

__all__ = ["Accountant"]


class Accountant(abc.ABC):
    """Composes privacy events into a ledger and converts it to (epsilon, delta).

    The ledger is a list of ``[noise_multiplier, sample_rate, steps]`` groups; consecutive identical steps
    are merged, so a run of T identical DP-SGD steps is one entry. ``state_dict()`` holds that ledger, so a
    resumed run reports exactly the epsilon it would have reported without the interruption.
    """

    name: str = "base"

    def __init__(self) -> None:
        self._ledger: list[list] = []

    # -- composing -------------------------------------------------------------------------------------
    def compose(self, event: PrivacyEvent, count: int = 1) -> "Accountant":
        """Add ``event`` repeated ``count`` times to the ledger; returns self."""
        if not isinstance(event, PrivacyEvent):
            raise TypeError(f"event must be a PrivacyEvent, found {type(event).__name__}")
        for sigma, q, steps in flatten_event(event, count):
            self._append(sigma, q, steps)
        return self

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> "Accountant":
        """Record ``steps`` DP-SGD steps with this noise multiplier and Poisson sample rate; returns self."""
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        self._append(sigma, q, check_steps(steps))
        return self

    def _append(self, sigma: float, q: float, steps: int) -> None:
        if steps == 0:
            return
        if self._ledger and self._ledger[-1][0] == sigma and self._ledger[-1][1] == q:
            self._ledger[-1][2] += steps
        else:
            self._ledger.append([sigma, q, steps])
        self._changed()

    def _changed(self) -> None:
        """Hook: the ledger changed (subclasses drop caches)."""

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The ledger as ``(noise_multiplier, sample_rate, steps)`` tuples, oldest first."""
        return [tuple(entry) for entry in self._ledger]

    @property
    def steps(self) -> int:
        """Total number of composed steps."""
        return sum(entry[2] for entry in self._ledger)

    def _no_privacy(self) -> bool:
        return any(sigma == 0 for sigma, _, _ in self._ledger)

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
        """The ledger and settings, as plain Python types."""
        return {"accountant": self.name, "history": [list(entry) for entry in self._ledger], **self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Replace the ledger with the one saved by ``state_dict()``."""
        if not isinstance(state, dict) or "history" not in state:
            raise ValueError(f"state must be a dict with a 'history' entry, found {type(state).__name__}")
        if state.get("accountant", self.name) != self.name:
            raise ValueError(f"state was saved by accountant {state.get('accountant')!r}, this is {self.name!r}")
        for key, value in self._config().items():
            if key in state and state[key] != value:
                raise ValueError(f"state has {key}={state[key]!r}, this accountant {key}={value!r}")
        ledger = []
        for entry in state["history"]:
            if len(entry) != 3:
                raise ValueError(f"history entries are [noise_multiplier, sample_rate, steps], found {entry!r}")
            sigma, q, steps = entry
            ledger.append([check_noise_multiplier(sigma), check_sample_rate(q), check_steps(steps)])
        self._ledger = []
        for sigma, q, steps in ledger:
            self._append(sigma, q, steps)
        self._changed()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, groups={len(self._ledger)})"


def _event_for(sigma: float, q: float) -> PrivacyEvent:
    """The event of one step (used by tests and docs)."""
    gaussian = GaussianEvent(sigma)
    return gaussian if q == 1 else PoissonSampledEvent(q, gaussian)


