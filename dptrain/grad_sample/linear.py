"""Linear-like layers (``nn.Linear``, Hugging Face ``Conv1D``): custom autograd Functions.

The Function's backward returns the input gradient only; the weight and bias gradients are computed by the
tracker from (x, g) per sample, so no non-private weight-gradient GEMM is ever run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dptrain.grad_sample.contributions import Factored, Instantiated
from dptrain.grad_sample.registry import register_rule
from dptrain.grad_sample.rules_base import FunctionRule

__all__ = ["LinearRule", "HFConv1DRule"]


def _as_sequence(t: torch.Tensor) -> torch.Tensor:
    """(B, *, d) -> (B, T, d) with T the product of the middle dimensions (T = 1 for (B, d))."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


class _TrackedLinear(torch.autograd.Function):
    """y = x W^T + b (``weight_is_in_out``: y = x W + b, HF Conv1D); backward reports (x, g) to the tracker."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_is_in_out, report):
        ctx.save_for_backward(x, weight)
        ctx.weight_is_in_out, ctx.report = weight_is_in_out, report
        if weight_is_in_out:
            out = x.reshape(-1, x.shape[-1]) @ weight.to(x.dtype) if bias is None else torch.addmm(
                bias.to(x.dtype), x.reshape(-1, x.shape[-1]), weight.to(x.dtype)
            )
            return out.view(*x.shape[:-1], weight.shape[1])
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = weight.to(g.dtype)
            grad_x = (g @ (w.t() if ctx.weight_is_in_out else w)).to(x.dtype)  # (B, *, d_in)
        ctx.report(x.detach(), g)
        return grad_x, None, None, None, None


class _LinearLike(FunctionRule):
    weight_is_in_out = False

    def dp_forward(self, module, tracker, x):
        call = tracker.record_call(module)
        report = lambda saved, g: tracker.arrive(module, call, saved, g)  # noqa: E731
        return _TrackedLinear.apply(x, module.weight, module.bias, self.weight_is_in_out, report)

    def contributions(self, module, x, g):
        x, g = _as_sequence(x), _as_sequence(g)  # (B, T, d_in), (B, T, d_out)
        if x.dtype != g.dtype:
            x = x.to(g.dtype)
        out = {}
        if module.bias is not None and module.bias.requires_grad:
            out[module.bias] = Instantiated(g.sum(1))  # (B, d_out)
        if module.weight.requires_grad:
            if self.weight_is_in_out:  # weight (d_in, d_out): G_i = x_i^T g_i
                out[module.weight] = Factored(x, g, x.shape[-1], module.weight.shape)
            else:  # weight (d_out, d_in): G_i = g_i^T x_i
                out[module.weight] = Factored(g, x, g.shape[-1], module.weight.shape)
        return out


@register_rule(nn.Linear)
class LinearRule(_LinearLike):
    pass


@register_rule("transformers.pytorch_utils.Conv1D")
class HFConv1DRule(_LinearLike):
    """Hugging Face GPT-2 style ``Conv1D``: y = x W + b with W stored (d_in, d_out)."""

    weight_is_in_out = True
