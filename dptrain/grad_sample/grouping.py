"""Clipping groups: which parameters share one per-sample norm and threshold.

Flat and automatic clipping: one group holding every trainable parameter. Per-layer clipping: one group per
module, modules that share a parameter (tied weights) merged into one, with thresholds C / sqrt(L) for a
scalar C (so the total sensitivity stays C) or the user's list / {group name: C}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence

from torch import nn

from dptrain.grad_sample.contributions import Contribution
from dptrain.validation import check_positive

__all__ = ["ClipGroup", "CLIPPING_MODES", "build_groups", "set_max_norms"]

CLIPPING_MODES = ("flat", "per_layer", "automatic")


@dataclass
class ClipGroup:
    """Parameters clipped together with one threshold."""

    name: str
    modules: List[nn.Module]
    params: List[nn.Parameter]
    max_norm: float
    pending: Dict[nn.Parameter, List[Contribution]] = field(default_factory=dict)  # this micro-batch's uses


def build_groups(clipping: str, module_names: Dict[nn.Module, str], max_grad_norm) -> List[ClipGroup]:
    """The clipping groups of the modules ``module_names`` (in model order) with their thresholds."""
    modules = list(module_names)
    params_of = {m: [p for p in m.parameters(recurse=False) if p.requires_grad] for m in modules}
    if clipping in ("flat", "automatic"):
        params = list(dict.fromkeys(p for m in modules for p in params_of[m]))
        return [ClipGroup("all", modules, params, check_positive("max_grad_norm", max_grad_norm))]
    merged = _merge_tied(modules, params_of)
    names = ["+".join(module_names[m] for m in grp) for grp in merged]
    thresholds = _per_layer_thresholds(max_grad_norm, names)
    return [
        ClipGroup(name, grp, list(dict.fromkeys(p for m in grp for p in params_of[m])), c)
        for name, grp, c in zip(names, merged, thresholds)
    ]


def _merge_tied(modules: List[nn.Module], params_of) -> List[List[nn.Module]]:
    """Modules grouped so that no parameter is in two groups, in order of each group's first module."""
    ids_of = {m: {id(p) for p in params_of[m]} for m in modules}  # ids: `in` on tensors would compare values
    merged: List[List[nn.Module]] = []
    for m in modules:
        hits = [grp for grp in merged if any(ids_of[m] & ids_of[o] for o in grp)]
        merged = [grp for grp in merged if all(grp is not h for h in hits)] + [[o for h in hits for o in h] + [m]]
    return sorted(merged, key=lambda grp: modules.index(grp[0]))


def _per_layer_thresholds(max_grad_norm, names: Sequence[str]) -> List[float]:
    if isinstance(max_grad_norm, Mapping):
        unknown = sorted(set(max_grad_norm) - set(names))
        missing = [n for n in names if n not in max_grad_norm]
        if unknown or missing:
            raise ValueError(
                f"per-layer max_grad_norm must have exactly the keys {list(names)}; unknown {unknown}, missing {missing}"
            )
        return [check_positive(f"max_grad_norm['{n}']", max_grad_norm[n]) for n in names]
    if isinstance(max_grad_norm, (list, tuple)):
        if len(max_grad_norm) != len(names):
            raise ValueError(
                f"per-layer max_grad_norm needs {len(names)} values (layers {list(names)}), found {len(max_grad_norm)}"
            )
        return [check_positive(f"max_grad_norm[{i}]", c) for i, c in enumerate(max_grad_norm)]
    total = check_positive("max_grad_norm", max_grad_norm)
    return [total / math.sqrt(len(names))] * len(names)


def set_max_norms(groups: Sequence[ClipGroup], norms: Sequence[float]) -> None:
    """New per-group thresholds, in the groups' order (the controller's action, a restored checkpoint)."""
    if len(norms) != len(groups):
        raise ValueError(f"expected {len(groups)} thresholds, found {len(norms)}")
    for g, c in zip(groups, norms):
        g.max_norm = check_positive(f"max_grad_norm of group '{g.name}'", c)
