import dataclasses

import pytest

from dptrain.accountants import (
    ComposedEvent, GaussianEvent, PoissonSampledEvent, PrivacyEvent, RDPAccountant, SelfComposedEvent,
    UnsupportedEventError, sampled_gaussian,
)


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


def test_ledger_expands_compositions_in_order_and_merges_repeats():
    g = GaussianEvent(2.0)
    event = ComposedEvent([SelfComposedEvent(PoissonSampledEvent(0.5, g), 3), g])
    assert isinstance(event.events, tuple)
    acc = RDPAccountant().compose(event, 2)
    assert acc.ledger == ((PoissonSampledEvent(0.5, g), 3), (g, 1)) * 2
    assert acc.history == [(2.0, 0.5, 3), (2.0, 1.0, 1)] * 2
    merged = RDPAccountant().compose(ComposedEvent([g, PoissonSampledEvent(1.0, g), SelfComposedEvent(g, 4)]))
    assert merged.ledger == ((g, 6),)  # sampling at rate 1 is the plain Gaussian: one event, not three


def test_sampled_gaussian_is_one_dp_sgd_step():
    assert sampled_gaussian(0.1, 1.5) == PoissonSampledEvent(0.1, GaussianEvent(1.5))
    assert sampled_gaussian(1, 1.5) == GaussianEvent(1.5)
    with pytest.raises(ValueError, match="sample_rate.*0"):
        sampled_gaussian(0, 1.0)


class _Laplace(PrivacyEvent):
    def __repr__(self):
        return "_Laplace()"


def test_unsupported_events_are_named_before_anything_is_composed():
    acc = RDPAccountant().step(noise_multiplier=1.0, sample_rate=0.1, steps=3)
    bad = ComposedEvent((GaussianEvent(1.0), SelfComposedEvent(_Laplace(), 2)))
    assert not acc.supports(bad) and not acc.supports("gaussian") and acc.supports(GaussianEvent(1.0))
    with pytest.raises(UnsupportedEventError, match=r"cannot compose _Laplace\(\) \(in ComposedEvent"):
        acc.compose(bad)
    assert acc.history == [(1.0, 0.1, 3)]  # the supported first part was not composed either
    assert issubclass(UnsupportedEventError, TypeError)
