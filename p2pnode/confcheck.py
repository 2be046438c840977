"""Checks the config dataclasses run in ``__post_init__``: a bad value fails where
the config is built, with the field's name, not deep inside a running node.

Light on purpose (no imports beyond the stdlib and errors): every config module uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from p2pnode.errors import UsageError

_NUMBER: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float)}


def _name(obj: object, field: str) -> str:
    return f"{type(obj).__name__}.{field}"


def check_types(obj: Any) -> None:
    """Each int, float and bool field holds that type (bool is not a number here)."""
    for f in dataclasses.fields(obj):
        # A string with `from __future__ import annotations`, else the type itself.
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        value = getattr(obj, f.name)
        if kind == "bool":
            if not isinstance(value, bool):
                raise UsageError(f"{_name(obj, f.name)} must be true or false, got {value!r}")
        elif kind in _NUMBER and (isinstance(value, bool) or not isinstance(value, _NUMBER[kind])):
            raise UsageError(f"{_name(obj, f.name)} must be {kind}, got {value!r}")


def at_least(obj: Any, low: float, *fields: str) -> None:
    for field in fields:
        value = getattr(obj, field)
        if not value >= low:  # also false for NaN
            raise UsageError(f"{_name(obj, field)} must be at least {low}, got {value!r}")


def positive(obj: Any, *fields: str) -> None:
    for field in fields:
        value = getattr(obj, field)
        if not value > 0:
            raise UsageError(f"{_name(obj, field)} must be more than 0, got {value!r}")


def port(obj: Any, field: str, value: object, *, zero: bool) -> None:
    """A TCP/UDP port; ``zero``: 0 (any free port) is allowed."""
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise UsageError(f"{_name(obj, field)} must be a port ({low}..65535), got {value!r}")


def fail(obj: Any, field: str, why: str) -> None:
    raise UsageError(f"{_name(obj, field)} {why}")
