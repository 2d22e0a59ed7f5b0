"""The controller's parts on their own: budget plan and guard, action space, releases, checkpoint records."""

import math

import numpy as np
import pytest
import torch

from dptrain.accountants import PLDAccountant, RDPAccountant
from dptrain.control import BudgetExhaustedError, planned_epsilon
from dptrain.control.planning import BudgetPlan
from dptrain.control.policy import ActionSpace
from dptrain.control.release import StatisticReleases
from dptrain.control.state import LastAction
from dptrain.mechanism import StepMechanism

DELTA = 1e-5


def _plan(accountant, total_steps=24, interval=5):
    return BudgetPlan(accountant, target_epsilon=3.0, delta=DELTA, total_steps=total_steps, interval=interval,
                      sample_rate=0.125, release_sigma=2.0)


@pytest.mark.parametrize("total,interval", [(24, 5), (24, 4), (7, 1), (3, 10)])
def test_release_counts_match_counting_release_steps(total, interval):
    plan = _plan(RDPAccountant(), total, interval)
    release_steps = [done for done in range(1, total + 1) if plan.is_release_step(done)]
    assert release_steps == [k * interval for k in range(1, total) if k * interval < total]
    assert plan.releases_planned == len(release_steps)
    for done in range(total + 2):
        assert plan.releases_after(done) == sum(step > done for step in release_steps)


def test_pld_ledgers_are_planned_on_an_rdp_replay():
    ledger = PLDAccountant().step(noise_multiplier=1.2, sample_rate=0.125, steps=5)
    ledger.step(noise_multiplier=0.9, sample_rate=0.125, steps=2)
    replay = _plan(ledger).planning_accountant()
    assert isinstance(replay, RDPAccountant) and replay.ledger == ledger.ledger
    assert replay.get_epsilon(DELTA) == RDPAccountant().step(noise_multiplier=1.2, sample_rate=0.125, steps=5).step(
        noise_multiplier=0.9, sample_rate=0.125, steps=2).get_epsilon(DELTA)
    rdp = RDPAccountant()
    assert _plan(rdp).planning_accountant() is rdp  # RDP ledgers are read in place


def test_floor_fits_and_the_guard_refuses_only_what_does_not():
    ledger = RDPAccountant().step(noise_multiplier=1.5, sample_rate=0.125, steps=4)
    plan = _plan(ledger)
    floor = plan.floor(4, 50.0, guess=1.0)
    rest = dict(sample_rate=0.125, steps=20, release_noise_multiplier=2.0, releases=plan.releases_after(4))
    assert planned_epsilon(ledger, DELTA, noise_multiplier=floor, **rest) <= 3.0
    assert planned_epsilon(ledger, DELTA, noise_multiplier=floor / 1.01, **rest) > 3.0
    plan.planned_sigma = floor
    plan.check_step(4, floor)  # covered by the plan: no error
    with pytest.raises(BudgetExhaustedError, match=r"step 5 at sigma=.* > target_epsilon=3.0"):
        plan.check_step(4, floor / 2)
    with pytest.raises(BudgetExhaustedError, match="cannot cover"):
        plan.floor(4, 0.1, guess=0.05)
    assert ledger.history == [(1.5, 0.125, 4)]  # planning never composes onto the engine's ledger


def test_action_space_maps_actions_in_closed_form():
    space = ActionSpace(max_factor=2.0, quantile_target=0.5, quantile_lr=0.2, min_clip=0.01, max_clip=3.0,
                        sigma_min=0.5, sigma_max=2.0)
    assert space.sigma(np.array([0.0, -1.0]), floor=0.1) == pytest.approx(0.5)
    assert space.sigma(np.array([0.0, 1.0]), floor=0.1) == pytest.approx(2.0)
    assert space.sigma(np.array([0.0, 0.0]), floor=0.1) == pytest.approx(1.0)  # geometric middle
    assert space.sigma(np.array([0.0, -1.0]), floor=0.8) == 0.8  # never below the floor
    norms = space.thresholds(np.array([1.0, -1.0, 0.0]), [1.0, 1.0], unclipped=[0.5, 1.7])
    assert norms == pytest.approx([2.0, 0.5 * math.exp(-0.2 * 0.5)])  # fractions clipped to [0, 1]
    assert space.thresholds(np.array([1.0, 0.0]), [2.0], unclipped=[0.0]) == [3.0]  # max_clip


def test_release_rides_on_the_step_mechanism_and_is_checked():
    releases = StatisticReleases(num_groups=2, expected_batch_size=40.0, loss_bound=5.0)
    assert releases.noise_std == 2.0 and releases.noise_multiplier == pytest.approx(2.0 / math.sqrt(3))
    step = StepMechanism(noise_std=1.0, sensitivity=1.0, sample_rate=0.1)
    joint = releases.add_to(step)
    releases.check_carried(joint, 4)
    assert joint.noise_multiplier == pytest.approx((1.0 + 0.75) ** -0.5)
    with pytest.raises(RuntimeError, match="step 4's mechanism does not carry"):
        releases.check_carried(step, 4)
    releases.observe_losses(torch.tensor([-1.0, 2.0, 9.0]))
    assert releases.loss_sum == 7.0  # clipped to [0, 5]
    releases.reset()
    assert releases.loss_sum == 0.0
    with pytest.raises(ValueError, match="1-D tensor"):
        releases.observe_losses(torch.ones(2, 2))


def test_last_action_round_trips_as_named_fields():
    last = LastAction(obs=np.arange(3.0), action=np.array([0.5, -1.0]), loss=None, epsilon=1.25)
    state = last.to_dict()
    assert sorted(state) == ["action", "epsilon", "loss", "obs"]
    back = LastAction.from_dict(state)
    np.testing.assert_array_equal(back.obs, last.obs)
    assert back.loss is None and back.epsilon == 1.25
