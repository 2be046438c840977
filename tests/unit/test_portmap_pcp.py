"""The PCP codec (RFC 6887, MAP for IPv4): exact bytes out, strict checks in."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pnode.errors import PortMappingError, ProtocolError
from p2pnode.nat.portmap_core import Proto
from p2pnode.nat.portmap_pcp import (
    MAP_SIZE,
    UnsupportedVersion,
    decode_announce_reply,
    decode_map_reply,
    encode_announce,
    encode_map,
)

NONCE = bytes(range(12))


def mapped(ip: str) -> bytes:
    return ipaddress.IPv6Address(f"::ffff:{ip}").packed


def map_reply(
    *,
    result: int = 0,
    nonce: bytes = NONCE,
    protocol: int = 6,
    internal: int = 4001,
    external: int = 4001,
    address: bytes = mapped("203.0.113.2"),
    version: int = 2,
) -> bytes:
    header = struct.pack("!BBBBII12s", version, 0x81, 0, result, 120, 9, bytes(12))
    return header + struct.pack(
        "!12sB3sHH16s", nonce, protocol, bytes(3), internal, external, address
    )


def test_a_map_request_is_laid_out_as_rfc_6887_says() -> None:
    request = encode_map(NONCE, Proto.UDP, 4001, 4001, 3600, "100.64.1.2")
    assert len(request) == MAP_SIZE == 60
    assert request[:8] == bytes.fromhex("0201 0000 00000e10")  # version 2, MAP, lifetime
    assert request[8:24] == mapped("100.64.1.2")  # the client's address, v4-mapped
    assert request[24:36] == NONCE
    assert request[36] == 17  # UDP
    assert request[40:44] == bytes.fromhex("0fa1 0fa1")
    assert request[44:60] == mapped("0.0.0.0")  # no external address suggested
    assert encode_announce("100.64.1.2")[:2] == b"\x02\x00"


def test_a_map_reply_decodes() -> None:
    result = decode_map_reply(map_reply(), NONCE, Proto.TCP, 4001)
    assert (result.external_ip, result.external_port, result.lifetime) == ("203.0.113.2", 4001, 120)
    assert decode_announce_reply(map_reply()[:24].replace(b"\x81", b"\x80", 1)) == 9


def test_a_nat_pmp_router_answering_is_an_unsupported_version() -> None:
    natpmp = struct.pack("!BBHI", 0, 129, 1, 5)
    with pytest.raises(UnsupportedVersion):
        decode_map_reply(natpmp, NONCE, Proto.TCP, 4001)


def test_a_refusal_carries_its_code() -> None:
    with pytest.raises(PortMappingError, match="no resources") as raised:
        decode_map_reply(map_reply(result=8), NONCE, Proto.TCP, 4001)
    assert raised.value.code == 8


@pytest.mark.parametrize(
    "data",
    [
        map_reply(nonce=bytes(12)),  # someone else's mapping
        map_reply(protocol=17),
        map_reply(internal=4002),
        map_reply(address=ipaddress.IPv6Address("2001:db8::1").packed),
        map_reply()[:59],
        map_reply() + b"\x00",  # not a multiple of 4
        map_reply() + bytes(1100),  # over 1100 bytes
    ],
)
def test_a_reply_that_does_not_fit_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_map_reply(data, NONCE, Proto.TCP, 4001)


def test_every_truncation_fails_cleanly() -> None:
    whole = map_reply()
    for end in range(len(whole)):
        with pytest.raises((ProtocolError, PortMappingError)):
            decode_map_reply(whole[:end], NONCE, Proto.TCP, 4001)


@given(st.binary(max_size=80))
def test_any_bytes_decode_or_fail_with_our_errors(data: bytes) -> None:
    try:
        decode_map_reply(data, NONCE, Proto.TCP, 4001)
    except (ProtocolError, PortMappingError):
        pass
