"""The registry of per-layer rules: which module types get which per-sample gradient rule.

A rule knows how to capture what its module's backward needs and how to turn an output gradient into
per-sample gradient ``Contribution``s for the module's own trainable parameters. Rules are looked up along
the module's class hierarchy (most specific first); modules without a rule go to the torch.func fallback.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Type, Union

from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

__all__ = ["register_rule", "find_rule", "RULES", "UnsupportedModuleError", "REFUSED"]

RULES: Dict[Union[type, str], object] = {}  # by class, or by "module.QualName" (no import needed)

# Module types with trainable parameters that cannot be made private as they are, with the fix to suggest.
# (Modules that mix samples or write buffers from the data, parameters or not: see ``guards``.)
REFUSED: Dict[type, str] = {
    nn.RNNBase: "recurrent layers are not supported; use a transformer layer or write a rule with register_rule",
    ParametrizationList: (
        "a parametrized weight (torch.nn.utils.parametrize, e.g. weight_norm) is computed from these parameters "
        "outside any per-sample rule; remove the parametrization (parametrize.remove_parametrizations) or freeze it"
    ),
}


class UnsupportedModuleError(ValueError):
    """A module with trainable parameters that dptrain cannot handle exactly."""


def register_rule(*module_types: Union[Type[nn.Module], str], force: bool = False) -> Callable[[type], type]:
    """Class decorator: ``@register_rule(nn.Linear)`` makes the decorated ``Rule`` handle modules of that type
    that run its own forward (a subclass with its own forward goes to the fallback).

    A type may also be named by its qualified name ("transformers.pytorch_utils.Conv1D"), so optional
    libraries are never imported just to register a rule. Registering a type twice is an error unless ``force``.
    """

    def wrap(rule_cls: type) -> type:
        taken = [t for t in module_types if t in RULES and not force]
        if taken:
            name = taken[0] if isinstance(taken[0], str) else qualified_name(taken[0])
            raise ValueError(
                f"a rule for {name} is already registered ({type(RULES[taken[0]]).__name__}); pass force=True to "
                "replace it"
            )
        for module_type in module_types:
            RULES[module_type] = rule_cls()
        return rule_cls

    return wrap


def find_rule(module: nn.Module) -> Optional[object]:
    """The rule registered for ``module``'s class or its nearest base class, if the module runs that class's
    forward and the rule ``supports`` its configuration; None sends it to the fallback."""
    for cls in type(module).__mro__:
        if cls in REFUSED:
            raise UnsupportedModuleError(f"{type(module).__name__}: {REFUSED[cls]}")
        rule = RULES.get(cls) or RULES.get(qualified_name(cls))
        if rule is not None:
            return rule if type(module).forward is cls.forward and rule.supports(module) else None
    return None


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
