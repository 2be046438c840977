"""The NAT-PMP codec (RFC 6886): exact bytes out, strict checks in; and the
default gateway from /proc/net/route."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pnode.errors import PortMappingError, ProtocolError
from p2pnode.nat.portmap_core import Proto
from p2pnode.nat.portmap_natpmp import (
    decode_external_reply,
    decode_map_reply,
    encode_external_request,
    encode_map_request,
    parse_default_gateway,
)


def map_reply(op: int = 130, result: int = 0, internal: int = 4001, external: int = 4001) -> bytes:
    return struct.pack("!BBHIHHI", 0, op, result, 77, internal, external, 3600)


def test_requests_are_laid_out_as_rfc_6886_says() -> None:
    assert encode_external_request() == b"\x00\x00"
    # version 0, opcode 2 (TCP), reserved, internal 4001, suggested 4001, 3600 s
    assert encode_map_request(Proto.TCP, 4001, 4001, 3600) == bytes.fromhex(
        "0002 0000 0fa1 0fa1 00000e10"
    )
    assert encode_map_request(Proto.UDP, 4001, 0, 0)[:2] == b"\x00\x01"  # removal


def test_replies_decode() -> None:
    external = struct.pack("!BBHI4s", 0, 128, 0, 42, bytes([203, 0, 113, 2]))
    assert decode_external_reply(external).address == "203.0.113.2"
    reply = decode_map_reply(map_reply(), Proto.TCP)
    assert (reply.internal_port, reply.external_port, reply.lifetime) == (4001, 4001, 3600)
    assert decode_map_reply(map_reply(op=129), Proto.UDP).proto is Proto.UDP


def test_a_refusal_carries_the_result_code() -> None:
    with pytest.raises(PortMappingError, match="out of resources") as raised:
        decode_map_reply(map_reply(result=4), Proto.TCP)
    assert raised.value.code == 4


@pytest.mark.parametrize(
    "data",
    [
        map_reply(op=129),  # a UDP reply to a TCP request
        b"\x01" + map_reply()[1:],  # version 1
        map_reply()[:-1],
        map_reply() + b"\x00",
        b"",
        b"\x00",
    ],
)
def test_a_reply_that_does_not_fit_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_map_reply(data, Proto.TCP)


def test_every_truncation_fails_cleanly() -> None:
    whole = map_reply()
    for end in range(len(whole)):
        with pytest.raises(ProtocolError):
            decode_map_reply(whole[:end], Proto.TCP)


@given(st.binary(max_size=40))
def test_any_bytes_decode_or_fail_with_our_errors(data: bytes) -> None:
    for decode in (
        lambda: decode_map_reply(data, Proto.UDP),
        lambda: decode_external_reply(data),
    ):
        try:
            decode()
        except (ProtocolError, PortMappingError):
            pass


ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t00000000\t014001640\t0003\t0\t0\t0\t00000000\t0\t0\t0
"""


def test_the_default_gateway_comes_from_the_route_table() -> None:
    table = ROUTES.replace("014001640", "01014064")  # 100.64.1.1, little-endian
    assert parse_default_gateway(table) == "100.64.1.1"
    assert parse_default_gateway(ROUTES.splitlines()[0]) is None
    assert parse_default_gateway("header\nbad line\neth0 zz yy xx\n") is None


def test_a_malformed_gateway_is_skipped() -> None:
    too_long = ROUTES.replace("014001640", "F14001640")  # over 32 bits
    assert parse_default_gateway(too_long) is None
