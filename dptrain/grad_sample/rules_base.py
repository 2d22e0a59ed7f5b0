"""Two ways a rule sees its module's backward.

- ``FunctionRule`` (linear-like layers): the module's forward is replaced by a custom autograd Function
  whose backward computes the input gradient and hands (saved input, output gradient) to the tracker
  INSTEAD of the weight gradient, so the non-private weight-gradient GEMM is never computed.
- ``HookRule`` (small layers and the fallback): the wrapped forward saves the input and a tensor hook on the
  output receives the output gradient. The module runs on aliases of its own parameters whose backward gives
  the parameters no gradient, so autograd's non-private gradient of the module's own use is never formed.

Either way a trainable parameter never receives an ordinary gradient from its own module: one that does comes
from a use outside it (e.g. ``h * ln.weight``), which the tracker refuses instead of losing it.
"""

from __future__ import annotations

import functools
import types
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from dptrain.grad_sample.contributions import Contribution
from dptrain.grad_sample.registry import UnsupportedModuleError

if TYPE_CHECKING:
    from dptrain.grad_sample.tracker import GradSampleTracker

__all__ = ["Rule", "FunctionRule", "HookRule", "live_outputs"]


class Rule:
    """Per-sample gradient rule for one module type."""

    def supports(self, module: nn.Module) -> bool:
        """False sends this module to the fallback instead (e.g. an unusual configuration); only modules that
        run the registered class's own forward are asked."""
        return True

    def attach(self, module: nn.Module, tracker: "GradSampleTracker") -> list:
        """Install the capture; return handles/undo callables for ``detach``."""
        raise NotImplementedError

    def contributions(
        self, module: nn.Module, saved: Any, grad_output: torch.Tensor
    ) -> Dict[nn.Parameter, Contribution]:
        """Per-sample gradient contributions of the module's own trainable parameters, from the gradient of the
        batch loss (the tracker undoes a mean loss's 1/B in the norms and clip factors, not here). ``grad_output``
        is a tuple (one per output tensor that carries a gradient) for rules with ``structured_outputs``."""
        raise NotImplementedError


class FunctionRule(Rule):
    """A rule whose module forward is replaced by ``self.dp_forward(module, tracker, *args, **kwargs)``."""

    def dp_forward(self, module: nn.Module, tracker: "GradSampleTracker", *args, **kwargs):
        raise NotImplementedError

    def attach(self, module, tracker):
        original, rule = module.forward, self

        def forward(self_module, *args, **kwargs):
            if not tracker.should_capture():
                return original(*args, **kwargs)
            return rule.dp_forward(self_module, tracker, *args, **kwargs)

        return [_replace_forward(module, forward)]


class _OwnUse(torch.autograd.Function):
    """Identity on a parameter; backward hands the gradient of the module's own use to ``report`` (if any) and
    gives the parameter none."""

    @staticmethod
    def forward(ctx, p, report):
        ctx.report = report
        return p.view_as(p)

    @staticmethod
    def backward(ctx, g):
        if ctx.report is not None:
            ctx.report(g)
        return None, None


class _Capture(torch.autograd.Function):
    """Identity on a module's output tensors; backward hands all their gradients to ``report`` at once."""

    @staticmethod
    def forward(ctx, report, *outputs):
        ctx.report = report
        return tuple(t.clone() for t in outputs)  # clones: a view made here could not be changed in place

    @staticmethod
    def backward(ctx, *grads):
        ctx.report(grads)
        return (None, *grads)


class _Call:
    """One captured forward call of a HookRule module."""

    __slots__ = ("index", "saved")

    def __init__(self):
        self.index: Optional[int] = None  # from tracker.record_call; None while no output carries a gradient
        self.saved: Any = None


def live_outputs(output) -> Tuple[List[Any], Any, List[int]]:
    """(leaves, structure, positions of the leaves that carry a gradient) of a forward's output."""
    leaves, spec = ([output], None) if isinstance(output, torch.Tensor) else tree_flatten(output)
    return leaves, spec, [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]


class HookRule(Rule):
    """A rule fed by its module's forward output (saves ``self.save(...)``) and a hook on the output's gradient."""

    #: ``contributions`` takes a tuple of output gradients when the forward returns a tuple, list or dict
    structured_outputs = False

    def save(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return args[0].detach()

    def own_use(self, module: nn.Module, tracker: "GradSampleTracker", call: _Call, name: str, grad: torch.Tensor) -> None:
        """Called with the gradient of one call's own use of parameter ``name`` (after its output gradient)."""

    def attach(self, module, tracker):
        original, rule = module.forward, self
        check = type(rule).own_use is not HookRule.own_use

        def forward(self_module, *args, **kwargs):
            if not tracker.should_capture():
                return original(*args, **kwargs)
            call = _Call()
            real = {n: p for n, p in self_module._parameters.items() if p is not None and p.requires_grad}
            aliases = {
                n: _OwnUse.apply(p, functools.partial(rule.own_use, self_module, tracker, call, n) if check else None)
                for n, p in real.items()
            }
            self_module._parameters.update(aliases)
            try:
                output = original(*args, **kwargs)
            finally:
                for n, alias in aliases.items():
                    if self_module._parameters.get(n) is alias:
                        self_module._parameters[n] = real[n]
            return rule._capture(self_module, tracker, call, args, kwargs, output)

        return [_replace_forward(module, forward)]

    def _capture(self, module, tracker, call, args, kwargs, output):
        """Route the gradients of the output tensors to ``tracker.arrive``; returns the output (its tensors replaced
        by identities of them when it is a tuple, list or dict)."""
        leaves, spec, live = live_outputs(output)
        if not live:  # nothing returned depends on a parameter through autograd
            return output
        single = isinstance(output, torch.Tensor)
        if not single and not self.structured_outputs:
            raise UnsupportedModuleError(
                f"module '{tracker.module_name(module)}' ({type(module).__name__}) returned a "
                f"{type(output).__name__}, but its per-sample rule needs one output tensor"
            )
        call.saved = self.save(module, args, kwargs, output)
        call.index = tracker.record_call(module)
        arrive = functools.partial(tracker.arrive, module, call.index, call.saved)
        report = lambda g: None if g is None else arrive(g)  # noqa: E731  None: the consumer passed no gradient
        if single:
            output.register_hook(report)
            return output
        for i, t in zip(live, _Capture.apply(report, *(leaves[i] for i in live))):
            leaves[i] = t
        return tree_unflatten(leaves, spec)


def _replace_forward(module: nn.Module, forward) -> callable:
    """Install ``forward`` as the module's own forward; returns the undo (which restores any previous override)."""
    previous = module.__dict__.get("forward")
    module.forward = types.MethodType(forward, module)

    def undo():
        if previous is None:
            del module.forward
        else:
            module.forward = previous

    return undo
