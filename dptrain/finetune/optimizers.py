"""Inner optimizers by name: torch ``sgd``/``adam``/``adamw`` and the low-memory ``dptrain.optim`` ones.

Under DP the inner optimizer only reads the privatised gradient, so its choice costs no privacy.
``dptrain.optim`` is imported only when one of its optimizers is asked for.
"""

from __future__ import annotations

from importlib import import_module
from typing import Iterable

import torch

from dptrain.validation import check_positive

__all__ = ["OPTIMIZERS", "build_optimizer"]

# name -> (module, class)
OPTIMIZERS = {
    "sgd": ("torch.optim", "SGD"),
    "adam": ("torch.optim", "Adam"),
    "adamw": ("torch.optim", "AdamW"),
    "apollo": ("dptrain.optim", "Apollo"),
    "apollo-mini": ("dptrain.optim", "ApolloMini"),
    "galore": ("dptrain.optim", "GaLoreAdamW"),
    "frugal": ("dptrain.optim", "Frugal"),
    "swan": ("dptrain.optim", "Swan"),
    "sgd-sai": ("dptrain.optim", "SGDSaI"),
    "microadam": ("dptrain.optim", "MicroAdam"),
    "ldadam": ("dptrain.optim", "LDAdam"),
    "dct-adamw": ("dptrain.optim", "DCTAdamW"),
}


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (case-insensitive) over ``params``."""
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    check_positive("lr", lr)
    module_name, class_name = OPTIMIZERS[name.lower()]
    try:
        cls = getattr(import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"optimizer {name!r} ({module_name}.{class_name}) is not available: {err}") from None
    kwargs = {"lr": float(lr)}
    if weight_decay:
        kwargs["weight_decay"] = float(weight_decay)
    if name.lower() == "sgd":
        kwargs["momentum"] = 0.9
    return cls(list(params), **kwargs)
