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


class RequestTimeout(P2PTimeoutError):
    """A request's own time limit (dialing included) ran out before its answer came."""


class NodeNotRunning(P2PError):
    """No running node: none answers for this home (CLI), or a ``Node``'s parts
    were asked for before it started."""


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
    """A peer connection closed (or was dropped) before the answer arrived."""


class ClosedUnread(ConnectionClosed):
    """The peer closed the connection gracefully and said it never read this
    request (a goaway, HTTP/2's GOAWAY), or it was never sent: safe to send
    again, on another connection. ``PeerHost.request`` does so once."""


class PeerUnreachable(P2PError):
    """The TCP connection to a peer could not be opened."""


class RelayRefused(PeerUnreachable):
    """A relay refused a circuit to the peer (or a reservation); ``status`` says
    why (a ``p2pnode.nat.relay_core.RelayStatus`` value: which limit, no
    reservation, ...)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class ChannelAuthError(ProtocolError):
    """A secure-channel chunk failed authentication (tampered, replayed or reordered)."""


class DhtClosed(P2PError):
    """The DHT was closed while a call was in flight (or before it started)."""


class Unroutable(P2PError):
    """No way to send to that address from this socket (bad literal, other family)."""


class DownloadError(P2PError):
    """A download could not finish with the providers there are; what was verified is kept."""


class StaleError(P2PError):
    """A shared file changed on disk since it was hashed: it is no longer served."""


class StorageError(P2PError):
    """The local disk refused (full, read-only, ...); what was verified is kept."""


class PortMappingError(P2PError):
    """The router refused or did not answer a port mapping request (UPnP-IGD,
    PCP, NAT-PMP). ``code``: the router's error code when it gave one."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class MessageDecodeError(ProtocolError):
    """A peer-connection payload that is not a valid envelope/message.

    ``kind`` and ``request_id`` are set when the envelope header itself was
    readable, so the receiver can answer or fail just that one request.
    """

    def __init__(self, reason: str, *, kind: int | None = None, request_id: int | None = None):
        super().__init__(reason)
        self.kind = kind
        self.request_id = request_id


class UnknownMessageType(MessageDecodeError):
    def __init__(self, type_code: int, *, kind: int, request_id: int):
        super().__init__(f"unknown message type {type_code}", kind=kind, request_id=request_id)
        self.type_code = type_code


class MessageError(ProtocolError):
    """A DHT datagram, request or response a remote sent is not acceptable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# -- services (p2pnode/services) -------------------------------------------------


class ServiceError(P2PError):
    """A service call failed; ``code`` says how (the typed error a provider answered,
    or one the caller concluded itself: ``no_providers``, ``providers_failed``)."""

    code = "service_error"

    def __init__(self, message: str, *, service: str = "", peer: bytes | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.service = service
        self.peer = peer


class ServiceNotFound(ServiceError, NotFoundError):
    """The provider does not serve that name (or it is not a name at all)."""

    code = "not_found"


class ServiceOverloaded(ServiceError):
    """A limit refused the call: concurrency, calls per second, node-wide calls."""

    code = "overloaded"


class DeadlineExceeded(ServiceError, P2PTimeoutError):
    """The call's deadline passed (on the caller's side or the provider's)."""

    code = "deadline_exceeded"


class BadServiceRequest(ServiceError):
    """The request was malformed (not a bounded msgpack value, wrong kind of call)."""

    code = "bad_request"


class HandlerError(ServiceError):
    """The service's handler raised; the message is the handler's, never a traceback."""

    code = "handler_error"


class TooLarge(ServiceError):
    """A request or reply is larger than the service allows."""

    code = "too_large"


class CallCancelled(ServiceError):
    """The call was cancelled before it finished."""

    code = "cancelled"


class NoProviders(ServiceError, NotFoundError):
    """The DHT knows no provider of the service."""

    code = "no_providers"


class ProvidersFailed(ServiceError):
    """Every provider tried failed; ``failures`` holds (peer, error) per attempt."""

    code = "providers_failed"

    def __init__(
        self,
        message: str,
        *,
        service: str = "",
        failures: list[tuple[bytes, ServiceError | P2PError]] | None = None,
    ) -> None:
        super().__init__(message, service=service)
        self.failures = failures or []


SERVICE_ERRORS: dict[str, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        ServiceNotFound,
        ServiceOverloaded,
        DeadlineExceeded,
        BadServiceRequest,
        HandlerError,
        TooLarge,
        CallCancelled,
        NoProviders,
        ProvidersFailed,
    )
}


def service_error(
    code: str, message: str, *, service: str = "", peer: bytes | None = None
) -> ServiceError:
    """The ServiceError subclass for a wire error code (unknown codes: ServiceError)."""
    cls = SERVICE_ERRORS.get(code, ServiceError)
    if cls is ProvidersFailed:
        return ProvidersFailed(message, service=service)
    return cls(message, service=service, peer=peer)


class HolePunchFailed(PeerUnreachable):
    """A hole punch did not produce a direct connection; ``reason`` is a short
    word for counters (``timeout``, ``refused``, ``no_address``, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"hole punch failed ({reason}): {message}")
        self.reason = reason
