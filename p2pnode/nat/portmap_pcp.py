"""PCP (RFC 6887), the MAP opcode for IPv4: the codec (pure) and a client on the
NAT-PMP channel (same port 5351; a NAT-PMP-only router answers a PCP request
with version 0 and "unsupported version", and the caller falls back to NAT-PMP).

No Python PCP library exists that we found (the NAT-PMP ones are v0 only).
What is spoken: ANNOUNCE as a probe, MAP to create, renew (same nonce) and
delete (lifetime 0). No options (no THIRD_PARTY, no FILTER), no PEER.

Trust: a reply must carry our nonce, protocol and internal port; anything else
is dropped and counted. Lifetimes are clamped to what we asked for.
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass

from p2pnode.errors import PortMappingError, ProtocolError
from p2pnode.nat.portmap_core import Proto
from p2pnode.nat.portmap_natpmp import PmpChannel

VERSION = 2
OP_ANNOUNCE = 0
OP_MAP = 1
RESPONSE = 0x80
PROTOCOLS = {Proto.TCP: 6, Proto.UDP: 17}
MAX_SIZE = 1100  # RFC 6887 section 7: messages are at most 1100 bytes
NONCE_SIZE = 12
RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized",
    3: "malformed request",
    4: "unsupported opcode",
    5: "unsupported option",
    6: "malformed option",
    7: "network failure",
    8: "no resources",
    9: "unsupported protocol",
    10: "user exceeded quota",
    11: "cannot provide external",
    12: "address mismatch",
    13: "excessive remote peers",
}
UNSUPP_OPCODE = 4

_REQUEST = struct.Struct("!BBHI16s")  # version, R|opcode, reserved, lifetime, client IP
_RESPONSE = struct.Struct("!BBBBII12s")  # version, R|opcode, reserved, result, lifetime, epoch
_MAP = struct.Struct("!12sB3sHH16s")  # nonce, protocol, reserved, internal, external, address
MAP_SIZE = _RESPONSE.size + _MAP.size  # 60


class UnsupportedVersion(PortMappingError):
    """The gateway answered in another version (a NAT-PMP-only router)."""


@dataclass(frozen=True)
class MapResult:
    external_ip: str
    external_port: int
    lifetime: int
    epoch: int


def _v4_mapped(ip: str) -> bytes:
    return ipaddress.IPv6Address(f"::ffff:{ip}").packed


def encode_announce(client_ip: str) -> bytes:
    return _REQUEST.pack(VERSION, OP_ANNOUNCE, 0, 0, _v4_mapped(client_ip))


def encode_map(
    nonce: bytes,
    proto: Proto,
    internal_port: int,
    external_port: int,
    lifetime: int,
    client_ip: str,
) -> bytes:
    """A MAP request; lifetime 0 deletes the mapping of this nonce."""
    header = _REQUEST.pack(VERSION, OP_MAP, 0, lifetime, _v4_mapped(client_ip))
    body = _MAP.pack(
        nonce, PROTOCOLS[proto], b"\0\0\0", internal_port, external_port, _v4_mapped("0.0.0.0")
    )
    return header + body


def _check(data: bytes, opcode: int) -> tuple[int, int]:
    """The common response header: (lifetime, epoch); raises on refusals."""
    if len(data) < 4:
        raise ProtocolError(f"PCP reply too short ({len(data)} bytes)")
    if data[0] != VERSION:
        # A NAT-PMP server answers version 0, result 1 (RFC 6887 section 9).
        raise UnsupportedVersion(f"PCP: the gateway speaks version {data[0]}", code=1)
    if len(data) < _RESPONSE.size or len(data) > MAX_SIZE or len(data) % 4:
        raise ProtocolError(f"PCP reply of {len(data)} bytes")
    _, op, _, result, lifetime, epoch, _ = _RESPONSE.unpack_from(data)
    if op != RESPONSE | opcode:
        raise ProtocolError(f"PCP reply with opcode byte {op:#x}, not {RESPONSE | opcode:#x}")
    if result != 0:
        what = RESULTS.get(result, "unknown error")
        raise PortMappingError(f"PCP gateway refused: {what} ({result})", code=result)
    return lifetime, epoch


def decode_announce_reply(data: bytes) -> int:
    """The epoch of an ANNOUNCE reply."""
    return _check(data, OP_ANNOUNCE)[1]


def decode_map_reply(data: bytes, nonce: bytes, proto: Proto, internal_port: int) -> MapResult:
    lifetime, epoch = _check(data, OP_MAP)
    if len(data) < MAP_SIZE:
        raise ProtocolError(f"PCP MAP reply of {len(data)} bytes")
    got_nonce, protocol, _, internal, external, raw = _MAP.unpack_from(data, _RESPONSE.size)
    if (got_nonce, protocol, internal) != (nonce, PROTOCOLS[proto], internal_port):
        raise ProtocolError("PCP MAP reply for another mapping")
    address = ipaddress.IPv6Address(raw).ipv4_mapped
    if address is None:
        raise ProtocolError("PCP MAP reply with a non-IPv4 external address")
    return MapResult(str(address), external, lifetime, epoch)


def _answers(opcode: int, nonce: bytes = b"") -> Callable[[bytes], bool]:
    def fits(data: bytes) -> bool:
        if len(data) >= 2 and data[0] != VERSION:
            return True  # another version: decoding says which
        if len(data) < 2 or data[1] != RESPONSE | opcode:
            return False
        return not nonce or data[_RESPONSE.size : _RESPONSE.size + NONCE_SIZE] == nonce

    return fits


class PcpGateway:
    """PCP client over an open :class:`PmpChannel`."""

    method_name = "PCP"

    def __init__(self, channel: PmpChannel) -> None:
        self._channel = channel
        self.gateway = channel.gateway
        self.counters = channel.counters
        self.local_ip = channel.local_ip
        self.external_ip = ""
        self._nonces: dict[Proto, bytes] = {}

    @classmethod
    async def over(cls, channel: PmpChannel) -> PcpGateway:
        """Probe with ANNOUNCE. Raises :class:`UnsupportedVersion` (the channel
        stays open for NAT-PMP) or PortMappingError (no answer)."""
        client = cls(channel)
        data = await channel.exchange(encode_announce(channel.local_ip), _answers(OP_ANNOUNCE))
        try:
            decode_announce_reply(data)
        except UnsupportedVersion:
            raise
        except PortMappingError as exc:
            if exc.code != UNSUPP_OPCODE:  # a PCP server all the same
                raise
        except ProtocolError as exc:
            client.counters["pcp_bad_reply"] += 1
            raise PortMappingError(f"PCP: {exc}") from None
        return client

    async def add(
        self, proto: Proto, internal_port: int, external_port: int, lifetime: int
    ) -> tuple[str, int, int]:
        """Map (or renew: the same nonce); the external address, port and lifetime."""
        nonce = self._nonces.setdefault(proto, secrets.token_bytes(NONCE_SIZE))
        request = encode_map(nonce, proto, internal_port, external_port, lifetime, self.local_ip)
        data = await self._channel.exchange(request, _answers(OP_MAP, nonce))
        try:
            result = decode_map_reply(data, nonce, proto, internal_port)
        except ProtocolError as exc:
            self.counters["pcp_bad_reply"] += 1
            raise PortMappingError(f"PCP: {exc}") from None
        if not result.external_port or not result.lifetime:
            self.counters["pcp_bad_reply"] += 1
            raise PortMappingError("PCP: a MAP reply without a port or a lifetime")
        self.external_ip = result.external_ip
        return result.external_ip, result.external_port, min(result.lifetime, lifetime)

    async def remove(self, proto: Proto, internal_port: int, external_port: int) -> None:
        nonce = self._nonces.pop(proto, None)
        if nonce is None:
            return
        request = encode_map(nonce, proto, internal_port, external_port, 0, self.local_ip)
        data = await self._channel.exchange(request, _answers(OP_MAP, nonce))
        try:
            _check(data, OP_MAP)
        except ProtocolError as exc:
            raise PortMappingError(f"PCP: {exc}") from None

    def close(self) -> None:
        self._channel.close()
