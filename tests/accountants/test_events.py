import dataclasses

import pytest

from dptrain.accountants import ComposedEvent, GaussianEvent, PoissonSampledEvent, SelfComposedEvent
from dptrain.accountants.events import flatten_event


def test_events_are_frozen_and_validated():
    event = PoissonSampledEvent(0.1, GaussianEvent(1.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.sample_rate = 0.2
    with pytest.raises(ValueError, match="sample_rate.*1.5"):
        PoissonSampledEvent(1.5, GaussianEvent(1.0))
    with pytest.raises(ValueError, match="noise_multiplier.*-1"):
        GaussianEvent(-1)
    with pytest.raises(ValueError, match="count"):
        SelfComposedEvent(GaussianEvent(1.0), -2)
    with pytest.raises(TypeError):
        ComposedEvent((GaussianEvent(1.0), 3))


def test_flatten_expands_compositions_in_order():
    g = GaussianEvent(2.0)
    event = ComposedEvent([SelfComposedEvent(PoissonSampledEvent(0.5, g), 3), g])
    assert isinstance(event.events, tuple)
    assert flatten_event(event, 2) == [(2.0, 0.5, 3), (2.0, 1.0, 1)] * 2
