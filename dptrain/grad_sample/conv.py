"""``nn.Conv1d`` / ``nn.Conv2d`` (groups = 1, zero padding): a convolution is a linear layer on unfolded
patches, G_i = g_i^T unfold(x_i) with g_i: (L, C_out) and unfold(x_i): (L, C_in * prod(kernel)).
Other configurations go to the torch.func fallback.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from dptrain.grad_sample.contributions import Factored, Instantiated
from dptrain.grad_sample.registry import register_rule
from dptrain.grad_sample.rules_base import HookRule

__all__ = ["ConvRule"]


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(HookRule):
    def supports(self, module):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)

    def contributions(self, module, x, g):
        if x.dim() == 3:  # treat (B, C, L) as a (B, C, 1, L) image
            x, g = x.unsqueeze(2), g.unsqueeze(2)
            kernel, stride = (1, *module.kernel_size), (1, *module.stride)
            padding, dilation = (0, *module.padding), (1, *module.dilation)
        else:
            kernel, stride, padding, dilation = module.kernel_size, module.stride, module.padding, module.dilation
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C_in*k, L)
        g = g.flatten(2)  # (B, C_out, L)
        out = {}
        if module.weight.requires_grad:
            out[module.weight] = Factored(
                g.transpose(1, 2), patches.transpose(1, 2).to(g.dtype), g.shape[1], module.weight.shape
            )
        if module.bias is not None and module.bias.requires_grad:
            out[module.bias] = Instantiated(g.sum(2))  # (B, C_out)
        return out
