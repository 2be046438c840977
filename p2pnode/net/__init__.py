"""Direct TCP peer connections: Noise XX handshake, secure channel, request mux, pool.

Importing this package loads only the limits: the rest is imported on first use,
so ``p2pnode.net.config`` (and ``p2pnode.config``) stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from p2pnode.errors import (
    ChannelAuthError,
    ClosedUnread,
    ConnectionClosed,
    PeerUnreachable,
    RemoteError,
)
from p2pnode.net.config import NetLimits

if TYPE_CHECKING:
    from p2pnode.net.connection import Handler
    from p2pnode.net.host import PeerAddress, PeerHost

__all__ = [
    "ChannelAuthError",
    "ClosedUnread",
    "ConnectionClosed",
    "Handler",
    "NetLimits",
    "PeerAddress",
    "PeerHost",
    "PeerUnreachable",
    "RemoteError",
]

_LAZY = {"Handler": "connection", "PeerAddress": "host", "PeerHost": "host"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"p2pnode.net.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
