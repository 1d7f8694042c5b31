"""Argument checks shared by the package's classes."""

import math
import numbers
from typing import Optional

import numpy as np
import torch


def check_int(
    name: str, value: object, minimum: int = 1, maximum: Optional[int] = None
) -> int:
    """``value`` as a Python int (numpy integers accepted), or a ``ValueError`` naming
    the argument if it is not an integer (bools included) or lies outside [minimum,
    maximum]. (A ``ValueError`` for the wrong type too, as every other argument
    check of the package raises.)"""
    requirement = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        raise ValueError(f"{name} must be an int {requirement}, got {value!r}")
    return int(value)


def is_finite_real(value: object) -> bool:
    """True for a finite real number (numpy scalars included), False for bools,
    strings, NaN, inf and anything else."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def check_bool(name: str, value: object) -> bool:
    """``value`` as a bool (numpy bools accepted), or a ``ValueError`` naming the
    argument: ``bool("no")`` would silently be True."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_generator(value: object) -> Optional[torch.Generator]:
    """``value`` if it is None or a ``torch.Generator``, else a ``ValueError``."""
    if value is not None and not isinstance(value, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {value!r}")
    return value
