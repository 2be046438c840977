"""The services' wire messages (type codes 48-63): pure.

Every request here may be answered with an ``ErrorReply`` whose ``code`` is one of
:class:`ServiceErrorCode`; that is how typed errors travel (a handler error
carries its message only, never a traceback).

- ``Describe(service)`` -> ``ServiceInfo(service, kind, idempotent)``.
- ``Call(call_id, service, deadline_ms, request)`` -> ``Reply(call_id, reply)``.
  ``call_id`` is the caller's (unique among its calls in flight to that peer);
  ``deadline_ms`` is the time left when it was sent: the provider stops the
  handler when it passes.
- ``StreamOpen(call_id, service, deadline_ms, request)`` -> ``StreamOpened(stream_id,
  max_credit)`` (the stream id is the call id; at most ``max_credit`` items
  may be granted ahead of delivery). Nothing is produced until credit is granted.
- ``StreamPull(stream_id, credit)`` -> ``StreamItems(stream_id, items, end)``: grants
  ``credit`` more items (credit is cumulative; a pull of 0 only collects) and
  answers once at least one item is ready or the stream ended. One pull at a time.
- ``StreamClose(stream_id)`` -> ``StreamClosed(found)``: the consumer is done
  with a stream between pulls; its producer is stopped.

Cancelling is the request mux's (``Kind.CANCEL``, wire/messages.py): a caller
that gives up a ``Call`` cancels that request, which stops the handler, and no
answer follows; a cancelled ``StreamPull`` ends its stream the same way.
``StreamClose`` remains because a stream outlives its requests: a consumer that
stops between pulls has no request out to cancel, and a cancelled pull (or open)
whose answer crossed the cancel leaves the stream open there. Codes 56 and 57 (the former
``Cancel``/``Cancelled``, call or stream by call id) are retired, never reused.

Request and reply bodies are values encoded by ``services/values.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from p2pnode.services.names import MAX_NAME_LEN
from p2pnode.wire.messages import DEFAULT_REGISTRY, Blob, Message, MessageRegistry, message, wire

__all__ = [
    "MAX_CREDIT_PER_PULL",
    "SERVICE_MESSAGES",
    "SERVICE_REQUESTS",
    "Call",
    "Describe",
    "Reply",
    "ServiceErrorCode",
    "ServiceInfo",
    "StreamClose",
    "StreamClosed",
    "StreamItems",
    "StreamOpen",
    "StreamOpened",
    "StreamPull",
    "register",
]

MAX_CALL_ID = 2**64 - 1
MAX_DEADLINE_MS = 24 * 3600 * 1000
MAX_CREDIT_PER_PULL = 1024


class ServiceErrorCode(StrEnum):
    NOT_FOUND = "not_found"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    BAD_REQUEST = "bad_request"
    HANDLER_ERROR = "handler_error"
    TOO_LARGE = "too_large"
    CANCELLED = "cancelled"


@message(49, registry=None)
@dataclass(frozen=True, slots=True)
class ServiceInfo(Message):
    service: str = wire(min_len=1, max_len=MAX_NAME_LEN)
    kind: str = wire(min_len=1, max_len=16)  # "unary" or "stream"
    idempotent: bool = wire()


@message(48, response=ServiceInfo, registry=None)
@dataclass(frozen=True, slots=True)
class Describe(Message):
    service: str = wire(min_len=1, max_len=MAX_NAME_LEN)


@message(51, registry=None)
@dataclass(frozen=True, slots=True)
class Reply(Message):
    call_id: int = wire(min_value=0, max_value=MAX_CALL_ID)
    reply: Blob = wire()  # noqa: RUF009 - wire() is a dataclasses.field


@message(50, response=Reply, registry=None)
@dataclass(frozen=True, slots=True)
class Call(Message):
    call_id: int = wire(min_value=0, max_value=MAX_CALL_ID)
    service: str = wire(min_len=1, max_len=MAX_NAME_LEN)
    deadline_ms: int = wire(min_value=0, max_value=MAX_DEADLINE_MS)
    request: Blob = wire()  # noqa: RUF009 - wire() is a dataclasses.field


@message(53, registry=None)
@dataclass(frozen=True, slots=True)
class StreamOpened(Message):
    stream_id: int = wire(min_value=0, max_value=MAX_CALL_ID)
    max_credit: int = wire(min_value=1, max_value=MAX_CREDIT_PER_PULL)  # items ahead, at most


@message(52, response=StreamOpened, registry=None)
@dataclass(frozen=True, slots=True)
class StreamOpen(Message):
    call_id: int = wire(min_value=0, max_value=MAX_CALL_ID)
    service: str = wire(min_len=1, max_len=MAX_NAME_LEN)
    deadline_ms: int = wire(min_value=0, max_value=MAX_DEADLINE_MS)
    request: Blob = wire()  # noqa: RUF009 - wire() is a dataclasses.field


@message(55, registry=None)
@dataclass(frozen=True, slots=True)
class StreamItems(Message):
    stream_id: int = wire(min_value=0, max_value=MAX_CALL_ID)
    items: tuple[bytes, ...] = wire(max_len=MAX_CREDIT_PER_PULL)
    end: bool = wire()


@message(54, response=StreamItems, registry=None)
@dataclass(frozen=True, slots=True)
class StreamPull(Message):
    stream_id: int = wire(min_value=0, max_value=MAX_CALL_ID)
    credit: int = wire(min_value=0, max_value=MAX_CREDIT_PER_PULL)


@message(59, registry=None)
@dataclass(frozen=True, slots=True)
class StreamClosed(Message):
    found: bool = wire()


@message(58, response=StreamClosed, registry=None)
@dataclass(frozen=True, slots=True)
class StreamClose(Message):
    stream_id: int = wire(min_value=0, max_value=MAX_CALL_ID)


SERVICE_REQUESTS: tuple[type[Message], ...] = (
    Describe,
    Call,
    StreamOpen,
    StreamPull,
    StreamClose,
)
SERVICE_MESSAGES: tuple[type[Message], ...] = (
    *SERVICE_REQUESTS,
    ServiceInfo,
    Reply,
    StreamOpened,
    StreamItems,
    StreamClosed,
)


def register(registry: MessageRegistry) -> MessageRegistry:
    """Add the services' messages to ``registry`` (idempotent); returns it."""
    for cls in SERVICE_MESSAGES:
        registry.register(cls)
    return registry


register(DEFAULT_REGISTRY)  # PeerHost decodes with it (see exchange/messages.py)
