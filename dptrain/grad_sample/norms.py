"""Normalisation layers: LayerNorm, torch RMSNorm and the Llama-family RMSNorm of Hugging Face.

Per sample: grad(weight) = sum_t g_t * x_hat_t and grad(bias) = sum_t g_t, with x_hat the normalised input
recomputed from the saved input (cheap, (B, d) results).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dptrain.grad_sample.contributions import Instantiated
from dptrain.grad_sample.registry import register_rule
from dptrain.grad_sample.rules_base import HookRule

__all__ = ["LayerNormRule", "RMSNormRule", "HFRMSNormRule"]


def _norm_layer_contributions(module, x_hat: torch.Tensor, g: torch.Tensor, shape: torch.Size) -> dict:
    feature = shape.numel()
    x_hat = x_hat.reshape(x_hat.shape[0], -1, feature)  # (B, T, d)
    g = g.reshape(g.shape[0], -1, feature)  # (B, T, d)
    out = {}
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is not None and weight.requires_grad:
        out[weight] = Instantiated((g * x_hat).sum(1).reshape(-1, *shape))  # (B, *shape)
    if bias is not None and bias.requires_grad:
        out[bias] = Instantiated(g.sum(1).reshape(-1, *shape))  # (B, *shape)
    return out


@register_rule(nn.LayerNorm)
class LayerNormRule(HookRule):
    def contributions(self, module, x, g):
        x_hat = F.layer_norm(x.float(), module.normalized_shape, eps=module.eps)
        return _norm_layer_contributions(module, x_hat, g.float(), torch.Size(module.normalized_shape))


if hasattr(nn, "RMSNorm"):

    @register_rule(nn.RMSNorm)
    class RMSNormRule(HookRule):
        def contributions(self, module, x, g):
            x_hat = F.rms_norm(x.float(), module.normalized_shape, eps=module.eps if module.eps is not None else torch.finfo(x.dtype).eps)
            return _norm_layer_contributions(module, x_hat, g.float(), torch.Size(module.normalized_shape))


# HF RMSNorm classes whose forward is weight * (x / rms(x)).to(input dtype): Llama and its copies
# (Gemma's (1 + weight) form is not among them and goes to the exact torch.func fallback).
_HF_RMSNORMS = tuple(
    f"transformers.models.{m}.modeling_{m}.{c}"
    for m, c in [("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"), ("qwen2", "Qwen2RMSNorm")]
)


@register_rule(*_HF_RMSNORMS)
class HFRMSNormRule(HookRule):
    def supports(self, module):
        return hasattr(module, "variance_epsilon")

    def contributions(self, module, x, g):
        x32 = x.float()
        x_hat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        x_hat = x_hat.to(x.dtype).float()  # the layer multiplies the weight by x_hat cast to the input dtype
        return _norm_layer_contributions(module, x_hat, g.float(), module.weight.shape)
