"""compute_epsilon / calibrate_noise / max_steps: the contracts and their bad-input errors."""

import subprocess
import sys

import pytest

from dptrain.accountants import calibrate_noise, compute_epsilon, make_accountant, max_steps


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


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sample_rate=1.5), "sample_rate.*1.5"),
        (dict(sample_rate=0), "sample_rate"),
        (dict(noise_multiplier=-0.5), "noise_multiplier.*-0.5"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(steps=10.5), "steps.*10.5"),
        (dict(steps=-3), "steps.*-3"),
        (dict(steps=True), "steps.*True"),
        (dict(accountant="moments"), "moments"),
    ],
)
def test_compute_epsilon_bad_input(kwargs, match):
    args = dict(sample_rate=0.01, noise_multiplier=1.0, steps=100, delta=1e-5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
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
