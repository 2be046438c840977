"""The NAT-PMP client and the port mapper's loop against a fake gateway on
127.0.0.1 (port 0): retransmission, refusals, replies that do not fit, renewal,
removal at close; and a node bound to loopback that never tries."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from p2pnode.errors import PortMappingError
from p2pnode.nat import portmap
from p2pnode.nat.portmap import Gateway, PortMapper
from p2pnode.nat.portmap_core import Method, PortMapConfig, Proto
from p2pnode.nat.portmap_natpmp import NatPmpGateway, PmpChannel
from p2pnode.node import Node
from tests.helpers import eventually, fast_config

EXTERNAL = bytes([198, 51, 100, 7])


class FakeGateway(asyncio.DatagramProtocol):
    """Answers NAT-PMP like a router: maps to external port + 10000 (or the
    suggested one), remembers what it was asked. ``drop`` requests are ignored
    first; ``junk`` is sent before each real answer; ``refuse`` is a result code."""

    def __init__(
        self, *, drop: int = 0, junk: bytes = b"", refuse: int = 0, silent_udp: bool = False
    ) -> None:
        self.silent_udp = silent_udp  # never answers UDP mapping requests
        self.drop = drop
        self.junk = junk
        self.refuse = refuse
        self.requests: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        assert self.transport is not None
        self.requests.append(data)
        if self.drop:
            self.drop -= 1
            return
        if data[:1] == b"\x02":  # PCP: this router speaks NAT-PMP only (RFC 6887 section 9)
            self.transport.sendto(struct.pack("!BBHI", 0, 128 + (data[1] & 0x7F), 1, 1), addr)
            return
        if self.junk:
            self.transport.sendto(self.junk, addr)
        if data == b"\x00\x00":
            self.transport.sendto(struct.pack("!BBHI4s", 0, 128, 0, 1, EXTERNAL), addr)
            return
        _, op, _, internal, suggested, lifetime = struct.unpack("!BBHHHI", data)
        if op == 1 and self.silent_udp:
            return
        external = suggested or internal + 10000
        reply = struct.pack(
            "!BBHIHHI", 0, 128 + op, self.refuse, 1, internal, external if lifetime else 0, lifetime
        )
        self.transport.sendto(reply, addr)

    def maps(self) -> list[tuple[int, int, int, int]]:
        """(opcode, internal, suggested external, lifetime) of each mapping request."""
        out = []
        for request in self.requests:
            if len(request) == 12:
                _, op, _, internal, suggested, lifetime = struct.unpack("!BBHHHI", request)
                out.append((op, internal, suggested, lifetime))
        return out


async def fake_gateway(**kw: Any) -> tuple[FakeGateway, int, asyncio.DatagramTransport]:
    loop = asyncio.get_running_loop()
    transport, fake = await loop.create_datagram_endpoint(
        lambda: FakeGateway(**kw), local_addr=("127.0.0.1", 0)
    )
    return fake, transport.get_extra_info("sockname")[1], transport


async def test_maps_and_removes_with_the_rfc_layout() -> None:
    fake, port, transport = await fake_gateway()
    counters: Counter[str] = Counter()
    gateway = await NatPmpGateway.open("127.0.0.1", 2.0, counters, port=port)
    try:
        assert gateway.external_ip == "198.51.100.7"
        assert await gateway.add(Proto.TCP, 4001, 4001, 60) == ("198.51.100.7", 4001, 60)
        assert await gateway.add(Proto.UDP, 4001, 0, 60) == ("198.51.100.7", 14001, 60)
        await gateway.remove(Proto.TCP, 4001, 4001)
    finally:
        gateway.close()
        transport.close()
    assert fake.maps() == [(2, 4001, 4001, 60), (1, 4001, 0, 60), (2, 4001, 0, 0)]


async def test_lost_requests_are_sent_again() -> None:
    fake, port, transport = await fake_gateway(drop=2)
    gateway = await NatPmpGateway.open("127.0.0.1", 3.0, Counter(), port=port)
    gateway.close()
    transport.close()
    assert fake.requests == [b"\x00\x00"] * 3  # at 0, 250 and 750 ms


async def test_replies_that_do_not_fit_are_dropped_and_counted() -> None:
    # A reply to another opcode before each real one: skipped, counted.
    junk = struct.pack("!BBHIHHI", 0, 129, 0, 1, 1, 1, 1)
    _fake, port, transport = await fake_gateway(junk=junk)
    counters: Counter[str] = Counter()
    gateway = await NatPmpGateway.open("127.0.0.1", 2.0, counters, port=port)
    try:
        assert (await gateway.add(Proto.TCP, 4001, 4001, 60))[1] == 4001
    finally:
        gateway.close()
        transport.close()
    assert counters["natpmp_dropped_unexpected"] >= 2


async def test_a_refusal_is_a_port_mapping_error_with_its_code() -> None:
    _fake, port, transport = await fake_gateway(refuse=2)
    gateway = await NatPmpGateway.open("127.0.0.1", 2.0, Counter(), port=port)
    try:
        with pytest.raises(PortMappingError) as raised:
            await gateway.add(Proto.TCP, 4001, 4001, 60)
        assert raised.value.code == 2
    finally:
        gateway.close()
        transport.close()


async def test_no_answer_fails_within_the_timeout() -> None:
    _fake, port, transport = await fake_gateway(drop=100)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PortMappingError, match="no answer"):
        await NatPmpGateway.open("127.0.0.1", 0.6, Counter(), port=port)
    assert loop.time() - started < 2.0
    transport.close()


def point_at_fake(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    async def channel(self: PortMapper, address: str) -> PmpChannel:
        return await PmpChannel.open(address, 2.0, self._counters, port=port)

    monkeypatch.setattr(portmap, "default_gateway", lambda: "127.0.0.1")
    monkeypatch.setattr(PortMapper, "_pmp_channel", channel)


async def test_the_mapper_maps_renews_tells_and_removes(monkeypatch: pytest.MonkeyPatch) -> None:
    """PCP first; this router speaks NAT-PMP only, so NAT-PMP it is."""
    fake, port, transport = await fake_gateway()
    point_at_fake(monkeypatch, port)
    config = PortMapConfig(methods=(Method.PCP, Method.NATPMP), lease=1)
    mapper = PortMapper(config, 4001)
    seen: list[tuple[str, int] | None] = []
    mapper.on_change(seen.append)
    mapper.start()
    try:
        await eventually(lambda: mapper.stats().get("renewals_ok", 0) >= 2, timeout=10)
        assert mapper.external_address == ("198.51.100.7", 4001)
        assert mapper.status()["method"] == "natpmp"
    finally:
        await mapper.close()
        transport.close()
    assert seen == [("198.51.100.7", 4001), None]
    assert mapper.stats()["removals"] == 2
    assert mapper.stats()["pcp_unsupported"] == 1
    assert {(op, lifetime) for op, _, _, lifetime in fake.maps()[-2:]} == {(1, 0), (2, 0)}


async def test_close_during_an_attempt_removes_what_was_granted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, port, transport = await fake_gateway(silent_udp=True)
    point_at_fake(monkeypatch, port)
    mapper = PortMapper(PortMapConfig(methods=(Method.NATPMP,)), 4001)
    mapper.start()
    try:
        # TCP granted; the UDP request goes unanswered (the attempt is still on).
        await eventually(lambda: any(op == 1 for op, *_ in fake.maps()), timeout=10)
    finally:
        await mapper.close()
        transport.close()
    assert (2, 4001, 0, 0) in fake.maps()  # the TCP mapping, removed
    assert mapper.stats()["removals"] == 1


async def test_no_router_is_logged_once_and_retried(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def no_router(self: PortMapper) -> tuple[Method, Gateway]:
        raise PortMappingError("NAT-PMP: no answer")

    monkeypatch.setattr(PortMapper, "_open_pmp", no_router)
    caplog.set_level(logging.INFO, logger="p2pnode.nat.portmap")
    config = PortMapConfig(methods=(Method.NATPMP,), retry_initial=0.01, retry_max=0.02)
    mapper = PortMapper(config, 4001)
    mapper.start()
    try:
        await eventually(lambda: mapper.stats().get("attempts_failed", 0) >= 3, timeout=10)
    finally:
        await mapper.close()
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "no router answered" in infos[0].getMessage()
    assert mapper.stats()["no_gateway"] >= 3
    assert mapper.status()["mappings"] == []


async def test_a_node_on_loopback_does_not_try(tmp_path: Path) -> None:
    config = fast_config(tmp_path / "n", port_mapping=True)
    async with Node(config) as node:
        assert node.port_mapper is None
        assert node.status()["port_mapping"] == {
            "enabled": False,
            "reason": "loopback",
            "mappings": [],
        }
        assert "portmap" not in node.metrics_snapshot() or not node.metrics_snapshot()["portmap"]
