"""The abstract test suite every accountant inherits (subclasses set ``make``)."""

import json
import math

import pytest

from dptrain.accountants import (
    ComposedEvent, GaussianEvent, PoissonSampledEvent, SelfComposedEvent, UnsupportedEventError,
)


def sampled(q, sigma):
    return PoissonSampledEvent(q, GaussianEvent(sigma))


class AccountantSuite:
    """Properties that hold for any sound accountant of the subsampled Gaussian."""

    make = None  # set by subclasses: () -> Accountant

    def eps(self, q, sigma, steps, delta=1e-5):
        return self.make().step(noise_multiplier=sigma, sample_rate=q, steps=steps).get_epsilon(delta)

    def test_empty_ledger_is_free_and_sigma_zero_is_not_private(self):
        assert self.make().get_epsilon(1e-5) == 0.0
        assert math.isinf(self.eps(0.01, 0.0, 10))

    @pytest.mark.parametrize("q,sigma", [(0.01, 1.0), (0.2, 2.0)])
    def test_epsilon_increases_with_steps_and_decreases_with_sigma(self, q, sigma):
        by_steps = [self.eps(q, sigma, t) for t in (10, 100, 1000)]
        assert by_steps[0] < by_steps[1] < by_steps[2]
        by_sigma = [self.eps(q, s, 100) for s in (sigma, 1.3 * sigma, 1.8 * sigma)]
        assert by_sigma[0] > by_sigma[1] > by_sigma[2]

    def test_state_dict_round_trip_continues_exactly(self):
        acc = self.make()
        acc.step(noise_multiplier=1.0, sample_rate=0.02, steps=300)
        acc.compose(sampled(0.05, 1.5), 40)
        state = json.loads(json.dumps(acc.state_dict()))  # plain types only
        restored = self.make()
        restored.load_state_dict(state)
        assert restored.history == acc.history
        assert restored.get_epsilon(1e-6) == acc.get_epsilon(1e-6)
        for a in (acc, restored):
            a.step(noise_multiplier=0.9, sample_rate=0.02, steps=25)
        assert restored.get_epsilon(1e-6) == acc.get_epsilon(1e-6)

    def test_events_and_steps_give_the_same_ledger(self):
        by_events = self.make().compose(
            ComposedEvent((SelfComposedEvent(sampled(0.01, 1.0), 200), sampled(0.05, 2.0))), count=2
        )
        by_steps = self.make()
        for _ in range(2):
            for _ in range(200):
                by_steps.step(noise_multiplier=1.0, sample_rate=0.01)
            by_steps.step(noise_multiplier=2.0, sample_rate=0.05)
        assert by_events.history == by_steps.history == [(1.0, 0.01, 200), (2.0, 0.05, 1)] * 2
        assert by_events.get_epsilon(1e-5) == by_steps.get_epsilon(1e-5)

    def test_heterogeneous_composition_equals_composing_groups(self):
        groups = [(1.0, 0.01, 300), (2.0, 0.1, 50), (0.8, 0.005, 200)]
        forward, backward = self.make(), self.make()
        for sigma, q, n in groups:
            forward.step(noise_multiplier=sigma, sample_rate=q, steps=n)
        for sigma, q, n in reversed(groups):
            backward.compose(SelfComposedEvent(sampled(q, sigma), n))
        assert forward.get_epsilon(1e-5) == pytest.approx(backward.get_epsilon(1e-5), rel=2e-3)
        # one group alone costs less than all of them, all of them less than the worst group's sigma throughout
        assert self.eps(0.01, 1.0, 300) < forward.get_epsilon(1e-5) < self.eps(0.1, 0.8, 550)

    @pytest.mark.parametrize(
        "kwargs, error",
        [
            (dict(noise_multiplier=1.0, sample_rate=1.5), ValueError),
            (dict(noise_multiplier=1.0, sample_rate=0.0), ValueError),
            (dict(noise_multiplier=-1.0, sample_rate=0.1), ValueError),
            (dict(noise_multiplier=float("nan"), sample_rate=0.1), ValueError),
            (dict(noise_multiplier=1.0, sample_rate=0.1, steps=-1), ValueError),
            (dict(noise_multiplier=1.0, sample_rate=0.1, steps=2.5), TypeError),
            (dict(noise_multiplier=1.0, sample_rate=0.1, steps=True), TypeError),
        ],
    )
    def test_bad_step_input_raises_naming_the_value(self, kwargs, error):
        with pytest.raises(error, match="found"):
            self.make().step(**kwargs)

    @pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2])
    def test_bad_delta_raises(self, delta):
        acc = self.make().step(noise_multiplier=1.0, sample_rate=0.1, steps=3)
        with pytest.raises(ValueError, match="delta"):
            acc.get_epsilon(delta)

    def test_compose_rejects_non_events_and_load_rejects_bad_state(self):
        with pytest.raises(TypeError, match="PrivacyEvent, found str"):
            self.make().compose("gaussian")
        sampled_composition = PoissonSampledEvent(0.1, ComposedEvent((GaussianEvent(1.0),)))
        assert not self.make().supports(sampled_composition)
        with pytest.raises(UnsupportedEventError, match="cannot compose PoissonSampledEvent"):
            self.make().compose(sampled_composition)
        with pytest.raises(ValueError, match="'accountant'"):
            self.make().load_state_dict({"history": [[1.0, 0.2, 3]]})
        state = self.make().state_dict()
        with pytest.raises(ValueError, match="sample_rate.*2.0"):
            self.make().load_state_dict({**state, "history": [[1.0, 2.0, 3]]})
        with pytest.raises(ValueError, match="saved by accountant 'other'"):
            self.make().load_state_dict({**state, "accountant": "other"})

    def test_supports_the_dp_sgd_event_shapes(self):
        step = sampled(0.01, 1.0)
        for event in (GaussianEvent(1.0), step, SelfComposedEvent(step, 10), ComposedEvent((step, GaussianEvent(2.0)))):
            assert self.make().supports(event)

    def test_copy_is_independent_and_replay_rebuilds_the_ledger(self):
        acc = self.make().step(noise_multiplier=1.0, sample_rate=0.02, steps=100)
        eps = acc.get_epsilon(1e-5)
        trial = acc.copy().step(noise_multiplier=0.8, sample_rate=0.02, steps=50)
        assert acc.history == [(1.0, 0.02, 100)] and acc.get_epsilon(1e-5) == eps
        assert trial.history == [(1.0, 0.02, 100), (0.8, 0.02, 50)] and trial.get_epsilon(1e-5) > eps
        replayed = self.make().replay(trial.ledger)
        assert replayed.ledger == trial.ledger and replayed.get_epsilon(1e-5) == trial.get_epsilon(1e-5)
