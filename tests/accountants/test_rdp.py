"""RDP accountant against Opacus / dp_accounting at integer orders, quadrature at fractional orders."""

import math
import warnings

import numpy as np
import pytest
from scipy import integrate

from dptrain.accountants import DEFAULT_ORDERS, RDPAccountant, compute_rdp, rdp_to_epsilon

from ._suite import AccountantSuite


class TestRDPSuite(AccountantSuite):
    make = staticmethod(RDPAccountant)


SETTINGS = [(0.001, 5.0), (0.01, 1.1), (0.256, 1.5), (0.5, 0.7), (0.9, 3.0)]


@pytest.mark.parametrize("q,sigma", SETTINGS)
def test_integer_orders_match_opacus_and_dp_accounting(q, sigma):
    from dp_accounting.rdp import rdp_privacy_accountant as dpa
    from opacus.accountants.analysis import rdp as opacus_rdp

    orders = np.array([2.0, 3, 8, 17, 32, 64, 256])
    ours = compute_rdp(sample_rate=q, noise_multiplier=sigma, orders=orders)
    ref = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
    np.testing.assert_allclose(ours, ref, rtol=1e-9)
    ref2 = np.array([dpa._compute_rdp_poisson_subsampled_gaussian(q, sigma, [a])[0] for a in orders])
    np.testing.assert_allclose(ours, ref2, rtol=1e-9)


def _log_a_quadrature(alpha, q, sigma):
    """log E_{x~N(0,s^2)}[((1-q) + q e^{(2x-1)/(2s^2)})^alpha] by adaptive quadrature (independent oracle)."""

    def log_integrand(x):
        return (-x * x / (2 * sigma**2) - 0.5 * math.log(2 * math.pi * sigma**2)
                + alpha * np.logaddexp(math.log1p(-q), math.log(q) + (2 * x - 1) / (2 * sigma**2)))

    grid = np.linspace(-30 * sigma, 30 * sigma + alpha, 4001)
    values = log_integrand(grid)
    peak_x, peak = grid[np.argmax(values)], values.max()
    val, _ = integrate.quad(lambda x: math.exp(log_integrand(x) - peak), peak_x - 40 * sigma, peak_x + 40 * sigma,
                            points=[peak_x], epsabs=0, epsrel=1e-12, limit=500)
    return math.log(val) + peak


@pytest.mark.parametrize("q,sigma", SETTINGS + [(0.999, 0.5), (1e-4, 0.6)])
def test_fractional_orders_match_quadrature(q, sigma):
    orders = np.array([1.1, 1.5, 2.5, 4.3, 10.9])
    ours = compute_rdp(sample_rate=q, noise_multiplier=sigma, orders=orders)
    ref = np.array([_log_a_quadrature(a, q, sigma) / (a - 1) for a in orders])
    np.testing.assert_allclose(ours, ref, rtol=1e-7, atol=1e-13)


def test_q_one_is_the_plain_gaussian():
    np.testing.assert_allclose(compute_rdp(sample_rate=1.0, noise_multiplier=2.0), DEFAULT_ORDERS / 8.0)


def test_default_orders_span_the_issue_grid():
    assert DEFAULT_ORDERS[0] == pytest.approx(1.1) and DEFAULT_ORDERS[-1] >= 1024
    assert np.all(np.diff(DEFAULT_ORDERS) > 0)


def test_issue_figures():
    # q=0.001, sigma=5, 1000 steps: Opacus' orders stop at 63 (0.104); ours reach the large optimal order
    eps, order = RDPAccountant().step(noise_multiplier=5, sample_rate=0.001, steps=1000).get_epsilon_and_order(1e-5)
    assert 0.015 < eps <= 0.025 and order > 63
    # q=0.256, sigma=1.5, 3000 steps: optimum at a fractional order; dp_accounting's sign loss gives 118.2
    acc = RDPAccountant().step(noise_multiplier=1.5, sample_rate=0.256, steps=3000)
    eps, order = acc.get_epsilon_and_order(1e-5)
    assert eps == pytest.approx(97.85, abs=0.01) and order != round(order)
    integer_only = RDPAccountant(orders=np.arange(2, 257)).step(noise_multiplier=1.5, sample_rate=0.256, steps=3000)
    assert eps <= integer_only.get_epsilon(1e-5) < 118.2


@pytest.mark.parametrize("q,sigma,steps,delta", [(0.001, 5, 1000, 1e-5), (0.01, 1.0, 5000, 1e-6), (0.1, 0.8, 300, 1e-5)])
def test_never_above_opacus(q, sigma, steps, delta):
    from opacus.accountants import RDPAccountant as OpacusRDP

    opacus = OpacusRDP()
    opacus.history = [(sigma, q, steps)]
    ref = opacus.get_epsilon(delta)
    ours = RDPAccountant().step(noise_multiplier=sigma, sample_rate=q, steps=steps).get_epsilon(delta)
    assert ours <= ref * (1 + 1e-9)  # same or more orders: never above (up to float rounding)


def test_conversion_clamps_at_zero_and_warns_at_the_grid_edge():
    eps, _ = rdp_to_epsilon([2.0, 3.0], [0.0, 0.0], 0.5, warn=False)
    assert eps == 0.0
    acc = RDPAccountant(orders=[2.0, 3.0]).step(noise_multiplier=5.0, sample_rate=0.01, steps=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc.get_epsilon(1e-5)
    assert any("edge of the orders grid" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="orders"):
        RDPAccountant(orders=[0.5, 2])
