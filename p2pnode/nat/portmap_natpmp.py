"""NAT-PMP (RFC 6886): the codec (pure) and a small asyncio client.

Why our own: the Python NAT-PMP libraries (``nat-pmp``, ``py-natpmp``, both
v0 only) use blocking sockets with ``time.sleep`` retransmissions (up to a minute
for one request, as RFC 6886 allows) and a gateway lookup through subprocesses;
neither fits an asyncio node. The protocol is four fixed-size messages, so the
codec is a few structs, strictly checked, and the client bounds every exchange.

Trust: only datagrams from the gateway's address and port 5351 are read; a
reply must match the request's opcode (and internal port) or it is dropped and
counted. The gateway is on our LAN, but a reply is still bytes from elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from p2pnode.errors import PortMappingError, ProtocolError
from p2pnode.nat.portmap_core import Proto

PORT = 5351
VERSION = 0
OP_EXTERNAL = 0
OP_MAP = {Proto.UDP: 1, Proto.TCP: 2}
REPLY = 128
RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized or refused",
    3: "network failure",
    4: "out of resources",
    5: "unsupported opcode",
}
# RFC 6886 section 3.1: first retransmission after 250 ms, doubling.
FIRST_RETRY = 0.25

_EXTERNAL_REPLY = struct.Struct("!BBHI4s")
_MAP_REQUEST = struct.Struct("!BBHHHI")
_MAP_REPLY = struct.Struct("!BBHIHHI")


# -- codec (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class ExternalReply:
    epoch: int
    address: str


@dataclass(frozen=True)
class MapReply:
    proto: Proto
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int


def encode_external_request() -> bytes:
    return bytes((VERSION, OP_EXTERNAL))


def encode_map_request(
    proto: Proto, internal_port: int, external_port: int, lifetime: int
) -> bytes:
    """A mapping request; lifetime 0 (with external port 0) removes the mapping."""
    return _MAP_REQUEST.pack(VERSION, OP_MAP[proto], 0, internal_port, external_port, lifetime)


def _check_header(data: bytes, opcode: int) -> None:
    if len(data) < 4:
        raise ProtocolError(f"NAT-PMP reply too short ({len(data)} bytes)")
    version, op, result = data[0], data[1], int.from_bytes(data[2:4], "big")
    if version != VERSION:
        raise ProtocolError(f"NAT-PMP reply of version {version}")
    if op != REPLY + opcode:
        raise ProtocolError(f"NAT-PMP reply to opcode {op - REPLY}, not {opcode}")
    if result != 0:
        what = RESULTS.get(result, "unknown error")
        raise PortMappingError(f"NAT-PMP gateway refused: {what} ({result})", code=result)


def decode_external_reply(data: bytes) -> ExternalReply:
    _check_header(data, OP_EXTERNAL)
    if len(data) != _EXTERNAL_REPLY.size:
        raise ProtocolError(f"NAT-PMP external address reply of {len(data)} bytes")
    _, _, _, epoch, raw = _EXTERNAL_REPLY.unpack(data)
    return ExternalReply(epoch, str(ipaddress.IPv4Address(raw)))


def decode_map_reply(data: bytes, proto: Proto) -> MapReply:
    _check_header(data, OP_MAP[proto])
    if len(data) != _MAP_REPLY.size:
        raise ProtocolError(f"NAT-PMP mapping reply of {len(data)} bytes")
    _, _, _, epoch, internal, external, lifetime = _MAP_REPLY.unpack(data)
    return MapReply(proto, epoch, internal, external, lifetime)


def parse_default_gateway(route_table: str) -> str | None:
    """The IPv4 default gateway from Linux's ``/proc/net/route`` text."""
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        destination, gateway, flags = fields[1], fields[2], fields[3]
        try:
            if int(destination, 16) != 0 or not int(flags, 16) & 0x2:  # RTF_GATEWAY
                continue
            # Little-endian hex of the address.
            return str(ipaddress.IPv4Address(int(gateway, 16).to_bytes(4, "little")))
        except (ValueError, OverflowError):
            continue
    return None


def default_gateway() -> str | None:
    """The default gateway (Linux only; None elsewhere or when there is none)."""
    try:
        return parse_default_gateway(Path("/proc/net/route").read_text())
    except OSError:
        return None


# -- the asyncio client -----------------------------------------------------------------


class _Replies(asyncio.DatagramProtocol):
    """Queues datagrams from the gateway; counts the rest."""

    def __init__(self, gateway: tuple[str, int], counters: Counter[str]) -> None:
        self.gateway = gateway
        self.counters = counters
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if (addr[0], addr[1]) != self.gateway:
            self.counters["natpmp_dropped_foreign"] += 1
            return
        if self.queue.full():
            self.counters["natpmp_dropped_queue"] += 1
            return
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable: nobody listens on 5351 there. The exchange times out.
        self.counters["natpmp_icmp_errors"] += 1


class PmpChannel:
    """A UDP socket connected to the gateway's port 5351, shared by NAT-PMP and
    PCP: one exchange at a time, retransmitted at 250 ms doubling (RFC 6886
    section 3.1; PCP's own schedule starts at 3 s, too slow to probe with)."""

    def __init__(
        self,
        gateway: str,
        transport: asyncio.DatagramTransport,
        replies: _Replies,
        timeout: float,
        counters: Counter[str],
    ) -> None:
        self.gateway = gateway
        self.timeout = timeout
        self.counters = counters
        self._transport = transport
        self._replies = replies
        self._lock = asyncio.Lock()
        self.local_ip = str(transport.get_extra_info("sockname")[0])

    @classmethod
    async def open(
        cls, gateway: str, timeout: float, counters: Counter[str], port: int = PORT
    ) -> PmpChannel:
        loop = asyncio.get_running_loop()
        try:
            transport, replies = await loop.create_datagram_endpoint(
                lambda: _Replies((gateway, port), counters),
                remote_addr=(gateway, port),
                family=socket.AF_INET,
            )
        except OSError as exc:
            raise PortMappingError(f"NAT-PMP/PCP: cannot reach {gateway}: {exc}") from None
        return cls(gateway, transport, replies, timeout, counters)

    async def exchange(self, request: bytes, fits: Callable[[bytes], bool]) -> bytes:
        """Send ``request`` until a reply that ``fits`` comes (others are dropped
        and counted) or the timeout passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        wait = FIRST_RETRY
        async with self._lock:
            while not self._replies.queue.empty():  # late replies to an earlier request
                self._replies.queue.get_nowait()
            while loop.time() < deadline:
                self._transport.sendto(request)
                resend_at = min(loop.time() + wait, deadline)
                wait *= 2
                while (left := resend_at - loop.time()) > 0:
                    try:
                        data = await asyncio.wait_for(self._replies.queue.get(), left)
                    except TimeoutError:
                        break
                    if fits(data):
                        return data
                    self.counters["natpmp_dropped_unexpected"] += 1
        raise PortMappingError(f"NAT-PMP/PCP: no answer from {self.gateway} in {self.timeout} s")

    def close(self) -> None:
        self._transport.close()


def _answers(opcode: int) -> Callable[[bytes], bool]:
    # Any version: a reply of another version is decoded, and says why.
    return lambda data: len(data) >= 2 and data[1] == REPLY + opcode


class NatPmpGateway:
    """NAT-PMP client bound to one gateway. ``open`` probes it (asks for the
    external address): no answer within the timeout means no NAT-PMP there."""

    method_name = "NAT-PMP"

    def __init__(self, channel: PmpChannel) -> None:
        self._channel = channel
        self.gateway = channel.gateway
        self.counters = channel.counters
        self.local_ip = channel.local_ip
        self.external_ip = ""

    @classmethod
    async def open(
        cls, gateway: str, timeout: float, counters: Counter[str], port: int = PORT
    ) -> NatPmpGateway:
        return await cls.over(await PmpChannel.open(gateway, timeout, counters, port))

    @classmethod
    async def over(cls, channel: PmpChannel) -> NatPmpGateway:
        """NAT-PMP on an open channel (closed if the gateway does not answer)."""
        client = cls(channel)
        try:
            client.external_ip = (await client._exchange_external()).address
        except BaseException:
            channel.close()
            raise
        return client

    async def _exchange_external(self) -> ExternalReply:
        data = await self._channel.exchange(encode_external_request(), _answers(OP_EXTERNAL))
        try:
            return decode_external_reply(data)
        except ProtocolError as exc:
            self.counters["natpmp_bad_reply"] += 1
            raise PortMappingError(f"NAT-PMP: {exc}") from None

    async def add(
        self, proto: Proto, internal_port: int, external_port: int, lifetime: int
    ) -> tuple[str, int, int]:
        """Map (or renew); the external address, port and lifetime granted."""
        request = encode_map_request(proto, internal_port, external_port, lifetime)
        data = await self._channel.exchange(request, _answers(OP_MAP[proto]))
        try:
            reply = decode_map_reply(data, proto)
        except ProtocolError as exc:
            self.counters["natpmp_bad_reply"] += 1
            raise PortMappingError(f"NAT-PMP: {exc}") from None
        if reply.internal_port != internal_port or reply.external_port == 0 or not reply.lifetime:
            self.counters["natpmp_bad_reply"] += 1
            raise PortMappingError(f"NAT-PMP: reply for another mapping ({reply})")
        # The external address may have changed (the epoch says the router restarted).
        with contextlib.suppress(PortMappingError):
            self.external_ip = (await self._exchange_external()).address
        # Never trust a lifetime longer than asked for.
        return self.external_ip, reply.external_port, min(reply.lifetime, lifetime)

    async def remove(self, proto: Proto, internal_port: int, external_port: int) -> None:
        request = encode_map_request(proto, internal_port, 0, 0)
        data = await self._channel.exchange(request, _answers(OP_MAP[proto]))
        try:
            decode_map_reply(data, proto)
        except ProtocolError as exc:
            raise PortMappingError(f"NAT-PMP: {exc}") from None

    def close(self) -> None:
        self._channel.close()
