"""The exchange's messages and bitfield codec (pure).

Rules for this module: every exchange message round-trips through both
encoders; any junk, mistyped or oversized input raises a MessageDecodeError
(a ProtocolError) and never any other exception.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.errors import UsageError
from p2pnode.exchange.messages import (
    EXCHANGE_MESSAGES,
    GetHave,
    GetManifest,
    GetPiece,
    Have,
    ManifestData,
    PieceData,
    bitfield_from,
    bitfield_to_set,
    register,
)
from p2pnode.wire.messages import (
    DEFAULT_REGISTRY,
    SCATTER_MIN,
    DecodeLimits,
    ErrorReply,
    Message,
    MessageDecodeError,
    MessageRegistry,
    Ping,
    decode_envelope,
    decode_message,
    encode_envelope,
    encode_envelope_bytes,
    encode_message,
    request,
    response,
)
from tests.unit.test_wire_messages import JUNK_VALUES, messages_of

RID = bytes(range(32))

ALL_MESSAGES = st.one_of(*[messages_of(cls) for cls in EXCHANGE_MESSAGES])


def test_registry_has_the_exchange_messages() -> None:
    codes = {cls.__name__: cls.TYPE_CODE for cls in DEFAULT_REGISTRY.types()}
    for name in ("Ping", "Pong", "ErrorReply", "GetManifest", "ManifestData", "GetPiece"):
        assert name in codes
    assert GetPiece.RESPONSE_TYPE is PieceData
    assert GetManifest.RESPONSE_TYPE is ManifestData
    assert GetHave.RESPONSE_TYPE is Have
    assert len(set(codes.values())) == len(codes)


def test_register_is_explicit_and_idempotent() -> None:
    registry = register(MessageRegistry())
    assert registry.types() == sorted(EXCHANGE_MESSAGES, key=lambda cls: cls.TYPE_CODE)
    assert all(16 <= cls.TYPE_CODE <= 47 for cls in EXCHANGE_MESSAGES)
    register(registry)
    assert len(registry.types()) == len(EXCHANGE_MESSAGES)
    env = request(4, GetPiece(RID, 2))
    assert decode_envelope(encode_envelope_bytes(env), registry=registry) == env


def test_bitfields() -> None:
    assert bitfield_from({0, 9}, 10) == bytes([0x80, 0x40])
    assert bitfield_to_set(bytes([0x80, 0x40]), 10) == {0, 9}
    assert bitfield_to_set(bytes([0x80]), 10) is None  # wrong length
    assert bitfield_to_set(bytes([0x80, 0x20]), 10) is None  # bit past the end
    assert bitfield_to_set(b"", 0) == set()


@given(st.integers(min_value=0, max_value=300), st.data())
def test_bitfields_round_trip(count: int, data: st.DataObject) -> None:
    held = data.draw(st.sets(st.integers(min_value=0, max_value=max(0, count - 1))))
    held = {i for i in held if i < count}
    assert bitfield_to_set(bitfield_from(held, count), count) == held


@settings(max_examples=300, deadline=None)
@given(
    msg=ALL_MESSAGES,
    request_id=st.integers(min_value=0, max_value=2**32 - 1),
    is_request=st.booleans(),
)
def test_every_message_round_trips(msg: Message, request_id: int, is_request: bool) -> None:
    env = request(request_id, msg) if is_request else response(request_id, msg)
    data = encode_envelope_bytes(env)
    assert decode_envelope(data) == env
    # the scatter form is byte-identical to msgpack of the whole array
    assert data == msgpack.packb([int(env.kind), request_id, msg.TYPE_CODE, *msg.wire_values()])
    assert decode_message(encode_message(msg)) == msg


def test_large_piece_is_scattered_not_copied() -> None:
    data = bytearray(os.urandom(1 << 20))
    env = response(9, PieceData(RID, 3, memoryview(data)))
    parts = encode_envelope(env)
    assert len(parts) == 2
    assert isinstance(parts[1], memoryview) and parts[1].obj is data
    decoded = decode_envelope(b"".join(parts))
    assert isinstance(decoded.message, PieceData)
    assert decoded.message.data == bytes(data)
    assert type(decoded.message.data) is bytes
    small = encode_envelope(response(9, PieceData(RID, 3, b"x" * (SCATTER_MIN - 1))))
    assert len(small) == 1


def test_views_decode_gives_piece_data_as_a_view_of_the_payload() -> None:
    data = os.urandom(SCATTER_MIN + 5)
    payload = bytearray(encode_envelope_bytes(response(9, PieceData(RID, 3, data))))
    decoded = decode_envelope(payload, views=True)
    assert decoded == decode_envelope(payload)
    piece = decoded.message
    assert isinstance(piece, PieceData) and isinstance(piece.data, memoryview)
    assert piece.data.obj is payload and piece.data == data
    # a plain bytes field is still copied; small blobs decode as before
    manifest = encode_envelope_bytes(response(1, ManifestData(RID, data)))
    assert type(decode_envelope(manifest, views=True).message.manifest) is bytes  # type: ignore[attr-defined]
    small = encode_envelope_bytes(response(9, PieceData(RID, 3, b"abc")))
    assert type(decode_envelope(small, views=True).message.data) is bytes  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:-1],  # blob shorter than its header says
        lambda b: b + b"x",  # trailing junk after the blob
        lambda b: b[:1] + b"\xc0" + b[2:],  # nil as the kind
    ],
)
def test_views_decode_rejects_what_the_copying_decode_rejects(mutate: Any) -> None:
    good = encode_envelope_bytes(response(9, PieceData(RID, 3, os.urandom(SCATTER_MIN + 5))))
    bad = mutate(good)
    with pytest.raises(MessageDecodeError):
        decode_envelope(bad)
    with pytest.raises(MessageDecodeError):
        decode_envelope(bad, views=True)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ([0, 1, GetPiece.TYPE_CODE, RID, True], "index: expected int"),
        ([0, 1, GetPiece.TYPE_CODE, RID, -1], "outside"),
        ([0, 1, GetPiece.TYPE_CODE, RID, 2**32], "outside"),
        ([0, 1, GetPiece.TYPE_CODE, RID[:31], 1], "length 31"),
        ([0, 1, GetPiece.TYPE_CODE, RID.hex(), 1], "resource_id: expected bin"),
        ([0, 1, GetPiece.TYPE_CODE, RID], "2 fields, got 1"),
        ([0, 1, GetPiece.TYPE_CODE, RID, 1, 2], "2 fields, got 3"),
        ([0, 1, Have.TYPE_CODE, RID, 1, b""], "complete: expected bool"),
        ([0, 1, PieceData.TYPE_CODE, RID, 0, [1, 2]], "data: expected bin"),
    ],
)
def test_mistyped_fields_keep_the_request_id(raw: list[object], match: str) -> None:
    with pytest.raises(MessageDecodeError, match=match) as info:
        decode_envelope(msgpack.packb(raw))
    assert info.value.kind == 0
    assert info.value.request_id == 1


def test_msgpack_limits_apply() -> None:
    data = encode_envelope_bytes(response(1, ManifestData(RID, b"m" * 1000)))
    with pytest.raises(MessageDecodeError):
        decode_envelope(data, DecodeLimits(max_bin_len=999))
    assert decode_envelope(data, DecodeLimits(max_bin_len=1000)).request_id == 1
    long_text = encode_envelope_bytes(response(1, ErrorReply("x", "y" * 1000)))
    with pytest.raises(MessageDecodeError):
        decode_envelope(long_text, DecodeLimits(max_str_len=100))


def test_local_misuse_is_usage_error() -> None:
    with pytest.raises(UsageError, match="length 3"):
        encode_envelope(request(1, GetPiece(b"abc", 1)))
    with pytest.raises(UsageError, match="expected int"):
        encode_envelope(request(1, GetPiece(RID, True)))
    with pytest.raises(UsageError, match="request id"):
        encode_envelope(request(2**32, Ping()))


@settings(max_examples=500, deadline=None)
@given(
    kind=st.integers(min_value=-1, max_value=3),
    request_id=st.integers(min_value=-2, max_value=2**32),
    code=st.sampled_from([c.TYPE_CODE for c in EXCHANGE_MESSAGES]),
    fields=st.lists(JUNK_VALUES, max_size=5),
)
def test_mistyped_envelopes_only_raise_protocol_error(
    kind: int, request_id: int, code: int, fields: list[Any]
) -> None:
    raw = msgpack.packb([kind, request_id, code, *fields])
    try:
        env = decode_envelope(raw)
    except MessageDecodeError:
        return
    assert env.message.problem(decoding=True) is None


@settings(max_examples=300, deadline=None)
@given(msg=ALL_MESSAGES, flips=st.lists(st.integers(min_value=0, max_value=10_000), max_size=4))
def test_bit_flipped_encodings_only_raise_protocol_error(msg: Message, flips: list[int]) -> None:
    data = bytearray(encode_envelope_bytes(request(3, msg)))
    for f in flips:
        data[f % len(data)] ^= 1 << (f % 8)
    try:
        decode_envelope(bytes(data))
    except MessageDecodeError:
        pass
