"""The DHT datagram codec and RPC schema: pure, no sockets, no asyncio.

Every malformed input must give a MessageError with a reason, never any other
exception; the format must match what rpcudp writes with umsgpack.
"""

from __future__ import annotations

import os

import msgpack
import pytest
import umsgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.dht import codec, rpc_schema
from p2pnode.dht.codec import Limits, MessageError, Request, Response
from p2pnode.dht.rpc_schema import (
    RPC_NAMES,
    AddProviderRequest,
    FoundValue,
    GetProvidersRequest,
    IdentifyAnswer,
    IdentifyRequest,
    NodeAddr,
    PingRequest,
    SchemaLimits,
    StoreRequest,
    StunRequest,
)

LIMITS = Limits(max_datagram=8192, max_array_len=512, max_map_len=8)
SCHEMA = SchemaLimits(max_value_bytes=4096, max_response_contacts=64)
MSG_ID = b"m" * 20
NID = b"n" * 20
KEY = b"k" * 20
TOKEN = b"t" * 8
CHALLENGE = b"c" * 16
RECORD = [NID, b"p" * 32, [["10.0.0.2", 4001]], 1, 2000, b"s" * 64]  # checked by the core


def reason_of(data: bytes) -> str:
    with pytest.raises(MessageError) as info:
        codec.decode_datagram(data, LIMITS)
    return info.value.reason


# -- wire compatibility with rpcudp (umsgpack) --------------------------------------


def test_decodes_what_rpcudp_sends() -> None:
    # rpcudp: b"\x00" + msg_id + umsgpack.packb([name, args_tuple])
    data = b"\x00" + MSG_ID + umsgpack.packb(["store", (NID, KEY, "é value")])
    assert codec.decode_datagram(data, LIMITS) == Request(MSG_ID, "store", (NID, KEY, "é value"))
    answer = [(NID, "127.0.0.1", 4001)]
    data = b"\x01" + MSG_ID + umsgpack.packb(answer)
    assert codec.decode_datagram(data, LIMITS) == Response(MSG_ID, [[NID, "127.0.0.1", 4001]])
    data = b"\x01" + MSG_ID + umsgpack.packb({"value": 1.5})
    assert codec.decode_datagram(data, LIMITS) == Response(MSG_ID, {"value": 1.5})


def test_rpcudp_decodes_what_we_send() -> None:
    data = codec.encode_request(MSG_ID, "find_value", (NID, KEY))
    assert data[:21] == b"\x00" + MSG_ID
    assert umsgpack.unpackb(data[21:]) == ["find_value", [NID, KEY]]
    for payload in (NID, True, {"value": b"\x00bytes"}, [[NID, "::1", 5]], -(2**63), 2**64 - 1):
        data = codec.encode_response(MSG_ID, payload)
        assert data[:21] == b"\x01" + MSG_ID
        assert umsgpack.unpackb(data[21:]) == payload


def test_roundtrip() -> None:
    data = codec.encode_request(MSG_ID, "add_provider", (NID, KEY, 4001))
    assert codec.decode_datagram(data, LIMITS) == Request(MSG_ID, "add_provider", (NID, KEY, 4001))


# -- every malformed datagram class -------------------------------------------------


def test_too_short() -> None:
    assert reason_of(b"") == codec.TOO_SHORT
    assert reason_of(b"\x00" + MSG_ID) == codec.TOO_SHORT


def test_oversized() -> None:
    assert reason_of(b"\x00" + MSG_ID + b"\x90" * 9000) == codec.OVERSIZED


def test_unknown_type_byte() -> None:
    assert reason_of(b"\x02" + MSG_ID + msgpack.packb(1)) == codec.BAD_TYPE


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never used
        b"\x92\xa4ping",  # truncated array
        msgpack.packb(1) + b"\x00",  # trailing bytes
        b"\xdd\xff\xff\xff\xff",  # array claiming 4G elements
        b"\xdf\xff\xff\xff\xff",  # map claiming 4G entries
        b"\xc6\xff\xff\xff\xff",  # bin claiming 4 GB
        b"\xdb\x00\x01\x00\x00" + b"a" * 10,  # str longer than the datagram
        b"\xa3\xff\xfe\xfd",  # invalid UTF-8
        msgpack.packb({1: 2}),  # non-string map key
        b"\x81\x91\x01\x02",  # array as a map key
        msgpack.packb(msgpack.ExtType(5, b"xx")),  # ext types
        b"\xd6\xff" + b"\x00" * 4,  # timestamp ext
        b"\x91" * 3000 + b"\x01",  # deep nesting
        msgpack.packb(list(range(600))),  # more than max_array_len
    ],
)
def test_undecodable(payload: bytes) -> None:
    for kind in (b"\x00", b"\x01"):
        assert reason_of(kind + MSG_ID + payload) == codec.UNDECODABLE


@pytest.mark.parametrize(
    "obj",
    [
        "ping",
        ["ping"],
        ["ping", [NID], 3],
        [b"ping", [NID]],
        [1, [NID]],
        ["ping", NID],
        ["ping", {"a": 1}],
        ["__init__", []],
        ["Ping", []],
        ["x" * 40, []],
    ],
)
def test_malformed_request(obj: object) -> None:
    assert reason_of(b"\x00" + MSG_ID + msgpack.packb(obj, use_bin_type=True)) == codec.MALFORMED


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    for prefix in (b"", b"\x00" + MSG_ID, b"\x01" + MSG_ID):
        try:
            message = codec.decode_datagram(prefix + data, LIMITS)
        except MessageError:
            continue
        assert isinstance(message, Request | Response)
        if isinstance(message, Request):
            try:
                rpc_schema.parse_request(message.name, message.args, SCHEMA)
            except MessageError:
                pass


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_like)
def test_fuzz_answers_never_raise_other_errors(payload: object) -> None:
    for parse in (
        rpc_schema.parse_ping_response,
        rpc_schema.parse_bool_response,
        rpc_schema.parse_stun_response,
        lambda p: rpc_schema.parse_node_list(p, SCHEMA),
        lambda p: rpc_schema.parse_find_value_response(p, SCHEMA),
        lambda p: rpc_schema.parse_get_providers_response(p, SCHEMA),
        rpc_schema.parse_identify_response,
    ):
        try:
            parse(payload)
        except MessageError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(RPC_NAMES) | st.text(max_size=20), st.lists(json_like, max_size=5))
def test_fuzz_requests_never_raise_other_errors(name: str, args: list[object]) -> None:
    try:
        rpc_schema.parse_request(name, tuple(args), SCHEMA)
    except MessageError:
        pass


def test_fed_one_byte_at_a_time() -> None:
    data = codec.encode_request(MSG_ID, "ping", (NID,))
    for end in range(len(data)):
        with pytest.raises(MessageError):
            codec.decode_datagram(data[:end], LIMITS)
    assert codec.decode_datagram(data, LIMITS) == Request(MSG_ID, "ping", (NID,))


# -- requests -------------------------------------------------------------------------


def test_parse_good_requests() -> None:
    parse = rpc_schema.parse_request
    assert parse("ping", (NID,), SCHEMA) == PingRequest(NID)
    assert parse("stun", (), SCHEMA) == StunRequest()
    # A stock kademlia store has no token (parsed, then refused by the core).
    assert parse("store", (NID, KEY, b"v"), SCHEMA) == StoreRequest(NID, KEY, b"v", None)
    assert parse("store", (NID, KEY, b"v", TOKEN), SCHEMA) == StoreRequest(NID, KEY, b"v", TOKEN)
    assert parse("identify", (NID, CHALLENGE), SCHEMA) == IdentifyRequest(NID, CHALLENGE)
    assert parse("identify", (NID, b"c" * 64), SCHEMA) == IdentifyRequest(NID, b"c" * 64)
    assert parse("add_provider", (NID, KEY, RECORD, TOKEN), SCHEMA) == AddProviderRequest(
        NID, KEY, RECORD, TOKEN
    )
    assert parse("get_providers", (NID, KEY), SCHEMA) == GetProvidersRequest(NID, KEY)
    for value in (0, -1, 2**64 - 1, 1.5, True, False, "", "x" * 4096, b"\x00" * 4096):
        assert parse("store", (NID, KEY, value), SCHEMA).value == value  # type: ignore[union-attr]
        assert parse("store", (NID, KEY, value, TOKEN), SCHEMA).value == value  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("name", "args", "reason"),
    [
        ("shutdown", (), rpc_schema.UNKNOWN_RPC),
        ("welcome_if_new", (NID,), rpc_schema.UNKNOWN_RPC),
        ("ping", (), rpc_schema.BAD_ARGS),
        ("ping", (NID, NID), rpc_schema.BAD_ARGS),
        ("ping", (5,), rpc_schema.BAD_ARGS),
        ("ping", (b"short",), rpc_schema.BAD_ARGS),
        ("ping", ("n" * 20,), rpc_schema.BAD_ARGS),
        ("stun", (NID,), rpc_schema.BAD_ARGS),
        ("find_node", (NID, b"k" * 21), rpc_schema.BAD_ARGS),
        ("find_value", (NID, None), rpc_schema.BAD_ARGS),
        ("store", (NID, KEY, None), rpc_schema.BAD_ARGS),
        ("store", (NID, KEY, [1, 2]), rpc_schema.BAD_ARGS),
        ("store", (NID, KEY, {"a": 1}), rpc_schema.BAD_ARGS),
        ("store", (NID, KEY, b"x" * 4097), rpc_schema.BAD_ARGS),
        ("store", (NID, KEY, "é" * 2049), rpc_schema.BAD_ARGS),
        ("store", (NID, b"k", b"v"), rpc_schema.BAD_ARGS),
        ("store", (NID, KEY, b"v", b""), rpc_schema.BAD_ARGS),
        ("store", (NID, KEY, b"v", b"t" * 33), rpc_schema.BAD_ARGS),
        ("store", (NID, KEY, b"v", "token"), rpc_schema.BAD_ARGS),
        ("store", (NID, KEY, None, TOKEN), rpc_schema.BAD_ARGS),
        ("store", (NID, KEY, b"v", TOKEN, TOKEN), rpc_schema.BAD_ARGS),
        ("identify", (NID,), rpc_schema.BAD_ARGS),
        ("identify", (NID, b"c" * 15), rpc_schema.BAD_ARGS),
        ("identify", (NID, b"c" * 65), rpc_schema.BAD_ARGS),
        ("identify", (NID, "c" * 16), rpc_schema.BAD_ARGS),
        ("identify", (b"short", CHALLENGE), rpc_schema.BAD_ARGS),
        # add_provider carries a signed record and a token now (the old
        # [nodeid, key, port] form is refused).
        ("add_provider", (NID, KEY, 4001), rpc_schema.BAD_ARGS),
        ("add_provider", (NID, KEY, 4001, TOKEN), rpc_schema.BAD_ARGS),
        ("add_provider", (NID, KEY, {"r": 1}, TOKEN), rpc_schema.BAD_ARGS),
        ("add_provider", (NID, KEY, RECORD), rpc_schema.BAD_ARGS),
        ("add_provider", (NID, KEY, RECORD, b""), rpc_schema.BAD_ARGS),
        ("add_provider", (NID, KEY, RECORD, None), rpc_schema.BAD_ARGS),
        ("add_provider", (NID, b"k", RECORD, TOKEN), rpc_schema.BAD_ARGS),
        ("get_providers", (NID,), rpc_schema.BAD_ARGS),
    ],
)
def test_parse_bad_requests(name: str, args: tuple[object, ...], reason: str) -> None:
    with pytest.raises(MessageError) as info:
        rpc_schema.parse_request(name, args, SCHEMA)
    assert info.value.reason == reason


# -- answers --------------------------------------------------------------------------


def test_node_lists() -> None:
    good = [NID, "127.0.0.1", 4001]
    listed = rpc_schema.parse_node_list(
        [
            good,
            [b"a" * 20, "::ffff:10.0.0.1", 1],
            [b"b" * 20, "::1", 65535],
            [b"c" * 20, "localhost", 1],  # not an IP literal
            [b"d" * 20, "0.0.0.0", 1],  # unspecified
            [b"e" * 20, "224.0.0.1", 1],  # multicast
            [b"f" * 19, "10.0.0.1", 1],
            [b"g" * 20, "10.0.0.1", 0],
            [b"h" * 20, "10.0.0.1", True],
            [b"i" * 20, "10.0.0.1"],
            "junk",
            good,  # duplicate id
        ],
        SCHEMA,
    )
    assert listed.nodes == [
        NodeAddr(NID, "127.0.0.1", 4001),
        NodeAddr(b"a" * 20, "10.0.0.1", 1),
        NodeAddr(b"b" * 20, "::1", 65535),
    ]
    assert listed.skipped == 9
    for bad in (None, {"a": 1}, b"x", [good] * 65):
        with pytest.raises(MessageError):
            rpc_schema.parse_node_list(bad, SCHEMA)


def test_answers() -> None:
    assert rpc_schema.parse_ping_response(NID) == NID
    for bad in (None, b"x", "n" * 20, [NID]):
        with pytest.raises(MessageError):
            rpc_schema.parse_ping_response(bad)
    assert rpc_schema.parse_bool_response(True) is True
    with pytest.raises(MessageError):
        rpc_schema.parse_bool_response(1)
    assert rpc_schema.parse_find_value_response({"value": "v"}, SCHEMA) == FoundValue("v")
    for bad in ({"value": [1]}, {"value": b"x" * 5000}, {"value": 1, "x": 2}, {}, None):
        with pytest.raises(MessageError):
            rpc_schema.parse_find_value_response(bad, SCHEMA)
    # get_providers: record wire lists (checked by the core), nodes and a token.
    answer = rpc_schema.parse_get_providers_response(
        {"providers": [RECORD, "junk"], "nodes": [[NID, "10.0.0.2", 4001]], "token": TOKEN},
        SCHEMA,
    )
    assert answer.records == [RECORD]  # what is not even a list is left out
    assert answer.nodes.nodes == [NodeAddr(NID, "10.0.0.2", 4001)]
    assert answer.token == TOKEN
    for bad in (
        {"providers": [], "nodes": None, "token": TOKEN},
        {"providers": [], "nodes": []},  # no token
        {"providers": [], "nodes": [], "token": b""},
        {"providers": [], "nodes": [], "token": "t"},
        {"providers": None, "nodes": [], "token": TOKEN},
        {"providers": [RECORD] * 65, "nodes": [], "token": TOKEN},
        {"providers": [], "nodes": [], "token": TOKEN, "x": 1},
        {"providers": []},
        [[], []],
    ):
        with pytest.raises(MessageError):
            rpc_schema.parse_get_providers_response(bad, SCHEMA)
    # identify: [public key, signature, token, the asker's ip as seen] (the proof
    # itself is checked by the core).
    good = [b"p" * 32, b"s" * 64, TOKEN, "::ffff:10.0.0.1"]
    assert rpc_schema.parse_identify_response(good) == IdentifyAnswer(
        b"p" * 32, b"s" * 64, TOKEN, "10.0.0.1"
    )
    for index, wrong in [
        (0, b"p" * 31),
        (0, "p" * 32),
        (1, b"s" * 63),
        (1, None),
        (2, b""),
        (2, b"t" * 33),
        (3, "not-an-ip"),
        (3, 7),
    ]:
        bad_answer = list(good)
        bad_answer[index] = wrong
        with pytest.raises(MessageError):
            rpc_schema.parse_identify_response(bad_answer)
    for bad in (good[:3], [*good, 1], None, {"key": 1}):
        with pytest.raises(MessageError):
            rpc_schema.parse_identify_response(bad)
    assert rpc_schema.parse_stun_response(["127.0.0.1", 5]) == ("127.0.0.1", 5)


def test_value_checks() -> None:
    assert rpc_schema.check_value("x", 1) == "x"
    for bad in (2**64, -(2**63) - 1, "\ud800", None, bytearray(b"x"), [1]):
        with pytest.raises(MessageError):
            rpc_schema.check_value(bad, 4096)
    assert rpc_schema.normalize_host("::FFFF:1.2.3.4") == "1.2.3.4"
    assert rpc_schema.normalize_host("2001:DB8::1") == "2001:db8::1"
    assert rpc_schema.normalize_host(os.urandom(4)) is None
