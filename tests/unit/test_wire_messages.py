"""Message and envelope codec tests (pure).

Rules for this module: every core message type (and the test messages below)
round-trips through both encoders; any junk, mistyped or oversized input raises
a MessageDecodeError (a ProtocolError) and never any other exception. The
exchange's own messages are tested in test_exchange_messages.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.errors import ProtocolError, UsageError
from p2pnode.wire.messages import (
    DEFAULT_REGISTRY,
    GOAWAY_MAX_READ,
    SCATTER_MIN,
    Blob,
    CancelRequest,
    DecodeLimits,
    Envelope,
    ErrorCode,
    ErrorReply,
    FieldSpec,
    GoAway,
    Kind,
    Message,
    MessageDecodeError,
    MessageRegistry,
    Ping,
    Pong,
    UnknownMessageType,
    cancel,
    decode_envelope,
    decode_message,
    encode_envelope,
    encode_envelope_bytes,
    encode_message,
    goaway,
    message,
    request,
    response,
    wire,
)

RID = bytes(range(32))

# The core messages and two test messages shaped like a feature's (a trailing
# Blob, and a plain bytes field), in a registry of their own: the generic codec
# is tested here whatever else a test run has registered in DEFAULT_REGISTRY.
REG = MessageRegistry()
for _cls in (Ping, Pong, ErrorReply):
    REG.register(_cls)


@message(100, registry=REG)
@dataclass(frozen=True, slots=True)
class Chunk(Message):
    key: bytes = wire(exact_len=32)
    index: int = wire(min_value=0, max_value=0xFFFFFFFF)
    data: Blob = wire()  # noqa: RUF009 - wire() is a dataclasses.field


@message(101, registry=REG)
@dataclass(frozen=True, slots=True)
class Note(Message):
    key: bytes = wire(exact_len=32)
    flag: bool = wire()
    body: bytes = wire()


def values_for(spec: FieldSpec) -> st.SearchStrategy[Any]:
    c = spec.constraint
    if spec.wire_type is bytes:
        if c.exact_len is not None:
            return st.binary(min_size=c.exact_len, max_size=c.exact_len)
        return st.binary(min_size=c.min_len or 0, max_size=min(c.max_len or 300, 300))
    if spec.wire_type is str:
        return st.text(min_size=c.min_len or 0, max_size=min(c.max_len or 100, 100))
    if spec.wire_type is bool:
        return st.booleans()
    if spec.wire_type is int:
        lo = -(2**63) if c.min_value is None else c.min_value
        hi = 2**64 - 1 if c.max_value is None else c.max_value
        return st.integers(min_value=lo, max_value=hi)
    if spec.wire_type is float:
        return st.floats(allow_nan=False)
    raise AssertionError(spec)


def messages_of(cls: type[Message]) -> st.SearchStrategy[Message]:
    return st.builds(cls, *[values_for(s) for s in cls.WIRE_FIELDS])


ALL_MESSAGES = st.one_of(*[messages_of(cls) for cls in REG.types()])


def test_registry_has_the_core_messages() -> None:
    codes = {cls.__name__: cls.TYPE_CODE for cls in DEFAULT_REGISTRY.types()}
    for name in ("Ping", "Pong", "ErrorReply"):
        assert name in codes
    assert all(codes[name] <= 15 for name in ("Ping", "Pong", "ErrorReply"))
    assert Ping.RESPONSE_TYPE is Pong
    assert len(set(codes.values())) == len(codes)


@settings(max_examples=300, deadline=None)
@given(
    msg=ALL_MESSAGES,
    request_id=st.integers(min_value=0, max_value=2**32 - 1),
    is_request=st.booleans(),
)
def test_every_message_round_trips(msg: Message, request_id: int, is_request: bool) -> None:
    env = request(request_id, msg) if is_request else response(request_id, msg)
    data = encode_envelope_bytes(env)
    assert decode_envelope(data, registry=REG) == env
    # the scatter form is byte-identical to msgpack of the whole array
    assert data == msgpack.packb([int(env.kind), request_id, msg.TYPE_CODE, *msg.wire_values()])
    assert decode_message(encode_message(msg), registry=REG) == msg


def test_large_blob_is_scattered_not_copied() -> None:
    data = bytearray(os.urandom(1 << 20))
    env = response(9, Chunk(RID, 3, memoryview(data)))
    parts = encode_envelope(env)
    assert len(parts) == 2
    assert isinstance(parts[1], memoryview) and parts[1].obj is data
    decoded = decode_envelope(b"".join(parts), registry=REG)
    assert isinstance(decoded.message, Chunk)
    assert decoded.message.data == bytes(data)
    assert type(decoded.message.data) is bytes
    small = encode_envelope(response(9, Chunk(RID, 3, b"x" * (SCATTER_MIN - 1))))
    assert len(small) == 1


def test_views_decode_gives_a_blob_as_a_view_of_the_payload() -> None:
    data = os.urandom(SCATTER_MIN + 5)
    payload = bytearray(encode_envelope_bytes(response(9, Chunk(RID, 3, data))))
    decoded = decode_envelope(payload, registry=REG, views=True)
    assert decoded == decode_envelope(payload, registry=REG)
    chunk = decoded.message
    assert isinstance(chunk, Chunk) and isinstance(chunk.data, memoryview)
    assert chunk.data.obj is payload and chunk.data == data
    # a plain bytes field is still copied; small blobs decode as before
    note = encode_envelope_bytes(response(1, Note(RID, True, data)))
    assert type(decode_envelope(note, registry=REG, views=True).message.body) is bytes  # type: ignore[attr-defined]
    small = encode_envelope_bytes(response(9, Chunk(RID, 3, b"abc")))
    assert type(decode_envelope(small, registry=REG, views=True).message.data) is bytes  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:-1],  # blob shorter than its header says
        lambda b: b + b"x",  # trailing junk after the blob
        lambda b: b[:1] + b"\xc0" + b[2:],  # nil as the kind
    ],
)
def test_views_decode_rejects_what_the_copying_decode_rejects(mutate: Any) -> None:
    good = encode_envelope_bytes(response(9, Chunk(RID, 3, os.urandom(SCATTER_MIN + 5))))
    bad = mutate(good)
    with pytest.raises(MessageDecodeError):
        decode_envelope(bad, registry=REG)
    with pytest.raises(MessageDecodeError):
        decode_envelope(bad, registry=REG, views=True)


def test_error_kind_requires_error_reply() -> None:
    env = response(1, ErrorReply("busy", "later"))
    assert env.kind is Kind.ERROR
    assert decode_envelope(encode_envelope_bytes(env)) == env
    bad = msgpack.packb([2, 1, Pong.TYPE_CODE])
    with pytest.raises(MessageDecodeError, match="ErrorReply"):
        decode_envelope(bad)
    with pytest.raises(UsageError):
        encode_envelope(Envelope(Kind.ERROR, 1, Pong()))


def test_cancel_kind_carries_only_a_cancel_request() -> None:
    env = cancel(7)
    assert env == Envelope(Kind.CANCEL, 7, CancelRequest())
    data = encode_envelope_bytes(env)
    assert data == msgpack.packb([3, 7, CancelRequest.TYPE_CODE])
    assert decode_envelope(data) == env
    for bad in ([3, 7, Pong.TYPE_CODE], [0, 7, CancelRequest.TYPE_CODE]):
        with pytest.raises(MessageDecodeError, match="CancelRequest") as info:
            decode_envelope(msgpack.packb(bad))
        assert info.value.request_id == 7
    with pytest.raises(UsageError):
        encode_envelope(Envelope(Kind.CANCEL, 1, Pong()))
    with pytest.raises(UsageError):
        encode_envelope(request(1, CancelRequest()))


def test_goaway_kind_carries_only_a_goaway() -> None:
    env = goaway((3, 9))
    assert env == Envelope(Kind.GOAWAY, 0, GoAway((3, 9)))
    data = encode_envelope_bytes(env)
    assert data == msgpack.packb([4, 0, GoAway.TYPE_CODE, [3, 9]])
    assert decode_envelope(data) == env
    assert decode_envelope(encode_envelope_bytes(goaway())) == Envelope(Kind.GOAWAY, 0, GoAway(()))
    for bad in ([4, 0, Pong.TYPE_CODE], [0, 7, GoAway.TYPE_CODE, []]):
        with pytest.raises(MessageDecodeError, match="GoAway"):
            decode_envelope(msgpack.packb(bad))
    too_many = msgpack.packb([4, 0, GoAway.TYPE_CODE, list(range(GOAWAY_MAX_READ + 1))])
    with pytest.raises(MessageDecodeError, match="read"):
        decode_envelope(too_many)
    with pytest.raises(MessageDecodeError, match="items"):
        decode_envelope(msgpack.packb([4, 0, GoAway.TYPE_CODE, ["x"]]))
    with pytest.raises(UsageError):
        encode_envelope(Envelope(Kind.GOAWAY, 0, Pong()))
    with pytest.raises(UsageError):
        encode_envelope(request(1, GoAway(())))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ([0, 1, Chunk.TYPE_CODE, RID, True, b""], "index: expected int"),
        ([0, 1, Chunk.TYPE_CODE, RID, -1, b""], "outside"),
        ([0, 1, Chunk.TYPE_CODE, RID, 2**32, b""], "outside"),
        ([0, 1, Chunk.TYPE_CODE, RID[:31], 1, b""], "length 31"),
        ([0, 1, Chunk.TYPE_CODE, RID.hex(), 1, b""], "key: expected bin"),
        ([0, 1, Chunk.TYPE_CODE, RID, 1], "3 fields, got 2"),
        ([0, 1, Chunk.TYPE_CODE, RID, 1, b"", 2], "3 fields, got 4"),
        ([0, 1, Note.TYPE_CODE, RID, 1, b""], "flag: expected bool"),
        ([0, 1, ErrorReply.TYPE_CODE, "", "m"], "below 1"),
        ([0, 1, ErrorReply.TYPE_CODE, b"busy", "m"], "code: expected str"),
        ([0, 1, Chunk.TYPE_CODE, RID, 0, [1, 2]], "data: expected bin"),
    ],
)
def test_mistyped_fields_keep_the_request_id(raw: list[object], match: str) -> None:
    with pytest.raises(MessageDecodeError, match=match) as info:
        decode_envelope(msgpack.packb(raw), registry=REG)
    assert info.value.kind == 0
    assert info.value.request_id == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        msgpack.packb(5),
        msgpack.packb([0, 1]),
        msgpack.packb([3, 1, 1]),
        msgpack.packb([True, 1, 1]),
        msgpack.packb([0, -1, 1]),
        msgpack.packb([0, 2**32, 1]),
        msgpack.packb([0, "x", 1]),
        msgpack.packb({"a": 1}),
        msgpack.packb([0, 1, 1]) + b"\x00",  # trailing data
        msgpack.packb([0, 1, 1, msgpack.ExtType(5, b"x")]),
        msgpack.packb([[[[[[[[[[[[]]]]]]]]]]]]),
        b"\xdd\xff\xff\xff\xff",  # array of 4G items
        b"\xc6\x7f\xff\xff\xff",  # bin of 2 GiB announced
    ],
)
def test_junk_envelopes(raw: bytes) -> None:
    with pytest.raises(MessageDecodeError):
        decode_envelope(raw)


def test_unknown_type_is_answerable() -> None:
    with pytest.raises(UnknownMessageType) as info:
        decode_envelope(msgpack.packb([0, 77, 9999, b"x"]))
    assert (info.value.kind, info.value.request_id, info.value.type_code) == (0, 77, 9999)
    assert isinstance(info.value, ProtocolError)


def test_msgpack_limits_apply() -> None:
    data = encode_envelope_bytes(response(1, Note(RID, False, b"m" * 1000)))
    with pytest.raises(MessageDecodeError):
        decode_envelope(data, DecodeLimits(max_bin_len=999), REG)
    assert decode_envelope(data, DecodeLimits(max_bin_len=1000), REG).request_id == 1
    long_text = encode_envelope_bytes(response(1, ErrorReply("x", "y" * 1000)))
    with pytest.raises(MessageDecodeError):
        decode_envelope(long_text, DecodeLimits(max_str_len=100))


def test_local_misuse_is_usage_error() -> None:
    with pytest.raises(UsageError, match="length 3"):
        encode_envelope(request(1, Chunk(b"abc", 1, b"")))
    with pytest.raises(UsageError, match="expected int"):
        encode_envelope(request(1, Chunk(RID, True, b"")))
    with pytest.raises(UsageError, match="request id"):
        encode_envelope(request(2**32, Ping()))


def test_registry_extension_and_conflicts() -> None:
    registry = DEFAULT_REGISTRY.copy()

    @message(200, registry=registry)
    @dataclass(frozen=True, slots=True)
    class Echo(Message):
        text: str = wire(max_len=10)
        tags: tuple[int, ...] = wire(max_len=3)

    env = request(5, Echo("hi", (1, 2)))
    assert decode_envelope(encode_envelope_bytes(env), registry=registry) == env
    with pytest.raises(UnknownMessageType):
        decode_envelope(encode_envelope_bytes(env))  # not in the default registry
    with pytest.raises(MessageDecodeError, match="items must be int"):
        decode_envelope(msgpack.packb([0, 1, 200, "a", [1, "x"]]), registry=registry)
    with pytest.raises(MessageDecodeError, match="length 4"):
        decode_envelope(msgpack.packb([0, 1, 200, "a", [1, 2, 3, 4]]), registry=registry)
    with pytest.raises(ValueError, match="already used"):

        @message(Ping.TYPE_CODE, registry=registry)
        @dataclass(frozen=True, slots=True)
        class Clash(Message):
            pass

    with pytest.raises(TypeError, match="frozen"):

        @message(201, registry=registry)
        @dataclass
        class NotFrozen(Message):
            pass

    assert isinstance(MessageRegistry().types(), list)


JUNK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(
    kind=st.integers(min_value=-1, max_value=3),
    request_id=st.integers(min_value=-2, max_value=2**32),
    code=st.sampled_from([c.TYPE_CODE for c in REG.types()] + [0, 999]),
    fields=st.lists(JUNK_VALUES, max_size=5),
)
def test_mistyped_envelopes_only_raise_protocol_error(
    kind: int, request_id: int, code: int, fields: list[Any]
) -> None:
    raw = msgpack.packb([kind, request_id, code, *fields])
    try:
        env = decode_envelope(raw, registry=REG)
    except MessageDecodeError:
        return
    assert env.message.problem(decoding=True) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    try:
        decode_envelope(data)
    except MessageDecodeError:
        pass
    try:
        decode_message(data)
    except MessageDecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(msg=ALL_MESSAGES, flips=st.lists(st.integers(min_value=0, max_value=10_000), max_size=4))
def test_bit_flipped_encodings_only_raise_protocol_error(msg: Message, flips: list[int]) -> None:
    data = bytearray(encode_envelope_bytes(request(3, msg)))
    for f in flips:
        data[f % len(data)] ^= 1 << (f % 8)
    try:
        decode_envelope(bytes(data), registry=REG)
    except MessageDecodeError:
        pass


# -- the generated per-class checks agree with FieldSpec.check ----------------------


def _every_message_class() -> list[type[Message]]:
    import p2pnode.node  # noqa: F401 - imports every feature, so all message types exist

    found: list[type[Message]] = []
    todo = list(Message.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.TYPE_CODE > 0:
            found.append(cls)
    return found


EVERY_MESSAGE_CLASS = _every_message_class()


def near(spec: FieldSpec) -> st.SearchStrategy[Any]:
    """Values of every wire type, with lengths and integers on and around the
    spec's own limits."""
    c = spec.constraint
    edges = [x for x in (c.exact_len, c.min_len, c.max_len) if x is not None]
    sizes = st.sampled_from(
        sorted({0, 1, 2, *edges, *(e - 1 for e in edges), *(e + 1 for e in edges)} - {-1})
    )
    ints = [x for x in (c.min_value, c.max_value, -(2**63), 2**64 - 1) if x is not None]
    return st.one_of(
        sizes.map(lambda n: b"x" * n),
        sizes.map(lambda n: bytearray(n)),
        sizes.map(lambda n: memoryview(b"y" * n)),
        sizes.map(lambda n: "s" * n),
        sizes.map(lambda n: ErrorCode.BUSY if n == 4 else "t" * n),
        st.sampled_from(ints).flatmap(lambda v: st.sampled_from([v - 1, v, v + 1])),
        st.integers(),
        st.booleans(),
        st.floats(allow_nan=False),
        st.none(),
        sizes.map(lambda n: tuple(b"z" * 32 for _ in range(n))),
        sizes.map(lambda n: tuple(range(n))),
    )


@settings(max_examples=60, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("cls", EVERY_MESSAGE_CLASS, ids=lambda c: c.__name__)
def test_generated_checks_say_what_field_checks_say(
    cls: type[Message], data: st.DataObject
) -> None:
    values = [data.draw(near(spec)) for spec in cls.WIRE_FIELDS]
    slow_decoding = all(
        s.check(v, decoding=True) is None for s, v in zip(cls.WIRE_FIELDS, values, strict=True)
    )
    assert cls._decoded_ok(values) == slow_decoding
    msg = object.__new__(cls)
    for spec, value in zip(cls.WIRE_FIELDS, values, strict=True):
        object.__setattr__(msg, spec.name, value)
    fast = cls._checked_values(msg)
    if fast is not None:
        assert msg.problem() is None and fast == values
    elif not any(isinstance(v, memoryview) for v in values):
        assert msg.problem() is not None  # only a view takes the slow path when fine


def test_generated_checks_cover_every_registered_type() -> None:
    from p2pnode.exchange.messages import PieceData
    from p2pnode.nat.holepunch_messages import PunchSync
    from p2pnode.services.messages import Call

    every = set(EVERY_MESSAGE_CLASS)
    assert {Ping, Pong, ErrorReply, CancelRequest, PieceData, Call, PunchSync} <= every
