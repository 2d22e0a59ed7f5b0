"""The sigma floor of the budget guard: feasible, minimal, and composed over a heterogeneous ledger."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dptrain.accountants import GaussianEvent, PoissonSampledEvent, RDPAccountant
from dptrain.control import BudgetExhaustedError, planned_epsilon, sigma_floor

DELTA = 1e-5


def _ledger(spent):
    acc = RDPAccountant()
    for sigma, steps in spent:
        acc.step(noise_multiplier=sigma, sample_rate=0.02, steps=steps)
    return acc


@settings(max_examples=8, deadline=None)
@given(spent=st.lists(st.tuples(st.floats(0.8, 3.0), st.integers(1, 50)), max_size=3),
       steps=st.integers(30, 300), releases=st.integers(0, 30), target=st.floats(1.0, 8.0))
def test_floor_is_the_smallest_sigma_that_fits(spent, steps, releases, target):
    acc = _ledger(spent)
    before = acc.history
    kw = dict(delta=DELTA, sample_rate=0.02, steps=steps, release_noise_multiplier=2.0, releases=releases)
    try:
        floor = sigma_floor(acc, target_epsilon=target, sigma_max=50.0, **kw)
    except BudgetExhaustedError:  # then even sigma_max overspends
        assert planned_epsilon(acc, noise_multiplier=50.0, **kw) > target
        return
    assert acc.history == before  # probing never touches the real ledger
    assert planned_epsilon(acc, noise_multiplier=floor, **kw) <= target
    if floor > 1.001e-3:  # not at the bottom of the search range
        assert planned_epsilon(acc, noise_multiplier=floor / 1.02, **kw) > target  # minimal to rtol = 1%


def test_planned_epsilon_composes_release_steps_as_joint_mechanisms():
    acc = _ledger([(1.5, 10)])
    eps = planned_epsilon(acc, DELTA, sample_rate=0.02, noise_multiplier=1.1, steps=40, release_noise_multiplier=2.0,
                          releases=5)
    manual = _ledger([(1.5, 10)])
    manual.compose(PoissonSampledEvent(0.02, GaussianEvent(1.1)), count=35)
    joint = (1.1**-2 + 2.0**-2) ** -0.5  # gradient and statistics of the same batch: one Gaussian (closed form)
    manual.compose(PoissonSampledEvent(0.02, GaussianEvent(joint)), count=5)
    assert math.isclose(eps, manual.get_epsilon(DELTA), rel_tol=1e-12)
    steps_only = planned_epsilon(acc, DELTA, sample_rate=0.02, noise_multiplier=1.1, steps=40)
    assert steps_only < eps
    with pytest.raises(ValueError, match="releases"):
        planned_epsilon(acc, DELTA, sample_rate=0.02, noise_multiplier=1.1, steps=3, release_noise_multiplier=2.0,
                        releases=4)


def test_no_steps_left_gives_floor_zero_or_an_error():
    acc = _ledger([(1.0, 100)])
    assert sigma_floor(acc, target_epsilon=100.0, delta=DELTA, sample_rate=0.02, steps=0, sigma_max=5.0) == 0.0
    with pytest.raises(BudgetExhaustedError, match="target_epsilon=0.1"):
        sigma_floor(acc, target_epsilon=0.1, delta=DELTA, sample_rate=0.02, steps=0, sigma_max=5.0)
    with pytest.raises(ValueError, match="sigma_max must be > 0, found 0"):
        sigma_floor(acc, target_epsilon=1.0, delta=DELTA, sample_rate=0.02, steps=3, sigma_max=0)
