"""Accountants by name: ``register_accountant`` adds a class, ``make_accountant`` builds a fresh one."""

from __future__ import annotations

from types import MappingProxyType

from ._base import Accountant

__all__ = ["ACCOUNTANTS", "accountant_names", "check_accountant", "make_accountant", "register_accountant"]

_REGISTRY: dict[str, type[Accountant]] = {}
ACCOUNTANTS = MappingProxyType(_REGISTRY)  # read-only view: name -> class


def register_accountant(name: str, *, force: bool = False):
    """Class decorator: ``make_accountant(name)`` builds ``cls``; a taken name is an error unless ``force``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"accountant name must be a non-empty string, found {name!r}")

    def register(cls):
        if not (isinstance(cls, type) and issubclass(cls, Accountant)):
            raise TypeError(f"register_accountant needs an Accountant subclass, found {cls!r}")
        taken = _REGISTRY.get(name)
        if taken is not None and taken is not cls and not force:
            raise ValueError(f"accountant name {name!r} is taken by {taken.__name__}; pass force=True to replace it")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def accountant_names() -> tuple[str, ...]:
    """The registered names, sorted."""
    return tuple(sorted(_REGISTRY))


def check_accountant(name) -> str:
    """``name`` if an accountant is registered under it, else a ValueError listing the names."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"accountant must be one of {list(accountant_names())}, found {name!r}")
    return name


def make_accountant(name: str, **kwargs) -> Accountant:
    """A fresh accountant by name (``"rdp"``, ``"pld"``, or a registered one); keyword arguments go to its class."""
    return _REGISTRY[check_accountant(name)](**kwargs)
