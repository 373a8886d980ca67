"""Argument checks shared by every module (the lowest layer: it imports nothing of the package)."""

from __future__ import annotations

import math

__all__ = ["is_int", "is_real"]


def is_int(value: object, minimum: int | None = None) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``), at least ``minimum`` when given."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def is_real(value: object, minimum: float | None = None, *, strict: bool = False) -> bool:
    """Whether ``value`` is a finite real number (not a ``bool``), above (``strict``) or at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return minimum is None or (value > minimum if strict else value >= minimum)
