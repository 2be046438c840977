"""What the circuit relay says on the wire. Pure: bytes in, values out.

Two kinds of talk:

- **Mux messages** (type codes 68-75) on an ordinary peer connection between a
  private node and its relay: ``Reserve`` -> ``ReserveReply`` (C asks R), and
  ``Incoming`` -> ``IncomingReply`` (R tells C a dialer waits on circuit id, with
  a one-time secret).
- **Hello frames** on a fresh TCP connection to the relay's port, before
  anything else: a 2-byte big-endian length with the top bit set
  (``0x8000 | n``, so it can never be the 0x0020 that starts every Noise
  handshake on that port) and ``n`` bytes of msgpack::

      ["p2p-relay/1", "connect", target peer id]          D -> R
      ["p2p-relay/1", "accept", circuit id, secret]       C -> R
      ["p2p-relay/1", "status", status, message]          R -> D and C

  After an ``ok`` status both sockets are spliced: the next bytes are the
  Noise handshake between D and C, which the relay only copies.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack  # type: ignore[import-untyped,unused-ignore]

from p2pnode.errors import ProtocolError
from p2pnode.identity import NODE_ID_LEN
from p2pnode.wire.messages import DEFAULT_REGISTRY, Message, MessageRegistry, message, wire

__all__ = [
    "HELLO_FLAG",
    "MAX_HELLO",
    "PROTOCOL",
    "Accept",
    "Connect",
    "Hello",
    "Incoming",
    "IncomingReply",
    "RelayMessages",
    "Reserve",
    "ReserveReply",
    "Status",
    "decode_hello",
    "encode_hello",
    "hello_length",
    "register",
]

PROTOCOL = "p2p-relay/1"
HELLO_FLAG = 0x8000
MAX_HELLO = 512
SECRET_LEN = 16
MAX_CIRCUIT_ID = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Connect:
    target: bytes


@dataclass(frozen=True, slots=True)
class Accept:
    circuit_id: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class Status:
    status: str
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


Hello = Connect | Accept | Status


def encode_hello(hello: Hello) -> bytes:
    if isinstance(hello, Connect):
        body: list[object] = [PROTOCOL, "connect", hello.target]
    elif isinstance(hello, Accept):
        body = [PROTOCOL, "accept", hello.circuit_id, hello.secret]
    else:
        body = [PROTOCOL, "status", hello.status, hello.message[:200]]
    data: bytes = msgpack.packb(body, use_bin_type=True)
    assert len(data) <= MAX_HELLO
    return struct.pack(">H", HELLO_FLAG | len(data)) + data


def hello_length(prefix: bytes) -> int:
    """The body length announced by a 2-byte hello prefix; ProtocolError when
    those bytes are no hello prefix (or announce too much)."""
    (value,) = struct.unpack(">H", prefix[:2])
    if not value & HELLO_FLAG:
        raise ProtocolError("not a relay hello")
    length = value & ~HELLO_FLAG
    if not 0 < length <= MAX_HELLO:
        raise ProtocolError(f"relay hello of {length} bytes")
    return length


def decode_hello(body: bytes) -> Hello:
    """A hello's body, strictly checked; ProtocolError otherwise."""
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_HELLO,
            max_str_len=MAX_HELLO,
            max_array_len=8,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"undecodable relay hello: {exc}") from None
    if type(obj) is not list or len(obj) < 3 or obj[0] != PROTOCOL or type(obj[1]) is not str:
        raise ProtocolError("not a p2p-relay/1 hello")
    kind = obj[1]
    if kind == "connect" and len(obj) == 3:
        target = obj[2]
        if type(target) is bytes and len(target) == NODE_ID_LEN:
            return Connect(target)
    elif kind == "accept" and len(obj) == 4:
        circuit_id, secret = obj[2], obj[3]
        if (
            type(circuit_id) is int
            and 0 < circuit_id <= MAX_CIRCUIT_ID
            and type(secret) is bytes
            and len(secret) == SECRET_LEN
        ):
            return Accept(circuit_id, secret)
    elif (
        kind == "status"
        and len(obj) == 4
        and type(obj[2]) is str
        and type(obj[3]) is str
        and 0 < len(obj[2]) <= 64
    ):
        return Status(obj[2], obj[3])
    raise ProtocolError(f"malformed relay {kind!r} hello")


# -- mux messages (68-75) ---------------------------------------------------------------


@message(69, registry=None)
@dataclass(frozen=True, slots=True)
class ReserveReply(Message):
    """``status`` "ok" with the reservation's lifetime and the circuit limits, or a
    refusal (a :class:`~p2pnode.nat.relay_core.RelayStatus` value)."""

    status: str = wire(min_len=1, max_len=64)
    expires_in: int = wire(min_value=0, max_value=2**31)  # seconds
    circuit_duration: int = wire(min_value=0, max_value=2**31)  # seconds
    circuit_bytes: int = wire(min_value=0, max_value=2**62)


@message(68, response=ReserveReply, registry=None)
@dataclass(frozen=True, slots=True)
class Reserve(Message):
    pass


@message(71, registry=None)
@dataclass(frozen=True, slots=True)
class IncomingReply(Message):
    accepted: bool = wire()


@message(70, response=IncomingReply, registry=None)
@dataclass(frozen=True, slots=True)
class Incoming(Message):
    """A dialer at ``dialer_ip`` waits on circuit ``circuit_id``: accept it by
    opening a TCP connection to the relay with an accept hello."""

    circuit_id: int = wire(min_value=1, max_value=MAX_CIRCUIT_ID)
    secret: bytes = wire(exact_len=SECRET_LEN)
    dialer_ip: str = wire(max_len=64)


RelayMessages = (Reserve, ReserveReply, Incoming, IncomingReply)


def register(registry: MessageRegistry) -> MessageRegistry:
    """Add the relay's messages to ``registry`` (idempotent); returns it."""
    for cls in RelayMessages:
        registry.register(cls)
    return registry


register(DEFAULT_REGISTRY)
