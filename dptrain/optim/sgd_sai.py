"""SGD-SaI (Xu, Xiang, Cai, Wen, arXiv 2412.11768): SGD-momentum with a per-tensor g-SNR learning-rate scale.

Per parameter tensor: ``m_t = mu_t m_{t-1} + (1 - mu_t) g_t`` and
``p <- p (1 - lr wd) - lr * gsnr * m_t`` with ``gsnr = ||x||_2 / (std(x) + eps)`` (population std over the
tensor's entries; tensors with a single entry use gsnr = 1).

The paper measures gsnr once, on the first gradient (x = g_1). Under DP the first privatised gradient is
mostly Gaussian noise: for pure noise ``||g|| / std(g) ~ sqrt(numel)`` whatever the signal, so the scale
would carry no information. Here, during the first K = ``snr_warmup_steps`` steps the momentum buffer is the
exact running mean of the gradients (``mu_t = 1 - 1/t``, so ``m_t = mean(g_1..g_t)``), gsnr is re-estimated
on it at each of those steps (x = m_t) and frozen at step K; afterwards ``mu_t = momentum``. The DP noise is
independent across steps, so its variance in the mean falls as 1/K while the signal, which moves slowly
early in training, stays: the frozen gsnr is that of a denoised gradient. This costs no memory beyond the
momentum buffer. With K = 1 gsnr is the paper's (computed on g_1); the only other difference from the
paper's EMA ``m_t = mu m_{t-1} + (1 - mu) g_t`` is that warm-up steps use the unbiased mean instead of the
zero-initialised EMA (so the first step is ``lr * gsnr * g_1``, not ``lr * gsnr * (1 - mu) g_1``).

Every tensor, matrix or not, gets this rule (the method's own fallback); state = one buffer per tensor,
i.e. half of AdamW's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dptrain.validation import check_fraction, check_positive_int

from ._base import LowMemoryOptimizer

__all__ = ["SGDSaI", "gradient_snr"]


def gradient_snr(x: Tensor, eps: float) -> Tensor:
    """``||x||_2 / (std(x) + eps)`` over all entries (population std); 1 for single-entry tensors."""
    if x.numel() < 2:
        return torch.ones((), dtype=torch.float32, device=x.device)
    xf = x.float()
    return xf.norm() / (xf.std(unbiased=False) + eps)


class SGDSaI(LowMemoryOptimizer):
    """SGD-momentum with g-SNR learning-rate scaling at initialisation, made robust to DP noise.

    Args:
        lr: learning rate (the effective per-tensor step is ``lr * gsnr``; gsnr ~ sqrt(numel)).
        momentum: mu in [0, 1).
        weight_decay: decoupled weight decay.
        eps: added to the std in the g-SNR.
        snr_warmup_steps: K, the number of first steps whose gradients are averaged (exactly) in the
            momentum buffer and on whose mean gsnr is measured before it is frozen (1 = the paper's rule).
            Under DP use K >> 1: the noise variance in the estimate falls as 1/K.
    """

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 eps: float = 1e-8, *, snr_warmup_steps: int = 10) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps,
                        snr_warmup_steps=snr_warmup_steps)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_fraction("momentum", group["momentum"], closed_right=False)
        check_positive_int("snr_warmup_steps", group["snr_warmup_steps"])

    def _matrix_direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> Tensor:
        return self._sai_direction(grad, state, group)

    def _vector_direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> Tensor:
        return self._sai_direction(grad, state, group)

    @staticmethod
    def _sai_direction(grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        step = state["step"]
        warming_up = step <= group["snr_warmup_steps"]
        buf.lerp_(grad, 1.0 / step if warming_up else 1.0 - group["momentum"])  # m <- mu_t m + (1 - mu_t) g
        if warming_up:
            state["gsnr"] = gradient_snr(buf, group["eps"])
        return buf * state["gsnr"].to(buf.dtype)
