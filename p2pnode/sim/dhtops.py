"""The DHT operations of a simulated node over its ``Discovery``, shared by the
in-process and virtual runners: a ``P2PError`` becomes the ``NodeFailure`` the
engine records (named after the operation), and a value found comes back as text.
"""

from __future__ import annotations

from p2pnode.dht import Discovery
from p2pnode.errors import P2PError
from p2pnode.sim.engine import NodeFailure


async def dht_put(discovery: Discovery, key: str, value: str) -> bool:
    try:
        return bool(await discovery.put(key, value))
    except P2PError as exc:
        raise NodeFailure(f"put: {type(exc).__name__}: {exc}") from None


async def dht_get(discovery: Discovery, key: str) -> str | None:
    try:
        value = await discovery.get(key)
    except P2PError as exc:
        raise NodeFailure(f"get: {type(exc).__name__}: {exc}") from None
    return as_text(value)


def as_text(value: object) -> str | None:
    """A value found, as the engine compares it (bytes decoded, None: not found)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)
