"""The registry of per-layer rules: which module types get which per-sample gradient rule.

A rule knows how to capture what its module's backward needs and how to turn an output gradient into
per-sample gradient ``Contribution``s for the module's own trainable parameters. Rules are looked up along
the module's class hierarchy (most specific first); modules without a rule go to the torch.func fallback.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Type

from torch import nn

__all__ = ["register_norm_sampler", "find_rule", "RULES", "UnsupportedModuleError", "REFUSED"]

RULES: Dict[type, object] = {}

# Module types that cannot be made private as they are, with the fix to suggest.
REFUSED: Dict[type, str] = {
    nn.modules.batchnorm._BatchNorm: (
        "BatchNorm mixes samples of a batch, so per-sample gradients do not exist (privacy leak); "
        "replace it with GroupNorm or LayerNorm"
    ),
    nn.modules.instancenorm._InstanceNorm: (
        "InstanceNorm with running statistics mixes samples through its buffers; use GroupNorm"
    ),
    nn.RNNBase: "recurrent layers are not supported; use a transformer layer or write a rule with register_norm_sampler",
}


class UnsupportedModuleError(ValueError):
    """A module with trainable parameters that dptrain cannot handle exactly."""


def register_norm_sampler(*module_types: Type[nn.Module]) -> Callable[[type], type]:
    """Class decorator: ``@register_norm_sampler(nn.Linear)`` makes the decorated rule handle that type."""

    def wrap(rule_cls: type) -> type:
        for module_type in module_types:
            RULES[module_type] = rule_cls()
        return rule_cls

    return wrap


def find_rule(module: nn.Module) -> Optional[object]:
    """The rule for ``module``'s class or its nearest registered base class; None if there is none."""
    for cls in type(module).__mro__:
        if cls in REFUSED and getattr(module, "track_running_stats", True):
            raise UnsupportedModuleError(f"{type(module).__name__}: {REFUSED[cls]}")
        if cls in RULES:
            rule = RULES[cls]
            return rule if rule.supports(module) else None
    return None
