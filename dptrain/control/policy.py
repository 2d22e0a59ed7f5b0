"""The controller's policy: observation -> action -> new clip thresholds and sigma, learned online by SAC.

Observation (dim 2G + 5 for G clipping groups): the released unclipped fraction b_g per group (PRIVATE, released
with noise: ``release.py``), log(C_g / C_g at attach), log(sigma / sigma_ref), log(sigma_floor / sigma_ref),
epsilon spent / target, steps done / planned (PUBLIC) and the loss relative to the first one observed (a
public validation loss, or the noisy released training loss).

Action in [-1, 1]^(G+1): C_g <- clip(C_g * q_g * max_factor^a_g, min_clip, max_clip), with
q_g = exp(-quantile_lr * (clip(b_g, 0, 1) - quantile_target)) the geometric quantile step of Andrew et al. on
the released b_g (post-processing; q_g = 1 with ``quantile_target=None``), so the action is a learned correction
around private adaptive clipping; sigma <- max(sigma_floor, exp(log sigma_min + (a_G + 1)/2 * log(sigma_max /
sigma_min))).

Reward of the interval that just ended: loss improvement per unit of epsilon spent,
    r = clip( ((L_prev - L) / |L_first|) / max((eps - eps_prev) / (target_epsilon / K), 0.1), -10, 10 )
with K the planned number of intervals (spending the budget uniformly gives a denominator near 1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from dptrain.control.sac import SAC
from dptrain.control.state import LastAction

__all__ = ["ActionSpace", "HyperPolicy"]


@dataclasses.dataclass(frozen=True)
class ActionSpace:
    """How an action in [-1, 1]^(G+1) moves the G clip thresholds and sigma."""

    max_factor: float
    quantile_target: Optional[float]
    quantile_lr: float
    min_clip: float
    max_clip: float
    sigma_min: float
    sigma_max: float

    def thresholds(self, action: np.ndarray, norms: Sequence[float], unclipped: Sequence[float]) -> List[float]:
        """New thresholds from the current ones and the released unclipped fractions."""
        factors = self.max_factor ** np.asarray(action[: len(norms)])
        if self.quantile_target is not None:  # Andrew et al.'s geometric step on the released fractions
            factors = factors * np.exp(-self.quantile_lr * (np.clip(unclipped, 0.0, 1.0) - self.quantile_target))
        return [float(np.clip(c * f, self.min_clip, self.max_clip)) for c, f in zip(norms, factors)]

    def sigma(self, action: np.ndarray, floor: float) -> float:
        """The sigma the last coordinate asks for, never below the budget's floor."""
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return max(math.exp(lo + (float(action[-1]) + 1) / 2 * (hi - lo)), floor)


class HyperPolicy:
    """Chooses actions with the SAC agent (or a fixed ``policy`` map) and trains it on interval rewards."""

    def __init__(self, agent: SAC, *, fixed: Optional[Callable[[np.ndarray], Sequence[float]]], warmup: int,
                 updates_per_action: int, target_epsilon: float, intervals: int, sigma_ref: float,
                 initial_max_norms: Sequence[float]):
        self.agent, self.fixed = agent, fixed
        self.warmup, self.updates_per_action = warmup, updates_per_action
        self.target_epsilon, self.fair_epsilon = target_epsilon, target_epsilon / max(1, intervals)
        self.sigma_ref, self.initial_max_norms = sigma_ref, list(initial_max_norms)
        self.loss_scale: Optional[float] = None  # |first loss observed|
        self.last: Optional[LastAction] = None

    def observation(self, *, unclipped: Sequence[float], norms: Sequence[float], sigma: float, floor: float,
                    epsilon: float, progress: float, loss: Optional[float]) -> np.ndarray:
        """The observation vector (2G + 5,); records the loss scale at the first loss seen."""
        if loss is not None and self.loss_scale is None:
            self.loss_scale = max(abs(loss), 1e-8)
        loss_feature = 0.0 if loss is None or self.loss_scale is None else loss / self.loss_scale - 1
        obs = (
            [min(max(b, -0.5), 1.5) for b in unclipped]
            + [math.log(c / c0) for c, c0 in zip(norms, self.initial_max_norms)]
            + [math.log(sigma / self.sigma_ref), math.log(max(floor, 1e-3 * self.sigma_ref) / self.sigma_ref),
               epsilon / self.target_epsilon, progress, max(min(loss_feature, 5.0), -5.0)]
        )
        return np.asarray(obs, np.float64)

    def step(self, obs: np.ndarray, loss: Optional[float], epsilon: float) -> Tuple[np.ndarray, Optional[float]]:
        """Learn from the interval that just ended, then choose the next action: (action, reward or None)."""
        reward = None
        if self.last is not None:
            reward = self._reward(self.last, loss, epsilon)
            self.agent.store(self.last.obs, self.last.action, reward, obs, False)
            if self.fixed is None:
                for _ in range(self.updates_per_action):
                    self.agent.update()
        action = self._choose(obs)
        self.last = LastAction(obs=obs, action=action, loss=loss, epsilon=epsilon)
        return action, reward

    def _reward(self, last: LastAction, loss: Optional[float], epsilon: float) -> float:
        if loss is None or last.loss is None:
            return 0.0
        improvement = (last.loss - loss) / self.loss_scale
        spent = max(epsilon - last.epsilon, 0.0) / self.fair_epsilon
        return float(np.clip(improvement / max(spent, 0.1), -10.0, 10.0))

    def _choose(self, obs: np.ndarray) -> np.ndarray:
        if self.fixed is not None:
            action = np.asarray(self.fixed(obs), np.float64).reshape(-1)
            if action.shape != (self.agent.act_dim,):
                raise ValueError(f"policy must return {self.agent.act_dim} values, found shape {action.shape}")
            return np.clip(action, -1.0, 1.0)
        if len(self.agent.buffer) < self.warmup:
            return self.agent.random_action()
        return self.agent.act(obs)

    def state_dict(self) -> dict:
        return {"agent": self.agent.state_dict(), "last_action": None if self.last is None else self.last.to_dict(),
                "loss_scale": self.loss_scale, "sigma_ref": self.sigma_ref, "initial_max_norms": self.initial_max_norms}

    def load_state_dict(self, state: dict) -> None:
        self.agent.load_state_dict(state["agent"])
        self.last = None if state["last_action"] is None else LastAction.from_dict(state["last_action"])
        self.loss_scale, self.sigma_ref = state["loss_scale"], state["sigma_ref"]
        self.initial_max_norms = list(state["initial_max_norms"])
