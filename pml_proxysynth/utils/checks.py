"""Argument checks shared by the package's classes."""

import numbers


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as a Python int (numpy integers accepted), or a ``ValueError`` naming
    the argument if it is not an integer (bools included) or is below ``minimum``.
    (A ``ValueError`` for the wrong type too, as every other argument check of the
    package raises.)"""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)
