"""Rules attached to every module that owns trainable parameters, and the guards around them.

Each such module gets its rule (``registry.find_rule``, else the torch.func fallback). Modules that mix samples
are refused by class at set-up and at every forward (``guards``). A trainable parameter must reach the tracker
only through its module's rule: any ordinary gradient it receives comes from a use outside its module and is
refused (under FSDP2 the unsharded stand-ins that forward and backward really use are guarded the same way).
"""

from __future__ import annotations

import functools
import logging
from typing import Dict, List, Tuple

from torch import nn

from dptrain.fsdp import FSDPView
from dptrain.grad_sample import guards
from dptrain.grad_sample.functorch_rule import FunctorchRule
from dptrain.grad_sample.registry import UnsupportedModuleError, find_rule

# importing the rule modules registers them
from dptrain.grad_sample import conv, embedding, linear, norms  # noqa: F401  isort: skip

logger = logging.getLogger(__name__)

__all__ = ["RuleAttachment"]


class RuleAttachment:
    """Attaches the rules and guards of ``model`` for ``tracker``; ``detach()`` removes every hook."""

    def __init__(self, model: nn.Module, tracker):
        self.root = model.module if isinstance(model, FSDPView) else model  # the module users call
        guards.check_hub_kernels(self.root)
        self.all_modules: List[Tuple[str, nn.Module]] = [(n or type(m).__name__, m) for n, m in model.named_modules()]
        self.rules: Dict[nn.Module, object] = {}
        self.module_names: Dict[nn.Module, str] = {}  # modules with a rule, in model order
        self._undo: list = []
        self._guard_mixing()
        owners = _owners(model)
        self.param_names = {p: names[0] for p, names in owners.items()}
        self._guarded = {id(p): p for p in owners}  # keeps FSDP2 stand-ins alive, so their ids stay their own
        for name, module in model.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                self._attach(name, module, tracker, owners, sharded=self.root is not model)

    def _guard_mixing(self) -> None:
        for name, module in self.all_modules:  # sample-mixing modules, trainable parameters or not
            if guards.is_guarded(module):
                guards.check_mixing(name, module)
                self._undo.append(module.register_forward_pre_hook(functools.partial(_check_mode, name)))

    def _attach(self, name: str, module: nn.Module, tracker, owners, sharded: bool) -> None:
        try:
            rule = find_rule(module)
        except UnsupportedModuleError as err:
            raise UnsupportedModuleError(f"module '{name}': {err}") from None
        if rule is None:
            rule = FunctorchRule(tracker, name)
            logger.info("module '%s' (%s) uses the torch.func fallback", name, type(module).__name__)
        self.module_names[module] = name or type(module).__name__
        self.rules[module] = rule
        self._undo += rule.attach(module, tracker)
        for p in module.parameters(recurse=False):  # no rule lets its module's own use reach a parameter
            if p.requires_grad:
                self._undo.append(p.register_hook(_refuse_foreign_use(owners[p][0])))
        if sharded:  # FSDP2: forward and backward use unsharded stand-ins; guard those too
            self._undo.append(module.register_forward_pre_hook(self._guard_stand_ins))

    def _guard_stand_ins(self, module, args) -> None:
        for pname, p in module._parameters.items():
            if p is not None and p.requires_grad and id(p) not in self._guarded:
                self._guarded[id(p)] = p
                self._undo.append(p.register_hook(_refuse_foreign_use(f"{self.module_names[module]}.{pname}")))

    def add_hook(self, handle) -> None:
        """Another hook (or undo callable) for ``detach()`` to remove."""
        self._undo.append(handle)

    def detach(self) -> None:
        """Remove every hook and restore the modules' own forward."""
        for undo in reversed(self._undo):
            undo() if callable(undo) else undo.remove()
        self._undo = []


def _owners(model: nn.Module) -> Dict[nn.Parameter, List[str]]:
    """Every trainable parameter and its qualified names (several when shared)."""
    owners: Dict[nn.Parameter, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(p, []).append(f"{name}.{pname}" if name else pname)
    return owners


def _check_mode(name: str, module: nn.Module, args) -> None:
    guards.check_mixing(name, module)  # e.g. a frozen BatchNorm put back in train mode by model.train()


def _refuse_foreign_use(name: str):
    def hook(grad) -> None:
        if grad is None:  # autograd runs leaf hooks even when the Function returned no gradient
            return
        raise UnsupportedModuleError(
            f"parameter {name} received an ordinary gradient: it is used outside the module that owns it (e.g. "
            "through its .weight in a functional call), where dptrain cannot see its per-sample gradients. "
            "Use the module itself, or freeze the parameter."
        )

    return hook
