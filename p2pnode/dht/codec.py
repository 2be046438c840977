"""The rpcudp datagram format, decoded with strict limits. Pure: no I/O, no asyncio.

A datagram is one type byte, a 20-byte message id and one msgpack object:

- ``0x00 | msg_id | [name, [args...]]``: a request for ``rpc_<name>(*args)``;
- ``0x01 | msg_id | payload``: the response to the request with that id.

This is what rpcudp writes with umsgpack (tuples become arrays, ``bytes`` become
bin, ``str`` become str); we decode with ``msgpack`` and bounded lengths so that
whatever a remote sends is either a :class:`Request`, a :class:`Response` or a
:class:`MessageError` naming the reason, never any other exception.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack  # type: ignore[import-untyped,unused-ignore]

from p2pnode.errors import MessageError

REQUEST = 0x00
RESPONSE = 0x01
MSG_ID_LEN = 20
HEADER_LEN = 1 + MSG_ID_LEN
MAX_NAME_LEN = 32
_NAME = re.compile(r"[a-z][a-z0-9_]*")

# Drop reasons (also the ``dropped.<reason>`` counters).
TOO_SHORT = "too_short"
OVERSIZED = "oversized"
BAD_TYPE = "bad_type"
UNDECODABLE = "undecodable"
MALFORMED = "malformed"


@dataclass(frozen=True)
class Limits:
    max_datagram: int = 8192
    max_array_len: int = 512
    max_map_len: int = 8


@dataclass(frozen=True)
class Request:
    msg_id: bytes
    name: str
    args: tuple[object, ...]


@dataclass(frozen=True)
class Response:
    msg_id: bytes
    payload: object


def unpack(data: bytes, limits: Limits) -> object:
    """One msgpack object with bounded lengths, and nothing after it."""
    unpacker = msgpack.Unpacker(
        max_buffer_size=max(limits.max_datagram, 1),
        max_bin_len=limits.max_datagram,
        max_str_len=limits.max_datagram,
        max_array_len=limits.max_array_len,
        max_map_len=limits.max_map_len,
        max_ext_len=0,
        raw=False,
        strict_map_key=True,
        use_list=True,
    )
    try:
        unpacker.feed(data)
        obj = unpacker.unpack()
        end = unpacker.tell()
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        # OutOfData, BufferFull, FormatError, StackError, limits (ValueError),
        # bad UTF-8 (UnicodeDecodeError), unhashable map keys (TypeError).
        raise MessageError(UNDECODABLE, type(exc).__name__) from None
    if end != len(data):
        raise MessageError(UNDECODABLE, "trailing bytes")
    return obj


def decode_datagram(data: bytes, limits: Limits) -> Request | Response:
    if len(data) > limits.max_datagram:
        raise MessageError(OVERSIZED, f"{len(data)} bytes")
    if len(data) <= HEADER_LEN:
        raise MessageError(TOO_SHORT, f"{len(data)} bytes")
    kind = data[0]
    if kind not in (REQUEST, RESPONSE):
        raise MessageError(BAD_TYPE, f"type byte {kind}")
    msg_id = bytes(data[1:HEADER_LEN])
    obj = unpack(bytes(data[HEADER_LEN:]), limits)
    if kind == RESPONSE:
        return Response(msg_id, obj)
    if not isinstance(obj, list) or len(obj) != 2:
        raise MessageError(MALFORMED, "a request is [name, args]")
    name, args = obj
    if not isinstance(name, str) or len(name) > MAX_NAME_LEN or not _NAME.fullmatch(name):
        raise MessageError(MALFORMED, "bad rpc name")
    if not isinstance(args, list):
        raise MessageError(MALFORMED, "args must be an array")
    return Request(msg_id, name, tuple(args))


def pack(obj: object) -> bytes:
    try:
        packed: bytes = msgpack.packb(obj, use_bin_type=True)
        return packed
    except (TypeError, ValueError, OverflowError) as exc:
        raise MessageError(MALFORMED, f"cannot encode: {exc}") from None


def encode_request(msg_id: bytes, name: str, args: Sequence[object]) -> bytes:
    if len(msg_id) != MSG_ID_LEN:
        raise ValueError("message ids are 20 bytes")
    return bytes([REQUEST]) + msg_id + pack([name, list(args)])


def encode_response(msg_id: bytes, payload: object) -> bytes:
    if len(msg_id) != MSG_ID_LEN:
        raise ValueError("message ids are 20 bytes")
    return bytes([RESPONSE]) + msg_id + pack(payload)
