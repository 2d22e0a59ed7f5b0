"""The controller's checkpoint: its parts' states in one plain dict, checked against the run on load.

The checkpoint holds the agent (networks, replay buffer, generator states) and the released history; it is
written into the engine's SECRET state (the engine's noise and sampler states sit next to it).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import numpy as np

__all__ = ["LastAction", "controller_state", "history_entry", "load_controller_state"]


@dataclasses.dataclass
class LastAction:
    """The last action and what it was taken on: the next interval's reward is measured against it."""

    obs: np.ndarray
    action: np.ndarray
    loss: Optional[float]
    epsilon: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> "LastAction":
        return cls(**state)


def history_entry(optimizer, done: int, *, reward, epsilon, floor, released, loss, action) -> dict:
    """One row of ``SACController.history``: what the controller released and chose after ``done`` steps."""
    return {
        "step": done,
        "noise_multiplier": optimizer.noise_multiplier,
        "max_grad_norm": [g.max_norm for g in optimizer.tracker.groups],
        "reward": reward,
        "epsilon": epsilon,
        "sigma_floor": floor,
        "clip_fraction": None if released is None else [1 - b for b in released.unclipped_fraction],
        "loss": loss,
        "action": None if action is None else [float(a) for a in action],
    }


def _settings(controller) -> dict:
    """What must match between the run that saved and the run that loads."""
    return {"interval": controller.interval, "total_steps": controller.total_steps,
            "num_groups": controller.num_groups}


def controller_state(controller) -> dict:
    """A deep copy of everything an attached controller needs to continue exactly."""
    if controller.engine is None:
        raise ValueError("state_dict() before attach(): nothing to save")
    return copy.deepcopy({
        "settings": _settings(controller), "history": controller.history,
        "policy": controller.hyper.state_dict(), "plan": controller.plan.state_dict(),
        "sigma_bounds": (controller.actions.sigma_min, controller.actions.sigma_max),
    })


def load_controller_state(controller, state: dict) -> None:
    """Restores ``controller_state``'s dict into an attached controller of the same run settings."""
    if controller.engine is None:
        raise ValueError("load_state_dict() needs attach() first (make_private with this controller)")
    mine = _settings(controller)
    if state["settings"] != mine:
        raise ValueError(f"checkpoint controller settings {state['settings']} differ from this run's {mine}")
    state = copy.deepcopy(state)
    controller.hyper.load_state_dict(state["policy"])
    controller.plan.load_state_dict(state["plan"])
    sigma_min, sigma_max = state["sigma_bounds"]
    controller.actions = dataclasses.replace(controller.actions, sigma_min=sigma_min, sigma_max=sigma_max)
    controller.history = state["history"]
