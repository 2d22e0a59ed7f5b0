"""Privacy accounting for DP-SGD: privacy events, RDP and PLD accountants, calibration.

numpy/scipy only: importing this package never imports torch.
"""

from ._base import Accountant, UnsupportedEventError
from .calibration import TargetUnreachableError, calibrate, calibrate_noise, compute_epsilon, max_steps
from .events import (
    ComposedEvent, GaussianEvent, PoissonSampledEvent, PrivacyEvent, SelfComposedEvent, sampled_gaussian,
)
from .pld import PLDAccountant
from .rdp import DEFAULT_ORDERS, RDPAccountant, compute_rdp, rdp_to_epsilon
from .registry import ACCOUNTANTS, accountant_names, check_accountant, make_accountant, register_accountant

__all__ = [
    "Accountant",
    "ACCOUNTANTS",
    "ComposedEvent",
    "DEFAULT_ORDERS",
    "GaussianEvent",
    "PLDAccountant",
    "PoissonSampledEvent",
    "PrivacyEvent",
    "RDPAccountant",
    "SelfComposedEvent",
    "TargetUnreachableError",
    "UnsupportedEventError",
    "accountant_names",
    "calibrate",
    "calibrate_noise",
    "check_accountant",
    "compute_epsilon",
    "compute_rdp",
    "make_accountant",
    "max_steps",
    "rdp_to_epsilon",
    "register_accountant",
    "sampled_gaussian",
]
