"""Direct TCP peer connections: Noise XX handshake, secure channel, request mux, pool."""

from p2pnode.errors import ChannelAuthError, ConnectionClosed, PeerUnreachable, RemoteError
from p2pnode.net.config import NetLimits
from p2pnode.net.connection import Handler
from p2pnode.net.host import PeerAddress, PeerHost

__all__ = [
    "ChannelAuthError",
    "ConnectionClosed",
    "Handler",
    "NetLimits",
    "PeerAddress",
    "PeerHost",
    "PeerUnreachable",
    "RemoteError",
]
