"""Privacy accounting for DP-SGD: privacy events, RDP and PLD accountants, calibration.

numpy/scipy only: importing this package never imports torch.
"""

__all__: list[str] = []
