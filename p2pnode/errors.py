"""The one family of errors p2pnode raises.

Boundaries (network decoders, the control API, the CLI) translate whatever a
library raises into one of these, so callers only ever catch ``P2PError``
subclasses.
"""

from __future__ import annotations


class P2PError(Exception):
    """Base of every error p2pnode raises on purpose."""


class ProtocolError(P2PError):
    """A remote sent something malformed, oversized or not allowed."""


class HandshakeError(ProtocolError):
    """A peer connection's handshake failed (bad identity, wrong peer, truncated)."""


class VerificationError(ProtocolError):
    """Data from a peer did not match the hash that certifies it."""


class LimitExceeded(ProtocolError):
    """A configured limit (size, rate, count) tripped."""


class UsageError(P2PError):
    """Local misuse: a bad argument, a bad config, a home already in use."""


class NotFoundError(P2PError):
    """The thing asked for does not exist (here or on the network)."""


class P2PTimeoutError(P2PError):
    """A remote did not answer in time."""


class NodeNotRunning(P2PError):
    """No running node answers for this home."""
