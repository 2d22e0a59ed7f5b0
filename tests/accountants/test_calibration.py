"""calibrate / compute_epsilon / calibrate_noise / max_steps and the registry: contracts, oracles, bad input."""

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import optimize, special

from dptrain.accountants import (
    ACCOUNTANTS, ComposedEvent, GaussianEvent, RDPAccountant, SelfComposedEvent, TargetUnreachableError,
    accountant_names, calibrate, calibrate_noise, compute_epsilon, make_accountant, max_steps, register_accountant,
    sampled_gaussian,
)
from dptrain.accountants import registry


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("q,steps,delta,target", [(0.01, 2000, 1e-5, 2.0), (1e-3, 1000, 1e-6, 0.5)])
def test_calibrated_sigma_is_the_smallest_reaching_the_target(accountant, q, steps, delta, target):
    sigma = calibrate_noise(target_epsilon=target, sample_rate=q, steps=steps, delta=delta, accountant=accountant)
    eps = lambda s: compute_epsilon(sample_rate=q, noise_multiplier=s, steps=steps, delta=delta,  # noqa: E731
                                    accountant=accountant)
    assert eps(sigma) <= target
    assert eps(sigma * (1 - 2e-4)) > target


def test_pld_needs_less_noise_than_rdp():
    kwargs = dict(target_epsilon=1.0, sample_rate=0.01, steps=5000, delta=1e-5)
    assert calibrate_noise(**kwargs, accountant="pld") < calibrate_noise(**kwargs, accountant="rdp")


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_max_steps_is_the_last_step_under_the_target(accountant):
    kwargs = dict(sample_rate=0.02, noise_multiplier=1.0, delta=1e-5, accountant=accountant)
    n = max_steps(target_epsilon=1.5, **kwargs)
    assert n > 0
    assert compute_epsilon(steps=n, **kwargs) <= 1.5 < compute_epsilon(steps=n + 1, **kwargs)
    assert max_steps(target_epsilon=1e-6, **kwargs) == 0


def test_make_accountant_names():
    assert make_accountant("rdp").name == "rdp" and make_accountant("pld").name == "pld"
    with pytest.raises(ValueError, match=r"'prv'.*|.*\['pld', 'rdp'\]"):
        make_accountant("prv")


def test_registry_adds_names_and_refuses_a_taken_one():
    assert accountant_names() == ("pld", "rdp") and ACCOUNTANTS["rdp"] is RDPAccountant
    with pytest.raises(ValueError, match="'rdp' is taken by RDPAccountant"):
        register_accountant("rdp")(type("Other", (RDPAccountant,), {}))
    with pytest.raises(TypeError, match="Accountant subclass"):
        register_accountant("dict")(dict)
    coarse = register_accountant("rdp-coarse")(type("Coarse", (RDPAccountant,), {}))
    try:
        assert make_accountant("rdp-coarse").name == "rdp-coarse" and "rdp-coarse" in accountant_names()
        assert compute_epsilon(sample_rate=0.01, noise_multiplier=1.0, steps=100, delta=1e-5, accountant="rdp-coarse") \
            == compute_epsilon(sample_rate=0.01, noise_multiplier=1.0, steps=100, delta=1e-5)
    finally:
        registry._REGISTRY.pop("rdp-coarse")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(sample_rate=1.5), ValueError, "sample_rate.*1.5"),
        (dict(sample_rate=0), ValueError, "sample_rate"),
        (dict(noise_multiplier=-0.5), ValueError, "noise_multiplier.*-0.5"),
        (dict(delta=0.0), ValueError, "delta"),
        (dict(delta=1.0), ValueError, "delta"),
        (dict(steps=10.5), TypeError, "steps.*10.5"),
        (dict(steps=-3), ValueError, "steps.*-3"),
        (dict(steps=True), TypeError, "steps.*True"),
        (dict(accountant="moments"), ValueError, "moments"),
    ],
)
def test_compute_epsilon_bad_input(kwargs, error, match):
    args = dict(sample_rate=0.01, noise_multiplier=1.0, steps=100, delta=1e-5)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        compute_epsilon(**args)


def test_unreachable_or_bad_targets_raise():
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise(target_epsilon=1e-9, sample_rate=0.1, steps=100, delta=1e-5)
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise(target_epsilon=-1, sample_rate=0.1, steps=100, delta=1e-5)
    with pytest.raises(ValueError, match="noise_multiplier=0"):
        max_steps(target_epsilon=1.0, sample_rate=0.1, noise_multiplier=0.0, delta=1e-5)


def test_sigma_zero_and_zero_steps():
    assert compute_epsilon(sample_rate=0.1, noise_multiplier=0.0, steps=10, delta=1e-5) == float("inf")
    assert compute_epsilon(sample_rate=0.1, noise_multiplier=1.0, steps=0, delta=1e-5) == 0.0


def test_importing_accountants_does_not_import_torch():
    code = "import sys, dptrain.accountants; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _gdp_sigma(epsilon, delta, steps):
    """Exact sigma of ``steps`` Gaussian steps at (epsilon, delta): mu-GDP with mu = sqrt(steps) / sigma."""

    def gap(mu):
        upper = math.exp(epsilon + special.log_ndtr(-epsilon / mu - mu / 2))
        return special.ndtr(-epsilon / mu + mu / 2) - upper - delta

    return math.sqrt(steps) / optimize.brentq(gap, 1e-3, 100.0, xtol=1e-14, rtol=1e-14)


@pytest.mark.parametrize("epsilon,delta,steps", [(1.0, 1e-5, 10), (3.0, 1e-6, 200), (0.5, 1e-5, 1)])
def test_calibrate_matches_the_gaussian_closed_form(epsilon, delta, steps):
    exact = _gdp_sigma(epsilon, delta, steps)
    run = lambda sigma: SelfComposedEvent(GaussianEvent(sigma), steps)  # noqa: E731
    pld = calibrate(run, target_epsilon=epsilon, delta=delta, accountant="pld")
    rdp = calibrate(run, target_epsilon=epsilon, delta=delta, accountant="rdp")
    assert exact <= pld <= exact * (1 + 2e-3)  # PLD is a tight upper bound: a little more noise, never less
    assert pld < rdp


def test_calibrate_plans_on_a_copy_of_a_ledger_like_dp_accounting():
    """The rest of a run on top of a spent ledger, against dp_accounting's calibration at the same integer orders."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    orders = list(range(2, 65))
    spent = RDPAccountant(orders=orders).step(noise_multiplier=1.0, sample_rate=0.02, steps=100)
    before = spent.history
    rest = lambda sigma: SelfComposedEvent(sampled_gaussian(0.02, sigma), 300)  # noqa: E731
    ours = calibrate(rest, target_epsilon=3.0, delta=1e-5, accountant=spent.copy, rtol=1e-4)
    assert spent.history == before  # planning never touches the ledger
    def steps(sigma, count):
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(sigma)), count)

    ref = dp_accounting.calibrate_dp_mechanism(
        lambda: rdp_privacy_accountant.RdpAccountant(orders),
        lambda s: dp_accounting.ComposedDpEvent([steps(1.0, 100), steps(s, 300)]),
        3.0, 1e-5, bracket_interval=dp_accounting.ExplicitBracketInterval(0.1, 10.0), tol=1e-7,
    )
    assert ours == pytest.approx(ref, rel=1.5e-4) and ours >= ref * (1 - 1e-9)
    assert spent.copy().compose(rest(ours)).get_epsilon(1e-5) <= 3.0


def test_calibrate_search_limits():
    run = lambda sigma: SelfComposedEvent(sampled_gaussian(0.01, sigma), 100)  # noqa: E731
    assert calibrate(run, target_epsilon=50.0, delta=1e-5, lower=0.5, upper=5.0) == 0.5  # lower fits already
    with pytest.raises(TargetUnreachableError, match=r"unreachable with the rdp accountant.*noise_multiplier=5"):
        calibrate(run, target_epsilon=0.01, delta=1e-5, lower=0.5, upper=5.0)
    assert issubclass(TargetUnreachableError, ValueError)
    with pytest.raises(ValueError, match="lower=2.0, upper=1.0"):
        calibrate(run, target_epsilon=1.0, delta=1e-5, lower=2.0, upper=1.0)
    with pytest.raises(ValueError, match="guess must be a finite number > 0, found 0"):
        calibrate(run, target_epsilon=1.0, delta=1e-5, guess=0)
    with pytest.raises(TypeError, match="accountant must be a name or a callable"):
        calibrate(run, target_epsilon=1.0, delta=1e-5, accountant=3)
    with pytest.raises(ValueError, match="'moments'"):
        calibrate(run, target_epsilon=1.0, delta=1e-5, accountant="moments")


@pytest.mark.parametrize("guess", [1e-3, 0.3, 1.0, 40.0])
def test_calibrate_result_does_not_depend_on_the_guess(guess):
    def run(sigma):
        return ComposedEvent((SelfComposedEvent(sampled_gaussian(0.05, sigma), 50), GaussianEvent(4 * sigma)))

    sigmas = [calibrate(run, target_epsilon=2.0, delta=1e-5, guess=g, rtol=1e-4) for g in (1.0, guess)]
    np.testing.assert_allclose(sigmas[1], sigmas[0], rtol=1e-4)
