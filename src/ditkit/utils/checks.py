"""Argument checks shared by library functions (the CLI's flags go through `utils.args` instead)."""

from __future__ import annotations

import operator

import numpy as np
import torch

__all__ = ["count_at_least_one"]


def count_at_least_one(value: object, what: str) -> int:
    """`value` as an int >= 1, or ValueError naming `what` and the value.

    Any integer type is accepted (Python, numpy, a 0-d integer tensor: whatever `operator.index` takes);
    bools (Python, numpy, bool tensors), floats and the rest are refused, since 2.5 or True would silently
    mean something else.
    """
    boolean = isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) == torch.bool
    try:
        number = None if boolean else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return number
