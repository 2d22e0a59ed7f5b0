"""PLD accountant: connect-the-dots discretisation, the exact Gaussian-DP closed form, dp_accounting PLD, RDP."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import optimize, special

from dptrain.accountants import PLDAccountant, RDPAccountant
from dptrain.accountants._pld_math import step_pld, true_delta

from ._suite import AccountantSuite


class TestPLDSuite(AccountantSuite):
    make = staticmethod(PLDAccountant)


@pytest.mark.parametrize("q,sigma,direction", [(0.01, 1.0, "remove"), (0.01, 1.0, "add"), (1.0, 0.7, "remove"),
                                               (0.3, 2.0, "add")])
def test_one_step_is_exact_on_the_grid_and_above_between(q, sigma, direction):
    h = 1e-3
    pld = step_pld(q, sigma, h, direction)
    assert pld.probs.sum() + pld.inf_mass == pytest.approx(1.0, abs=1e-12)
    for k in (0, 5, 50, 300, 1000):
        on, between = k * h, (k + 0.5) * h
        exact_on = true_delta(on, q, sigma, direction)
        assert pld.get_delta(on) == pytest.approx(exact_on, rel=1e-8, abs=1e-18)
        assert pld.get_delta(between) >= true_delta(between, q, sigma, direction) * (1 - 1e-9)


def _gdp_epsilon(delta, mu):
    """Exact epsilon of mu-GDP: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""

    def gap(eps):
        return special.ndtr(-eps / mu + mu / 2) - math.exp(eps + special.log_ndtr(-eps / mu - mu / 2)) - delta

    return optimize.brentq(gap, 0.0, mu * mu + 40 * mu + 10, xtol=1e-13, rtol=1e-14)


@pytest.mark.parametrize("sigma,steps,delta", [(5.0, 200_000, 1e-5), (1.0, 100, 1e-6), (2.0, 1000, 1e-7),
                                               (0.5, 1, 1e-5)])
def test_q_one_matches_the_gaussian_dp_closed_form(sigma, steps, delta):
    exact = _gdp_epsilon(delta, math.sqrt(steps) / sigma)
    acc = PLDAccountant().step(noise_multiplier=sigma, sample_rate=1.0, steps=steps)
    ours = acc.get_epsilon(delta)
    # stated guarantee: an upper bound, at most T*h above; in practice within 0.1%
    assert exact <= ours <= exact + steps * acc.grid_interval()
    assert ours == pytest.approx(exact, rel=1e-3)
    rdp = RDPAccountant().step(noise_multiplier=sigma, sample_rate=1.0, steps=steps).get_epsilon(delta)
    assert rdp >= exact


def _dp_accounting_pld(q, sigma, steps, delta, h):
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=h)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


FAST = [(1e-3, 5.0, 1000, 1e-5, 1e-6), (0.256, 1.5, 3000, 1e-5, 1e-3)]
SLOW = [(1e-3, 1.0, 10_000, 1e-5, 1e-4), (0.01, 1.0, 10_000, 1e-6, 1e-4), (0.1, 2.0, 5000, 1e-5, 1e-4),
        (0.5, 3.0, 20_000, 1e-7, 1e-3), (1e-4, 5.0, 200_000, 1e-7, 1e-6), (1e-4, 0.5, 200_000, 1e-5, 1e-4)]


@pytest.mark.parametrize("q,sigma,steps,delta,h", FAST + [pytest.param(*s, marks=pytest.mark.slow) for s in SLOW])
def test_within_0p3_percent_of_dp_accounting_pld(q, sigma, steps, delta, h):
    ref = _dp_accounting_pld(q, sigma, steps, delta, h)
    ours = PLDAccountant().step(noise_multiplier=sigma, sample_rate=q, steps=steps).get_epsilon(delta)
    assert ours == pytest.approx(ref, rel=3e-3)


def test_get_delta_inverts_get_epsilon_and_error_terms_are_tiny():
    acc = PLDAccountant().step(noise_multiplier=1.0, sample_rate=0.01, steps=2000)
    for delta in (1e-5, 1e-7):
        eps = acc.get_epsilon(delta)
        assert acc.get_delta(eps) == pytest.approx(delta, rel=1e-6)
    report = acc.error_report()
    assert max(report["slack"]) <= 1e-12 and max(report["inf_mass"]) <= 1e-12
    assert acc.get_delta(0.0) > acc.get_delta(1.0) > acc.get_delta(3.0)


def test_issue_small_epsilon_setting_is_below_rdp():
    pld = PLDAccountant().step(noise_multiplier=5, sample_rate=0.001, steps=1000).get_epsilon(1e-5)
    rdp = RDPAccountant().step(noise_multiplier=5, sample_rate=0.001, steps=1000).get_epsilon(1e-5)
    assert 0 < pld < rdp


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    q=st.floats(1e-3, 1.0),
    sigma=st.floats(0.6, 5.0),
    steps=st.integers(1, 3000),
    log_delta=st.floats(-7.0, -5.0),
)
def test_pld_never_above_rdp(q, sigma, steps, log_delta):
    delta = 10.0**log_delta
    pld = PLDAccountant().step(noise_multiplier=sigma, sample_rate=q, steps=steps).get_epsilon(delta)
    rdp = RDPAccountant().step(noise_multiplier=sigma, sample_rate=q, steps=steps).get_epsilon(delta)
    assert pld <= rdp * (1 + 1e-9) + 1e-12


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="value_discretization_interval"):
        PLDAccountant(value_discretization_interval=0.0)
    with pytest.raises(ValueError, match="resolution"):
        PLDAccountant(resolution=5)
    with pytest.raises(ValueError, match="epsilon"):
        PLDAccountant().step(noise_multiplier=1, sample_rate=0.1).get_delta(-1.0)


def test_fixed_interval_is_used_and_saved():
    acc = PLDAccountant(value_discretization_interval=1e-3).step(noise_multiplier=1, sample_rate=0.1, steps=10)
    assert acc.grid_interval() == 1e-3
    assert acc.state_dict()["value_discretization_interval"] == 1e-3
    with pytest.raises(ValueError, match="value_discretization_interval"):
        PLDAccountant().load_state_dict(acc.state_dict())
    assert np.isfinite(acc.get_epsilon(1e-5))
