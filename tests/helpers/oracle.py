"""The batch-size-1 oracle: per-sample gradients by one ordinary backward per sample ("obviously correct, but slow")."""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn


def per_sample_grads(model: nn.Module, loss_of_sample: Callable[[nn.Module, int], torch.Tensor], batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """[{param name: gradient of sample i's own loss}] computed on an untouched deep copy of ``model``."""
    reference = copy.deepcopy(model)
    names = {id(p): n for n, p in reference.named_parameters() if p.requires_grad}
    params = [p for p in reference.parameters() if p.requires_grad]
    out = []
    for i in range(batch_size):
        grads = torch.autograd.grad(loss_of_sample(reference, i), params, allow_unused=True)
        out.append({names[id(p)]: (g if g is not None else torch.zeros_like(p)).double() for p, g in zip(params, grads)})
    return out


def clipped_sum(grads: List[Dict[str, torch.Tensor]], groups: Sequence[Sequence[str]], thresholds: Sequence[float]) -> Dict[str, torch.Tensor]:
    """sum_i of each sample's gradient clipped group-wise: factor min(1, C_g / (||g_i,g|| + 1e-6))."""
    total = {n: torch.zeros_like(g) for n, g in grads[0].items()}
    for g_i in grads:
        for names, c in zip(groups, thresholds):
            norm = torch.sqrt(sum(g_i[n].pow(2).sum() for n in names))
            factor = min(1.0, c / (float(norm) + 1e-6))
            for n in names:
                total[n] += factor * g_i[n]
    return total


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-12))
