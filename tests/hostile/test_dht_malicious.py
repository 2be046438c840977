"""Malicious responders (raw UDP sockets answering junk) in a network of real
Discovery nodes: lookups neither raise nor hang, and the liars get evicted."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import pytest

from p2pnode.dht import DhtConfig, Discovery

CONFIG = DhtConfig(ksize=8, rpc_timeout=0.3, lookup_timeout=4.0, max_failures=2)


def junk_payloads(request: list[Any]) -> list[object]:
    target = request[1][1] if len(request[1]) > 1 else os.urandom(20)
    return [
        None,
        "nodes",
        {"value": [1, 2, 3]},
        {"value": None},
        {"providers": 5, "nodes": "x"},
        [[os.urandom(19), "127.0.0.1", 1]] * 30,
        [["id", 5, "port"]],
        [[target, "127.0.0.1", 0]],
        [[target, "999.1.1.1", 5]],
        [1] * 200,
        msgpack.ExtType(3, b"ext"),
        -1,
        b"\xff" * 1000,
    ]


class Liar(asyncio.DatagramProtocol):
    """Answers ping with its id (so it gets into routing tables), everything else
    according to ``mode``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.node_id = os.urandom(20)
        self.transport: Any = None
        self.requests = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data[:1] != b"\x00":
            return
        self.requests += 1
        msg_id = data[1:21]
        request = msgpack.unpackb(data[21:])
        if request[0] == "ping":
            self.reply(b"\x01" + msg_id + msgpack.packb(self.node_id), addr)
            return
        if self.mode == "silent":
            return
        if self.mode == "garbage":
            self.reply(bytes([random.randrange(256)]) + os.urandom(random.randrange(60)), addr)
            self.reply(b"\x01" + msg_id + b"\xc1\xc1", addr)
            self.reply(b"\x01" + msg_id + b"\xdd\xff\xff\xff\xff", addr)
        elif self.mode == "wrong_id":
            self.reply(b"\x01" + os.urandom(20) + msgpack.packb([]), addr)
        elif self.mode == "oversized":
            self.reply(b"\x01" + msg_id + msgpack.packb(b"x" * 60_000), addr)
        elif self.mode == "junk":
            self.reply(
                b"\x01" + msg_id + msgpack.packb(random.choice(junk_payloads(request))), addr
            )
        elif self.mode == "chain":
            # "closer" made-up nodes, at its own address and at dead ports
            target = request[1][1]
            port = self.transport.get_extra_info("sockname")[1]
            fakes = [
                [target[:17] + os.urandom(3), "127.0.0.1", random.choice([port, 9, 11])]
                for _ in range(20)
            ]
            payload = fakes if request[0] != "get_providers" else {"providers": [], "nodes": fakes}
            self.reply(b"\x01" + msg_id + msgpack.packb(payload), addr)

    def reply(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


MODES = ("garbage", "wrong_id", "oversized", "junk", "chain", "silent")


@pytest.fixture
async def liars() -> AsyncIterator[list[tuple[Liar, int]]]:
    loop = asyncio.get_running_loop()
    out = []
    transports = []
    for mode in MODES:
        transport, liar = await loop.create_datagram_endpoint(
            lambda mode=mode: Liar(mode), local_addr=("127.0.0.1", 0)
        )
        transports.append(transport)
        out.append((liar, transport.get_extra_info("sockname")[1]))
    yield out
    for transport in transports:
        transport.close()


@pytest.fixture
async def honest() -> AsyncIterator[list[Discovery]]:
    nodes = [Discovery(os.urandom(20), CONFIG) for _ in range(5)]
    for node in nodes:
        await node.listen("127.0.0.1", 0)
    yield nodes
    for node in nodes:
        await node.close()


async def timed(awaitable: Any, limit: float) -> Any:
    start = time.monotonic()
    async with asyncio.timeout(limit):
        result = await awaitable
    assert time.monotonic() - start < limit
    return result


async def test_liars_cannot_break_lookups(
    honest: list[Discovery],
    liars: list[tuple[Liar, int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="p2pnode")
    liar_addrs = [("127.0.0.1", port) for _, port in liars]
    entry = [("127.0.0.1", honest[0].port)]
    for node in honest:
        contacts = await node.bootstrap(entry + liar_addrs)
        assert {c.node_id for c in contacts} >= {liar.node_id for liar, _ in liars}
    limit = CONFIG.lookup_timeout + 2
    asker = honest[4]
    assert await timed(asker.put("key", "value"), limit)
    for _ in range(3):  # again and again: nothing raises, nothing hangs
        assert await timed(asker.get("key"), limit) == "value"
        assert await timed(honest[1].get("key"), limit) == "value"
        assert await timed(asker.get("missing"), limit) is None
        assert (await timed(asker.find_peer(honest[2].node_id), limit)) is not None
        closest = await timed(asker.closest(os.urandom(20)), limit)
        assert {c.node_id for c in closest} >= {n.node_id for n in honest if n is not asker}
        key = os.urandom(20)
        await timed(honest[3].add_provider(key, 4003), limit)
        found = await timed(asker.find_providers(key), limit)
        assert [r.node_id for r in found] == [honest[3].node_id]
    stats = asker.stats()
    assert stats["dropped.bad_response"] + stats["dropped.undecodable"] > 0
    assert stats["dropped.unsolicited_response"] > 0  # wrong_id
    assert stats["dropped.oversized"] > 0
    # liars that answer ping but lie (or stay silent) elsewhere get evicted
    liar_ids = {liar.node_id for liar, _ in liars}
    remaining = {c.node_id for c in asker.contacts()} & liar_ids
    assert len(remaining) < len(liar_ids)
    bad_logs = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad_logs, [r.getMessage() for r in bad_logs]


async def test_a_lookup_through_only_liars_ends(
    liars: list[tuple[Liar, int]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    node = Discovery(os.urandom(20), CONFIG)
    await node.listen("127.0.0.1", 0)
    try:
        await node.bootstrap([("127.0.0.1", port) for _, port in liars])
        tasks: list[Callable[[], Any]] = [
            lambda: node.get("anything"),
            lambda: node.closest(os.urandom(20)),
            lambda: node.find_peer(os.urandom(20)),
            lambda: node.find_providers(os.urandom(20)),
            lambda: node.put("k", "v"),
        ]
        for make in tasks:
            await timed(make(), CONFIG.lookup_timeout + 2)
    finally:
        await node.close()
    assert node.stats()["background_tasks"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
