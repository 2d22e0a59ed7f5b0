"""The SAC agent on its own: learns a contextual bandit with a known optimum; checkpoint round trip."""

import numpy as np
import pytest
import torch

from dptrain.control.sac import SAC, ReplayBuffer


def optimum(s):
    return np.array([0.5 * s[0], -0.3])  # the best action depends on the observation in one coordinate


def train_bandit(seed, steps=300, warmup=30):
    """Contextual 1-step bandit: s ~ U[-1, 1], reward -(a - a*(s))^2, episode ends after one action."""
    agent = SAC(1, 2, seed=seed, hidden=(32, 32), batch_size=64)
    rng = np.random.default_rng(seed + 100)
    for i in range(steps):
        s = rng.uniform(-1, 1, 1)
        a = agent.act(s) if i >= warmup else agent.random_action()
        assert np.all(np.abs(a) <= 1)
        agent.store(s, a, -np.sum((a - optimum(s)) ** 2), s, True)
        if i >= warmup:
            agent.update()
    return agent


def greedy_error(agent):
    return max(np.abs(agent.act([s], deterministic=True) - optimum([s])).max() for s in np.linspace(-1, 1, 9))


def test_sac_learns_contextual_bandit_optimum():
    agent = SAC(1, 2, seed=0, hidden=(32, 32))
    before = greedy_error(agent)
    agent = train_bandit(seed=0)
    after = greedy_error(agent)
    assert agent.updates == 270
    assert after < 0.15, f"greedy action {after:.3f} away from the optimum after 270 updates (untrained: {before:.3f})"
    assert after < before / 2
    # automatic temperature: the entropy target -dim(a) pulls alpha down from its initial 0.1 as the policy sharpens
    assert agent.alpha < 0.1


def test_squashed_log_prob_matches_change_of_variables():
    """log pi(a) of the tanh-squashed Gaussian equals the Normal log-density of atanh(a) minus log|d tanh/du|."""
    agent = SAC(3, 2, seed=1)
    obs = torch.randn(5, 3)
    g = torch.Generator().manual_seed(0)
    a, logp = agent.actor.sample(obs, g)
    mu, log_std = agent.actor(obs)
    u = torch.atanh(a.double().clamp(-1 + 1e-12, 1 - 1e-12))
    normal = torch.distributions.Normal(mu.double(), log_std.double().exp())
    expected = (normal.log_prob(u) - torch.log1p(-torch.tanh(u) ** 2)).sum(-1)
    torch.testing.assert_close(logp.double(), expected, atol=1e-3, rtol=1e-4)


def test_state_dict_round_trip_continues_identically():
    a1 = train_bandit(seed=3, steps=40, warmup=30)
    a2 = SAC(1, 2, seed=99, hidden=(32, 32), batch_size=64)
    a2.load_state_dict(a1.state_dict())
    for _ in range(3):
        a1.update(), a2.update()
    obs = [0.2]
    np.testing.assert_array_equal(a1.act(obs), a2.act(obs))
    np.testing.assert_array_equal(a1.act(obs, deterministic=True), a2.act(obs, deterministic=True))


def test_replay_buffer_wraps_around():
    buf = ReplayBuffer(1, 1, capacity=3)
    for i in range(5):
        buf.add([i], [0], float(i), [i], False)
    assert len(buf) == 3 and sorted(buf.rew.tolist()) == [2.0, 3.0, 4.0]


@pytest.mark.parametrize("kwargs", [{"obs_dim": 0}, {"act_dim": -1}, {"gamma": 1.0}, {"tau": 0.0}, {"lr": -1.0}])
def test_bad_agent_settings(kwargs):
    args = {"obs_dim": 2, "act_dim": 1, **kwargs}
    with pytest.raises(ValueError, match=str(list(kwargs.values())[0])):
        SAC(args.pop("obs_dim"), args.pop("act_dim"), **args)
