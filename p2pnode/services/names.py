"""Service names and their DHT keys: pure.

A name is dotted lower-case: labels of ``[a-z0-9-]`` (not starting or ending with
``-``), joined by single dots, at most ``MAX_NAME_LEN`` characters in all. The
name is announced under ``service_key(name)``, 20 bytes like any DHT key, in a
namespace of its own so it never collides with a resource id.
"""

from __future__ import annotations

import hashlib
import re

from p2pnode.errors import UsageError

__all__ = ["MAX_NAME_LEN", "is_service_name", "service_key", "validate_service_name"]

MAX_NAME_LEN = 64
KEY_PREFIX = b"p2pnode/service/v1"
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def is_service_name(name: object) -> bool:
    return type(name) is str and 0 < len(name) <= MAX_NAME_LEN and _NAME.fullmatch(name) is not None


def validate_service_name(name: object) -> str:
    """``name`` if it is a valid service name, else UsageError saying why."""
    if not is_service_name(name):
        raise UsageError(
            f"bad service name {name!r}: dotted lower-case labels of a-z, 0-9 and '-', "
            f"at most {MAX_NAME_LEN} characters (e.g. 'text.upper')"
        )
    assert isinstance(name, str)
    return name


def service_key(name: str) -> bytes:
    """The 20-byte DHT key providers of ``name`` are announced under."""
    return hashlib.sha256(KEY_PREFIX + validate_service_name(name).encode()).digest()[:20]
