"""Two ways a rule sees its module's backward.

- ``FunctionRule`` (linear-like layers): the module's forward is replaced by a custom autograd Function
  whose backward computes the input gradient and hands (saved input, output gradient) to the tracker
  INSTEAD of the weight gradient, so the non-private weight-gradient GEMM is never computed.
- ``HookRule`` (small layers and the fallback): a forward hook saves the input and a tensor hook on the
  output receives the output gradient; autograd's own (non-private) parameter gradient is dropped.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any, Dict

import torch
from torch import nn

from dptrain.grad_sample.contributions import Contribution

if TYPE_CHECKING:
    from dptrain.grad_sample.tracker import GradSampleTracker

__all__ = ["Rule", "FunctionRule", "HookRule"]


class Rule:
    """Per-sample gradient rule for one module type."""

    #: autograd never produces a gradient for the module's parameters (FunctionRule)
    replaces_param_grad = False

    def supports(self, module: nn.Module) -> bool:
        """False sends this module to the fallback instead (e.g. an unusual configuration)."""
        return True

    def attach(self, module: nn.Module, tracker: "GradSampleTracker") -> list:
        """Install the capture; return handles/undo callables for ``detach``."""
        raise NotImplementedError

    def contributions(
        self, module: nn.Module, saved: Any, grad_output: torch.Tensor
    ) -> Dict[nn.Parameter, Contribution]:
        """Per-sample gradient contributions of the module's own trainable parameters, from the gradient of the
        batch loss (the tracker undoes a mean loss's 1/B in the norms and clip factors, not here)."""
        raise NotImplementedError


class FunctionRule(Rule):
    """A rule whose module forward is replaced by ``self.dp_forward(module, tracker, *args, **kwargs)``."""

    replaces_param_grad = True

    def dp_forward(self, module: nn.Module, tracker: "GradSampleTracker", *args, **kwargs):
        raise NotImplementedError

    def attach(self, module, tracker):
        original = module.forward
        rule = self

        def forward(self_module, *args, **kwargs):
            if not tracker.should_capture():
                return original(*args, **kwargs)
            return rule.dp_forward(self_module, tracker, *args, **kwargs)

        module.forward = types.MethodType(forward, module)
        return [lambda: delattr(module, "forward")]


class HookRule(Rule):
    """A rule fed by a forward hook (saves ``self.save(...)``) and a hook on the output's gradient."""

    def save(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> Any:
        return args[0].detach()

    def attach(self, module, tracker):
        rule = self

        def forward_hook(mod, args, kwargs, output):
            if not tracker.should_capture():
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            saved = rule.save(mod, args, kwargs, output)
            call = tracker.record_call(mod)
            output.register_hook(lambda g: tracker.arrive(mod, call, saved, g))
            return None

        return [module.register_forward_hook(forward_hook, with_kwargs=True)]
