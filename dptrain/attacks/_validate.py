"""Array checks shared by the attack and audit modules (numpy only); scalar arguments go through
``dptrain.validation``. Messages name the argument, what was expected and what was found.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["as_scores", "as_bool_mask"]

_NUMERIC_KINDS = "iuf"  # signed int, unsigned int, float; bool/complex/object/strings are rejected


def as_scores(values, name: str, *, ndim: int = 1, allow_empty: bool = False) -> np.ndarray:
    """Return ``values`` as a float64 array of ``ndim`` dimensions with finite entries, or raise.

    Non-numeric inputs (strings, objects, booleans, complex) raise ``TypeError``; empty arrays, wrong
    dimensionality and NaN/inf entries raise ``ValueError``.
    """
    arr = np.asarray(values)
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"{name} must hold real numbers (int or float), found dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, found shape {arr.shape}")
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} must not be empty, found shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        index = first[0] if len(first) == 1 else first
        raise ValueError(
            f"{name} must be finite, found {int(bad.sum())} non-finite value(s) (first: {arr[first]!r} at index {index})"
        )
    return arr


def as_bool_mask(values, name: str, *, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Return ``values`` as a bool array (bools or 0/1 integers accepted), optionally of a given shape."""
    arr = np.asarray(values)
    if arr.dtype.kind == "b":
        mask = arr
    elif arr.dtype.kind in "iu" and np.isin(arr, (0, 1)).all():
        mask = arr.astype(bool)
    else:
        raise TypeError(f"{name} must be a boolean (or 0/1 integer) array, found dtype {arr.dtype}")
    if shape is not None and mask.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, found {mask.shape}")
    return mask
