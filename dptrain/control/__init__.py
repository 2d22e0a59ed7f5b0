"""Adaptive clip/noise control: a Soft Actor-Critic hyper-policy that stays inside the privacy budget.

- ``SACController``: attached with ``make_private(..., controller=ctrl)`` (``controller.py``), built from
  its budget plan and guard (``planning.py`` over ``budget.py``), its noisy statistic releases (``release.py``),
  its policy (``policy.py``, the SAC agent of ``sac.py``) and its checkpoint (``state.py``).
- ``sigma_floor`` / ``planned_epsilon``: the budget guard (privacy filter) over an accountant's ledger.
"""

from dptrain.control.budget import BudgetExhaustedError, planned_epsilon, planned_event, sigma_floor
from dptrain.control.controller import SACController
from dptrain.control.release import release_noise_multiplier
from dptrain.control.sac import SAC, ReplayBuffer

__all__ = [
    "SAC",
    "ReplayBuffer",
    "SACController",
    "BudgetExhaustedError",
    "planned_epsilon",
    "planned_event",
    "sigma_floor",
    "release_noise_multiplier",
]
