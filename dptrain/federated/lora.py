"""LoRA factors of a peft model as plain tensors: what clients and the server exchange.

Names are ``"<module path>.A"`` (r, n) and ``"<module path>.B"`` (m, r) for every LoRA layer of the active adapter;
the layer adds ``scaling * B A x`` to its base output.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Tuple

import torch
from torch import nn

from dptrain.validation import check_choice

__all__ = ["METHODS", "lora_layers", "get_factors", "set_factors", "set_trainable", "trained_factors", "pairs"]

# method -> the factors clients train with DP-SGD (the others stay frozen on clients)
_TRAINED = {"fedsvd": ("B",), "ffa": ("B",), "dplora": ("A", "B")}
METHODS = tuple(_TRAINED)


def trained_factors(method: str) -> Tuple[str, ...]:
    """``("B",)`` for FedSVD and FFA-LoRA (A frozen), ``("A", "B")`` for DP-LoRA."""
    return _TRAINED[check_choice("method", method, METHODS)]


def lora_layers(model: nn.Module) -> Dict[str, Tuple[nn.Parameter, nn.Parameter]]:
    """``{module path: (A weight (r, n), B weight (m, r))}`` of the active adapter of each peft LoRA layer."""
    layers = {}
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
            continue
        for adapter in getattr(module, "active_adapters", ["default"]):
            if adapter in lora_a and adapter in lora_b:
                layers[name] = (lora_a[adapter].weight, lora_b[adapter].weight)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layer: wrap it with dptrain.finetune.modeling.apply_lora")
    return layers


def get_factors(model: nn.Module, which: Iterable[str] = ("A", "B")) -> Dict[str, torch.Tensor]:
    """Copies (float32, CPU) of the factors named in ``which``."""
    which = tuple(which)
    out = {}
    for name, (a, b) in lora_layers(model).items():
        for key, p in (("A", a), ("B", b)):
            if key in which:
                out[f"{name}.{key}"] = p.detach().to("cpu", torch.float32).clone()
    return out


def set_factors(model: nn.Module, factors: Mapping[str, torch.Tensor]) -> None:
    """Load factors by name; every name must exist in the model with the same shape."""
    params = {f"{name}.{key}": p for name, (a, b) in lora_layers(model).items() for key, p in (("A", a), ("B", b))}
    unknown = sorted(set(factors) - set(params))
    if unknown:
        raise ValueError(f"{len(unknown)} factor(s) not in the model, e.g. {unknown[0]!r}")
    with torch.no_grad():
        for key, value in factors.items():
            p = params[key]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"factor {key!r} has shape {tuple(value.shape)}, the model's is {tuple(p.shape)}")
            p.copy_(value.to(p.device, p.dtype))


def set_trainable(model: nn.Module, method: str) -> None:
    """Freeze every parameter but the factors ``method`` trains (A stays frozen for FedSVD and FFA-LoRA)."""
    keys = trained_factors(method)
    for p in model.parameters():
        p.requires_grad_(False)
    for a, b in lora_layers(model).values():
        a.requires_grad_("A" in keys)
        b.requires_grad_("B" in keys)


def pairs(factors: Mapping[str, torch.Tensor]) -> Iterable[str]:
    """Module paths that have both ``.A`` and ``.B`` in ``factors``."""
    return [k[:-2] for k in factors if k.endswith(".A") and k[:-2] + ".B" in factors]
