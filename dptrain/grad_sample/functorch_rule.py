"""The fallback for modules without a rule: per-sample vector-Jacobian products with torch.func.

For each sample i the module's forward is re-run on sample i alone (batch of one) and differentiated
with respect to the module's OWN trainable parameters with cotangent g_i (one per output tensor that carries a
gradient: the forward may return a tuple, list or dict); ``vmap`` runs all samples at once. Two checks keep it
exact or loud: the recomputed outputs must equal the recorded ones (a module that mixes samples or is random,
like dropout, is reported), and the batch gradient of the module's own use of each parameter, which autograd
hands to ``own_use``, must equal the sum of the per-sample gradients (a parameter that reaches the loss other
than through the outputs, e.g. through a tensor stored on the module, is reported instead of losing that use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch
from torch.func import functional_call, vjp, vmap

from dptrain.grad_sample.contributions import Instantiated
from dptrain.grad_sample.registry import UnsupportedModuleError
from dptrain.grad_sample.rules_base import HookRule, live_outputs

__all__ = ["FunctorchRule"]


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


@dataclass
class _Saved:
    args: tuple
    kwargs: dict
    recorded: tuple  # the output tensors that carry a gradient, detached
    live: list  # their positions among the output's leaves
    sums: Dict[str, torch.Tensor] = field(default_factory=dict)  # per parameter: sum of the per-sample gradients


class FunctorchRule(HookRule):
    structured_outputs = True

    def __init__(self, tracker, name: str):
        self.tracker, self.name = tracker, name

    def save(self, module, args, kwargs, output):
        leaves, _, live = live_outputs(output)
        return _Saved(tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()},
                      tuple(leaves[i].detach() for i in live), live)

    def contributions(self, module, saved, g):
        gs = g if isinstance(g, tuple) else (g,)  # one gradient per recorded output, (B, ...) each
        batch = gs[0].shape[0]
        params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if p.requires_grad}

        def batched(v):
            return 0 if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else None

        arg_dims = tuple(batched(a) for a in saved.args)
        kwarg_dims = {k: batched(v) for k, v in saved.kwargs.items()}

        def one_sample(params, args_i, kwargs_i, gs_i):
            def run(p):
                a = tuple(v.unsqueeze(0) if d == 0 else v for v, d in zip(args_i, arg_dims))
                kw = {k: v.unsqueeze(0) if kwarg_dims[k] == 0 else v for k, v in kwargs_i.items()}
                leaves = live_outputs(functional_call(module, p, a, kw))[0]
                return tuple(leaves[i] for i in saved.live)

            outs, pullback = vjp(run, params)
            cotangents = tuple(g_i.unsqueeze(0).to(o.dtype) for g_i, o in zip(gs_i, outs))
            return pullback(cotangents)[0], tuple(o.squeeze(0) for o in outs)

        try:
            with self.tracker.capture_disabled():
                grads, outputs = vmap(one_sample, in_dims=(None, arg_dims, kwarg_dims, 0), randomness="error")(
                    params, saved.args, saved.kwargs, gs
                )
        except Exception as err:  # torch.func could not run this module per sample
            raise UnsupportedModuleError(
                f"module '{self.name}' ({type(module).__name__}) has no per-sample rule and the torch.func "
                f"fallback failed on it: {err}. Register a rule with dptrain.register_rule."
            ) from err
        if not all(torch.allclose(o.float(), r.float(), rtol=1e-3, atol=1e-5) for o, r in zip(outputs, saved.recorded)):
            raise UnsupportedModuleError(
                f"module '{self.name}' ({type(module).__name__}) gives different outputs per sample than on the "
                "batch: it mixes samples or is random, so its per-sample gradients are not defined"
            )
        saved.sums = {n: grad.float().sum(0) for n, grad in grads.items()}  # (*shape): what own_use must receive
        saved.args, saved.kwargs, saved.recorded = (), {}, ()  # own_use, called later, needs the sums only
        named = dict(module.named_parameters(recurse=False))
        return {named[n]: Instantiated(grad) for n, grad in grads.items()}

    def own_use(self, module, tracker, call, name, grad):
        expected = call.saved.sums.get(name) if call.saved is not None else None  # None: no output gradient came
        rtol = max(1e-3, 4 * torch.finfo(grad.dtype).eps)  # both sides are rounded in the parameter's dtype
        grad = grad.float()
        gap = grad.norm() if expected is None else (grad - expected.float()).norm()
        if gap > rtol * max(float(grad.norm()), 0.0 if expected is None else float(expected.norm())):
            raise UnsupportedModuleError(
                f"parameter '{name}' of module '{self.name}' ({type(module).__name__}) reaches the loss other than "
                "through the module's outputs (e.g. through a tensor stored on the module), where dptrain cannot "
                "see its per-sample gradients; return that tensor from forward, or freeze the parameter"
            )
