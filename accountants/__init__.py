"""Privacy accounting for DP-SGD: privacy events, RDP and PLD accountants, calibration.

numpy/scipy only: importing this package never imports torch.
"""

from ._base import Accountant
from .calibration import ACCOUNTANTS, calibrate_noise, compute_epsilon, make_accountant, max_steps
from .events import ComposedEvent, GaussianEvent, PoissonSampledEvent, PrivacyEvent, SelfComposedEvent
from .pld import PLDAccountant
from .rdp import DEFAULT_ORDERS, RDPAccountant, compute_rdp, rdp_to_epsilon

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
    "calibrate_noise",
    "compute_epsilon",
    "compute_rdp",
    "make_accountant",
    "max_steps",
    "rdp_to_epsilon",
]
