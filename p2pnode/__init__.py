"""p2pnode: a peer-to-peer node with Kademlia discovery and verified exchange.

Every error it raises on purpose is a :class:`P2PError` subclass, importable from here.
"""

from typing import TYPE_CHECKING

from p2pnode._version import __version__
from p2pnode.config import NodeConfig
from p2pnode.errors import (
    BadServiceRequest,
    CallCancelled,
    ChannelAuthError,
    ClosedUnread,
    ConnectionClosed,
    DeadlineExceeded,
    DhtClosed,
    DownloadError,
    HandlerError,
    HandshakeError,
    HolePunchFailed,
    LimitExceeded,
    MessageDecodeError,
    MessageError,
    NodeNotRunning,
    NoProviders,
    NotFoundError,
    P2PError,
    P2PTimeoutError,
    PeerUnreachable,
    PortMappingError,
    ProtocolError,
    ProvidersFailed,
    RelayRefused,
    RemoteError,
    ServiceError,
    ServiceNotFound,
    ServiceOverloaded,
    StaleError,
    StorageError,
    TooLarge,
    UnknownMessageType,
    Unroutable,
    UsageError,
    VerificationError,
)

if TYPE_CHECKING:
    from p2pnode.node import Node, NodeState
    from p2pnode.services import CallContext, ServiceLimits

__all__ = [
    "BadServiceRequest",
    "CallCancelled",
    "CallContext",
    "ChannelAuthError",
    "ClosedUnread",
    "ConnectionClosed",
    "DeadlineExceeded",
    "DhtClosed",
    "DownloadError",
    "HandlerError",
    "HandshakeError",
    "HolePunchFailed",
    "LimitExceeded",
    "MessageDecodeError",
    "MessageError",
    "NoProviders",
    "Node",
    "NodeConfig",
    "NodeNotRunning",
    "NodeState",
    "NotFoundError",
    "P2PError",
    "P2PTimeoutError",
    "PeerUnreachable",
    "PortMappingError",
    "ProtocolError",
    "ProvidersFailed",
    "RelayRefused",
    "RemoteError",
    "ServiceError",
    "ServiceLimits",
    "ServiceNotFound",
    "ServiceOverloaded",
    "StaleError",
    "StorageError",
    "TooLarge",
    "UnknownMessageType",
    "Unroutable",
    "UsageError",
    "VerificationError",
    "__version__",
]


def __getattr__(name: str) -> object:
    # Node pulls in the whole stack; import it lazily so `p2pnode.config` stays light.
    if name in ("Node", "NodeState"):
        from p2pnode import node

        return getattr(node, name)
    if name in ("CallContext", "ServiceLimits"):
        from p2pnode import services

        return getattr(services, name)
    raise AttributeError(f"module 'p2pnode' has no attribute {name!r}")
