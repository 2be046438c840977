"""Errors of direct peer connections (all ``P2PError`` subclasses).

``RemoteError`` could move to ``p2pnode/errors.py`` if other layers need it;
until then import it from ``p2pnode.net``.
"""

from __future__ import annotations

from p2pnode.errors import P2PError, ProtocolError


class RemoteError(P2PError):
    """The peer answered our request with an ``ErrorReply``.

    ``code`` is one of ``p2pnode.wire.messages.ErrorCode`` (``not_found``,
    ``busy``, ``bad_request``, ``internal``, ``unsupported``) or a newer one.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"remote error {code}: {message}" if message else f"remote error {code}")
        self.code = code
        self.message = message


class ConnectionClosed(P2PError):
    """The connection closed (or was dropped) before the answer arrived."""


class PeerUnreachable(P2PError):
    """The TCP connection to a peer could not be opened."""


class ChannelAuthError(ProtocolError):
    """A secure-channel chunk failed authentication (tampered, replayed or reordered)."""
