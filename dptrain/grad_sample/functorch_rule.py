"""The fallback for modules without a rule: per-sample vector-Jacobian products with torch.func.

For each sample i the module's forward is re-run on sample i alone (batch of one) and differentiated
with respect to the module's OWN trainable parameters with cotangent g_i; ``vmap`` runs all samples at
once. The recomputed outputs are compared with the recorded ones, so a module that mixes samples or is
random (dropout) is reported instead of silently giving wrong gradients.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, vjp, vmap

from dptrain.grad_sample.contributions import Instantiated
from dptrain.grad_sample.registry import UnsupportedModuleError
from dptrain.grad_sample.rules_base import HookRule

__all__ = ["FunctorchRule"]


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


class FunctorchRule(HookRule):
    def __init__(self, tracker, name: str):
        self.tracker, self.name = tracker, name

    def save(self, module, args, kwargs, output):
        return tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}, output.detach()

    def contributions(self, module, saved, g):
        args, kwargs, recorded = saved
        batch = g.shape[0]
        params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if p.requires_grad}

        def batched(v):
            return 0 if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else None

        arg_dims = tuple(batched(a) for a in args)
        kwarg_dims = {k: batched(v) for k, v in kwargs.items()}

        def one_sample(params, args_i, kwargs_i, g_i):
            def run(p):
                a = tuple(v.unsqueeze(0) if d == 0 else v for v, d in zip(args_i, arg_dims))
                kw = {k: v.unsqueeze(0) if kwarg_dims[k] == 0 else v for k, v in kwargs_i.items()}
                return functional_call(module, p, a, kw)

            out, pullback = vjp(run, params)
            return pullback(g_i.unsqueeze(0).to(out.dtype))[0], out.squeeze(0)

        try:
            with self.tracker.capture_disabled():
                grads, outputs = vmap(one_sample, in_dims=(None, arg_dims, kwarg_dims, 0), randomness="error")(
                    params, args, kwargs, g
                )
        except Exception as err:  # torch.func could not run this module per sample
            raise UnsupportedModuleError(
                f"module '{self.name}' ({type(module).__name__}) has no per-sample rule and the torch.func "
                f"fallback failed on it: {err}. Register a rule with dptrain.register_norm_sampler."
            ) from err
        if not torch.allclose(outputs.float(), recorded.float(), rtol=1e-3, atol=1e-5):
            raise UnsupportedModuleError(
                f"module '{self.name}' ({type(module).__name__}) gives different outputs per sample than on the "
                "batch: it mixes samples or is random, so its per-sample gradients are not defined"
            )
        named = dict(module.named_parameters(recurse=False))
        return {named[n]: Instantiated(grad) for n, grad in grads.items()}

