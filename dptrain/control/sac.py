"""Soft Actor-Critic (Haarnoja et al. 2018, "SAC: algorithms and applications"), small and CPU-friendly.

Parts, as in the paper:
- actor: a Gaussian over pre-squash actions u ~ N(mu(s), std(s)^2), squashed a = tanh(u) into [-1, 1]^d;
  its log-density carries the change-of-variables term -sum_j log(1 - tanh(u_j)^2);
- twin Q critics Q1, Q2 with Polyak-averaged target copies; the soft Bellman target is
  y = r + gamma (1 - done) (min_k Qk_target(s', a') - alpha log pi(a'|s')), a' ~ pi(.|s');
- actor loss E[alpha log pi(a|s) - min_k Qk(s, a)] with the reparametrised a;
- automatic temperature: loss -log(alpha) E[log pi(a|s) + H_target], H_target = -dim(action);
- a uniform replay buffer.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dptrain.validation import check_fraction, check_positive, check_positive_int

__all__ = ["SAC", "ReplayBuffer"]

_LOG_STD_MIN, _LOG_STD_MAX = -5.0, 2.0


@contextlib.contextmanager
def _one_thread():
    """Tiny networks: intra-op threading costs more than it saves (10-50x slower on a busy 2-core CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _mlp(d_in: int, d_out: int, hidden: Sequence[int]) -> nn.Sequential:
    layers, d = [], d_in
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class ReplayBuffer:
    """Fixed-capacity ring buffer of transitions (s, a, r, s', done)."""

    def __init__(self, obs_dim: int, act_dim: int, capacity: int):
        self.capacity = check_positive_int("capacity", capacity)
        self.obs = np.zeros((self.capacity, obs_dim), np.float32)
        self.act = np.zeros((self.capacity, act_dim), np.float32)
        self.rew = np.zeros((self.capacity,), np.float32)
        self.next_obs = np.zeros((self.capacity, obs_dim), np.float32)
        self.done = np.zeros((self.capacity,), np.float32)
        self.size, self.pos = 0, 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs, act, rew: float, next_obs, done: bool) -> None:
        i = self.pos
        self.obs[i], self.act[i], self.rew[i], self.next_obs[i], self.done[i] = obs, act, rew, next_obs, float(done)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> Dict[str, torch.Tensor]:
        idx = rng.integers(0, self.size, size=batch_size)
        return {
            "obs": torch.from_numpy(self.obs[idx]),  # (N, obs_dim)
            "act": torch.from_numpy(self.act[idx]),  # (N, act_dim)
            "rew": torch.from_numpy(self.rew[idx]),  # (N,)
            "next_obs": torch.from_numpy(self.next_obs[idx]),  # (N, obs_dim)
            "done": torch.from_numpy(self.done[idx]),  # (N,)
        }

    def state_dict(self) -> dict:
        n = self.size
        return {"obs": self.obs[:n].copy(), "act": self.act[:n].copy(), "rew": self.rew[:n].copy(),
                "next_obs": self.next_obs[:n].copy(), "done": self.done[:n].copy(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        n = len(state["rew"])
        if n > self.capacity:
            raise ValueError(f"saved buffer holds {n} transitions, capacity is {self.capacity}")
        for key in ("obs", "act", "rew", "next_obs", "done"):
            getattr(self, key)[:n] = state[key]
        self.size, self.pos = n, int(state["pos"]) % self.capacity


class _Actor(nn.Module):
    """s -> (mu, log_std) of the pre-squash Gaussian."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], init_log_std: float = 0.0):
        super().__init__()
        self.body = _mlp(obs_dim, 2 * act_dim, hidden)
        with torch.no_grad():  # initial exploration width
            self.body[-1].bias[act_dim:] += init_log_std

    def forward(self, obs: torch.Tensor):
        mu, log_std = self.body(obs).chunk(2, dim=-1)  # (N, act_dim) each
        return mu, log_std.clamp(_LOG_STD_MIN, _LOG_STD_MAX)

    def sample(self, obs: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Reparametrised squashed sample a = tanh(mu + std * eps) and its log-density log pi(a|s)."""
        mu, log_std = self(obs)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)  # (N, act_dim)
        u = mu + log_std.exp() * eps
        gauss_logp = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)  # (N,)
        # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u|
        squash = (2 * (math.log(2.0) - u - F.softplus(-2 * u))).sum(-1)  # (N,)
        return torch.tanh(u), gauss_logp - squash


class SAC:
    """Soft Actor-Critic agent for continuous actions in [-1, 1]^act_dim.

    ``act(obs)`` samples (or with ``deterministic=True`` returns tanh(mu)); ``store(...)`` adds a transition;
    ``update()`` runs one gradient step of critics, actor and temperature, then the Polyak update.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        *,
        hidden: Sequence[int] = (64, 64),
        lr: float = 3e-3,
        gamma: float = 0.9,
        tau: float = 0.02,
        batch_size: int = 64,
        buffer_size: int = 10_000,
        init_alpha: float = 0.1,
        init_log_std: float = 0.0,
        seed: Optional[int] = None,
    ):
        for name, value in (("obs_dim", obs_dim), ("act_dim", act_dim), ("batch_size", batch_size)):
            check_positive_int(name, value)
        check_fraction("gamma", gamma, closed_right=False)
        check_fraction("tau", tau, closed_right=True)
        check_positive("lr", lr)
        check_positive("init_alpha", init_alpha)
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.gamma, self.tau, self.batch_size = gamma, tau, batch_size
        self.target_entropy = -float(act_dim)
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        with torch.random.fork_rng(devices=[]):  # initialise the networks from our seed, not the global RNG
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
            self.actor = _Actor(obs_dim, act_dim, hidden, init_log_std)
            self.q1 = _mlp(obs_dim + act_dim, 1, hidden)
            self.q2 = _mlp(obs_dim + act_dim, 1, hidden)
        self.q1_target, self.q2_target = copy.deepcopy(self.q1), copy.deepcopy(self.q2)
        for p in list(self.q1_target.parameters()) + list(self.q2_target.parameters()):
            p.requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(init_alpha), requires_grad=True)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_opt = torch.optim.Adam(list(self.q1.parameters()) + list(self.q2.parameters()), lr=lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=lr)
        self.buffer = ReplayBuffer(obs_dim, act_dim, buffer_size)
        self.updates = 0

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    def act(self, obs, deterministic: bool = False) -> np.ndarray:
        """One action in [-1, 1]^act_dim for one observation."""
        obs = torch.as_tensor(np.asarray(obs, np.float32)).reshape(1, self.obs_dim)  # (1, obs_dim)
        with torch.no_grad(), _one_thread():
            if deterministic:
                action = torch.tanh(self.actor(obs)[0])
            else:
                action, _ = self.actor.sample(obs, self.generator)
        return action[0].numpy().astype(np.float64)

    def random_action(self) -> np.ndarray:
        """Uniform action (exploration warm-up)."""
        return self.rng.uniform(-1.0, 1.0, size=self.act_dim)

    def store(self, obs, act, reward: float, next_obs, done: bool) -> None:
        self.buffer.add(obs, act, reward, next_obs, done)

    def _q(self, nets, obs, act) -> torch.Tensor:
        x = torch.cat([obs, act], dim=-1)  # (N, obs_dim + act_dim)
        return torch.min(nets[0](x), nets[1](x)).squeeze(-1)  # (N,)

    def update(self) -> Dict[str, float]:
        """One SAC gradient step on a replay mini-batch; returns the three losses and alpha."""
        if len(self.buffer) == 0:
            raise ValueError("update() needs at least one stored transition")
        with _one_thread():
            return self._update()

    def _update(self) -> Dict[str, float]:
        b = self.buffer.sample(self.batch_size, self.rng)
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_act, next_logp = self.actor.sample(b["next_obs"], self.generator)
            next_q = self._q((self.q1_target, self.q2_target), b["next_obs"], next_act)  # (N,)
            target = b["rew"] + self.gamma * (1 - b["done"]) * (next_q - alpha * next_logp)  # (N,)
        x = torch.cat([b["obs"], b["act"]], dim=-1)
        critic_loss = F.mse_loss(self.q1(x).squeeze(-1), target) + F.mse_loss(self.q2(x).squeeze(-1), target)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()

        act, logp = self.actor.sample(b["obs"], self.generator)
        q = self._q((self.q1, self.q2), b["obs"], act)
        actor_loss = (alpha * logp - q).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()

        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad()
        alpha_loss.backward()
        self.alpha_opt.step()

        with torch.no_grad():
            for net, target_net in ((self.q1, self.q1_target), (self.q2, self.q2_target)):
                for p, tp in zip(net.parameters(), target_net.parameters()):
                    tp.mul_(1 - self.tau).add_(p, alpha=self.tau)
        self.updates += 1
        return {"critic_loss": critic_loss.item(), "actor_loss": actor_loss.item(),
                "alpha_loss": alpha_loss.item(), "alpha": self.alpha}

    def state_dict(self) -> dict:
        """A deep copy (torch optimizers share their 'step' tensors with the state they return)."""
        return copy.deepcopy({
            "actor": self.actor.state_dict(), "q1": self.q1.state_dict(), "q2": self.q2.state_dict(),
            "q1_target": self.q1_target.state_dict(), "q2_target": self.q2_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(), "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(), "alpha_opt": self.alpha_opt.state_dict(),
            "buffer": self.buffer.state_dict(), "generator": self.generator.get_state(),
            "rng": self.rng.bit_generator.state, "updates": self.updates,
        })

    def load_state_dict(self, state: dict) -> None:
        for name in ("actor", "q1", "q2", "q1_target", "q2_target", "actor_opt", "critic_opt", "alpha_opt", "buffer"):
            getattr(self, name).load_state_dict(state[name])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.generator.set_state(state["generator"])
        self.rng.bit_generator.state = state["rng"]
        self.updates = int(state["updates"])
