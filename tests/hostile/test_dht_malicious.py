"""Malicious responders (raw UDP sockets answering junk) in a network of real
Discovery nodes: lookups neither raise nor hang, and the liars get evicted."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from kademlia.utils import digest

from p2pnode.clock import MONOTONIC
from p2pnode.dht import DhtConfig, Discovery
from p2pnode.dht import records as rec
from p2pnode.identity import Identity
from tests.helpers import can_bind

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
    nodes = [Discovery(Identity.generate(), CONFIG) for _ in range(5)]
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
    node = Discovery(Identity.generate(), CONFIG)
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


# -- issue 10: storage floods from a few cheap addresses -------------------------------


ATTACKERS = [f"127.0.0.{i}" for i in range(2, 13)]  # 11 addresses, as in attack 5
needs_other_loopbacks = pytest.mark.skipif(
    not all(can_bind(a) for a in ATTACKERS), reason="127.0.0.2-12 cannot be bound here"
)


class Flooder(asyncio.DatagramProtocol):
    """Sends raw DHT requests from one address; ``sync`` waits for a ping answer from
    a node, which reads datagrams in order: everything sent before was read."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.waiting: dict[bytes, asyncio.Future[object]] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        future = self.waiting.pop(data[1:21], None)
        if data[:1] == b"\x01" and future is not None and not future.done():
            future.set_result(msgpack.unpackb(data[21:]))

    async def earn_token(self, port: int) -> bytes:
        """The token any host gets for its own address: identify's answer."""
        answer = await self.ask(port, "identify", os.urandom(20), os.urandom(16))
        assert isinstance(answer, list) and isinstance(answer[2], bytes), answer
        return answer[2]

    def send(self, port: int, name: str, *args: object) -> bytes:
        msg_id = os.urandom(20)
        packed = msgpack.packb([name, list(args)], use_bin_type=True)
        self.transport.sendto(b"\x00" + msg_id + packed, ("127.0.0.1", port))
        return msg_id

    async def ask(self, port: int, name: str, *args: object) -> object:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.waiting[self.send(port, name, *args)] = future
        async with asyncio.timeout(5):
            return await future

    async def flood(
        self, port: int, requests: Sequence[tuple[object, ...]], batch: int = 16
    ) -> None:
        for start in range(0, len(requests), batch):
            for request in requests[start : start + batch]:
                name, *args = request
                assert isinstance(name, str)
                self.send(port, name, *args)
            await self.ask(port, "ping", os.urandom(20))


@pytest.fixture
async def flooders() -> AsyncIterator[list[Flooder]]:
    loop = asyncio.get_running_loop()
    out: list[Flooder] = []
    transports = []
    try:
        for host in ATTACKERS:
            transport, proto = await loop.create_datagram_endpoint(Flooder, local_addr=(host, 0))
            transports.append(transport)
            out.append(proto)
        yield out
    finally:
        for transport in transports:
            transport.close()


async def joined(nodes: list[Discovery]) -> None:
    entry = [("127.0.0.1", nodes[0].port)]
    for node in nodes[1:]:
        await node.bootstrap(entry)
    for node in nodes:
        await node.bootstrap([("127.0.0.1", n.port) for n in nodes if n is not node])


def signed_record(key: bytes, host: str, port: int) -> list[object]:
    """A validly signed provider record of a fresh key: what a spammer can make
    at will (~70 µs each)."""
    now = MONOTONIC.now()
    record = rec.sign_provider_record(
        Identity.generate(), key, [(host, port)], int(now * 1000), int(now + 3600)
    )
    return record.to_wire()


@needs_other_loopbacks
async def test_provider_spam_does_not_hide_the_honest_provider(
    honest: list[Discovery], flooders: list[Flooder]
) -> None:
    """Attack 2 of issue 10: 64 add_provider datagrams per node from 127.0.0.2, before
    and after the honest provider announces. Unsigned ones (a random node id and
    port 9, as the issue's attacker sent) are refused; records validly signed by
    fresh keys, with the token the spammer's address earned, are taken but evict
    the spammer's own. The honest record is still stored and in every
    get_providers answer, at most one record per address."""
    await joined(honest)
    spammer = flooders[0]
    key = os.urandom(20)

    def spam(token: bytes) -> list[tuple[object, ...]]:
        return [
            ("add_provider", os.urandom(20), key, signed_record(key, ATTACKERS[0], 9), token)
            for _ in range(64)
        ]

    tokens = {node.port: await spammer.earn_token(node.port) for node in honest}
    for node in honest:
        # The stock announcement (no record, no token) is not even a valid request.
        await spammer.flood(node.port, [("add_provider", os.urandom(20), key, 9)] * 64)
        await spammer.flood(node.port, spam(tokens[node.port]))
    provider, asker = honest[3], honest[4]
    assert await provider.add_provider(key, 4003) > 0
    for node in honest:
        await spammer.flood(node.port, spam(tokens[node.port]))
    for node in honest:
        answer = await spammer.ask(node.port, "get_providers", os.urandom(20), key)
        assert isinstance(answer, dict)
        listed = answer["providers"]
        assert provider.node_id in [p[0] for p in listed]
        assert len(listed) <= CONFIG.max_providers_per_response
        hosts = [p[2][0][0] for p in listed]
        assert sorted(hosts) == ["127.0.0.1", ATTACKERS[0]]  # one per address
    found = await asker.find_providers(key)
    assert provider.node_id in [r.node_id for r in found]
    stats = honest[0].stats()
    assert stats["dropped.bad_args"] >= 64
    assert stats["providers_accepted"] >= 128
    assert stats.get("providers_refused", 0) == 0
    assert stats["provider_store.evicted.key_sender_quota"] > 0


@needs_other_loopbacks
async def test_value_store_flood_does_not_lock_out_new_values(flooders: list[Flooder]) -> None:
    """Attack 5 of issue 10, scaled down: 4 KiB stores from each of 11 addresses,
    more than the store holds. A value put afterwards is stored (here and on the
    others) and found, and an earlier honest value survives."""
    config = replace(CONFIG, max_stored_values=120, max_values_per_sender=20)
    nodes = [Discovery(Identity.generate(), config) for _ in range(3)]
    for node in nodes:
        await node.listen("127.0.0.1", 0)
    try:
        await joined(nodes)
        assert await nodes[0].put("early", "honest value")
        per_address = 30  # 11 x 30 > 120: full before anyone else comes
        for node in nodes:
            for flooder in flooders:
                # Each address earns its token, as any host can (identify).
                token = await flooder.earn_token(node.port)
                stores = [
                    ("store", os.urandom(20), os.urandom(20), os.urandom(4096), token)
                    for _ in range(per_address)
                ]
                await flooder.flood(node.port, stores, batch=8)
        assert await nodes[1].put("fresh", "new value")
        for node in nodes:
            assert await node.get("fresh") == "new value"
            assert await node.get("early") == "honest value"
        for node in nodes:
            stats = node.stats()
            assert stats["rpc_received.store"] >= len(flooders) * per_address
            assert stats["stores_accepted"] >= len(flooders) * per_address
            assert stats["stored_values"] <= config.max_stored_values
            assert stats.get("stores_refused", 0) == 0
            assert stats["value_store.evicted.sender_quota"] > 0
    finally:
        for node in nodes:
            await node.close()


@needs_other_loopbacks
async def test_value_store_flood_at_full_scale(flooders: list[Flooder]) -> None:
    """Attack 5 of issue 10 as reported: 1,000 x 4 KiB stores from each of 11
    addresses to a node with the default store limits (10,000 values). A value put
    afterwards is still accepted by that node."""
    victim, putter = (Discovery(Identity.generate(), CONFIG) for _ in range(2))
    for node in (victim, putter):
        await node.listen("127.0.0.1", 0)
    try:
        await joined([victim, putter])
        value = os.urandom(4096)
        for flooder in flooders:
            token = await flooder.earn_token(victim.port)
            stores = [("store", os.urandom(20), os.urandom(20), value, token) for _ in range(1000)]
            await flooder.flood(victim.port, stores, batch=16)
        outcome = await putter.put_outcome("fresh", "new value")
        assert (outcome.remote, outcome.asked) == (1, 1), outcome
        stats = victim.stats()
        assert stats["rpc_received.store"] >= 11_000
        assert stats["stores_accepted"] >= 11_000
        assert stats["stored_values"] <= CONFIG.max_values_per_subnet + 1
        assert stats["stored_value_bytes"] <= CONFIG.max_value_store_bytes
        assert stats.get("stores_refused", 0) == 0
    finally:
        for node in (victim, putter):
            await node.close()


@needs_other_loopbacks
async def test_a_remote_store_does_not_replace_the_owners_value(
    honest: list[Discovery], flooders: list[Flooder]
) -> None:
    """Attack 1 of issue 10, the part storage can refuse: one unsigned store of
    sha1("greeting") from 127.0.0.2 no longer overwrites the value the node put
    itself (its own copy is read first), even with the token 127.0.0.2 earned.
    Other holders still take it: signed records are the fix for those (see
    test_dht_open_network)."""
    await joined(honest)
    owner = honest[0]
    assert await owner.put("greeting", "hello")
    attacker = flooders[0]
    token = await attacker.earn_token(owner.port)
    answer = await attacker.ask(
        owner.port, "store", os.urandom(20), digest("greeting"), "pwned", token
    )
    assert answer is False
    assert await owner.get("greeting") == "hello"
    assert owner.stats()["value_store.refused.own_value"] == 1
