"""Issue 10, attacks 1-4, each played by a real attacker over real UDP sockets on
loopback against a network of real Discovery nodes.

Every honest node has an address of its own (127.0.1.1, 127.0.2.1, ...: all
routable on Linux loopback) and the loopback exemption of the diversity filter is
off, so each 127.x address counts as one host, as on an open network. Attackers
sit on 127.0.0.x. Each test failed against the DHT before issue 10 (c5f1901, the
test run there with only the node construction and the old wire forms adapted);
each docstring says how.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped,unused-ignore]
import pytest
from kademlia.utils import digest

from p2pnode.clock import MONOTONIC
from p2pnode.dht import DhtConfig, Discovery
from p2pnode.dht import records as rec
from p2pnode.errors import NotFoundError
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.service import Exchange
from p2pnode.identity import Identity
from p2pnode.net.config import NetLimits
from p2pnode.net.host import PeerHost
from tests.dht_attacker import Sybil, dht_datagram, grind, raw_socket, raw_udp
from tests.helpers import can_bind, eventually

pytestmark = [pytest.mark.timeout(60)]

CONFIG = DhtConfig(
    ksize=8,
    rpc_timeout=1.0,
    lookup_timeout=5.0,
    lookup_stall=0.5,
    max_failures=2,
    diversity_exempt_loopback=False,
)
HONEST = [f"127.0.{i}.1" for i in range(1, 7)]  # six hosts, each its own /24
ATTACKER = "127.0.0.2"
SPOOFER = "127.0.0.3"
VICTIM = "127.0.0.9"  # the third party a spoofer wants downloaders to connect to
NEWCOMER = "127.0.9.1"
ALL = [*HONEST, ATTACKER, SPOOFER, VICTIM, NEWCOMER]
needs_loopbacks = pytest.mark.skipif(
    not all(can_bind(a) for a in ALL), reason="other 127.x addresses cannot be bound here"
)


def now() -> float:
    """The DHT's clock (Unix seconds): record expiry is compared on it."""
    return MONOTONIC.now()


# -- the attacker's socket -------------------------------------------------------------


class RawDht(asyncio.DatagramProtocol):
    """One attacker UDP socket speaking the DHT's wire format by hand."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.node_id = os.urandom(20)
        self.waiting: dict[bytes, asyncio.Future[object]] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        future = self.waiting.pop(data[1:21], None)
        if data[:1] == b"\x01" and future is not None and not future.done():
            future.set_result(msgpack.unpackb(data[21:]))

    def send(self, to: tuple[str, int], name: str, *args: object) -> bytes:
        msg_id = os.urandom(20)
        packed = msgpack.packb([name, list(args)], use_bin_type=True)
        self.transport.sendto(b"\x00" + msg_id + packed, to)
        return msg_id

    async def ask(self, to: tuple[str, int], name: str, *args: object) -> object:
        """The answer, or None if none came within 2 s."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        msg_id = self.send(to, name, *args)
        self.waiting[msg_id] = future
        try:
            async with asyncio.timeout(2):
                return await future
        except TimeoutError:
            self.waiting.pop(msg_id, None)
            return None

    async def earn_token(self, to: tuple[str, int]) -> bytes | None:
        """What any host can get: the token for its own address, from identify."""
        answer = await self.ask(to, "identify", self.node_id, os.urandom(16))
        if isinstance(answer, list) and len(answer) >= 4 and isinstance(answer[2], bytes):
            return answer[2]
        return None

    async def store(
        self, to: tuple[str, int], key: bytes, value: object, token: bytes | None
    ) -> object:
        if token is None:
            return await self.ask(to, "store", self.node_id, key, value)
        return await self.ask(to, "store", self.node_id, key, value, token)


@dataclass
class Attackers:
    made: list[Any] = field(default_factory=list)

    async def socket(self, host: str) -> RawDht:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(RawDht, local_addr=(host, 0))
        self.made.append(transport)
        return proto

    def close(self) -> None:
        for transport in self.made:
            transport.close()


@pytest.fixture
async def attackers() -> AsyncIterator[Attackers]:
    out = Attackers()
    try:
        yield out
    finally:
        out.close()


# -- the honest network ----------------------------------------------------------------


def addr(node: Discovery) -> tuple[str, int]:
    return node._local_host, node.port  # the address it listens on


async def start_nodes(hosts: Sequence[str], config: DhtConfig = CONFIG) -> list[Discovery]:
    nodes = []
    for host in hosts:
        node = Discovery(Identity.generate(), config)
        await node.listen(host, 0)
        nodes.append(node)
    return nodes


async def join(nodes: Sequence[Discovery]) -> None:
    for node in nodes[1:]:
        await node.bootstrap([addr(nodes[0])])
    for node in nodes:
        await node.bootstrap([addr(n) for n in nodes if n is not node])


@pytest.fixture
async def honest() -> AsyncIterator[list[Discovery]]:
    nodes = await start_nodes(HONEST)
    try:
        await join(nodes)
        yield nodes
    finally:
        for node in nodes:
            await node.close()


def total(node: Discovery, *names: str) -> int:
    stats = node.stats()
    return sum(int(stats.get(name, 0)) for name in names)


# -- attack 1: forged stores of a signed record's key ----------------------------------


def forged_envelopes(honest_record: rec.MutableRecord, stale: bytes) -> list[tuple[str, object]]:
    """What an attacker can send for a mutable record's key: a plain value, the
    honest envelope with its value changed and a higher seq (the signature no
    longer matches), its own validly signed record under that name (another key),
    and the honest publisher's own older record (a replay of a lower seq)."""
    r = honest_record
    tampered = rec.MutableRecord(
        r.peer_id, r.public_key, r.name, "pwned", r.seq + 1000, r.expires, r.signature
    )
    own = rec.sign_mutable(Identity.generate(), r.name, "pwned", r.seq + 1000, r.expires)
    return [
        ("plain", "pwned"),
        ("tampered", rec.to_value(tampered)),
        ("other_key", rec.to_value(own)),
        ("stale", stale),
    ]


@needs_loopbacks
async def test_forged_stores_do_not_replace_a_signed_record(
    honest: list[Discovery], attackers: Attackers
) -> None:
    """Attack 1: stores of the record's key from 127.0.0.2, with a token the attacker
    earned honestly at that address: every node still returns the latest honest
    value, and a plain value a node put itself is not replaced there.

    Before: every store was accepted (True), and replaying the older value made
    get return 'hello v1' instead of 'hello v2' (last writer wins)."""
    publisher = honest[0]
    first = await publisher.put_mutable("greeting", "hello v1")
    assert first.address is not None and first.stored
    key = rec.parse_address(first.address)[0]
    stale = next(n.core.storage.get(key) for n in honest if n.core.storage.get(key) is not None)
    latest = await publisher.put_mutable("greeting", "hello v2")
    assert latest.address == first.address and latest.remote >= 3
    record = next(
        r for n in honest if isinstance(r := n.core.storage.record(key), rec.MutableRecord)
    )
    assert record.value == "hello v2"
    assert await publisher.put("plain greeting", "hello")

    attacker = await attackers.socket(ATTACKER)
    for node in honest:
        token = await attacker.earn_token(addr(node))
        assert token is not None, "identify gives any host a token for its own address"
        for what, value in forged_envelopes(record, stale):
            assert await attacker.store(addr(node), key, value, token) is False, what
        # The plain value the publisher put itself is not replaced there either.
        answer = await attacker.store(addr(node), digest("plain greeting"), "pwned", token)
        if node is publisher:
            assert answer is False
    assert await publisher.get("plain greeting") == "hello"
    assert publisher.stats()["value_store.refused.own_value"] >= 1

    for node in honest:
        assert await node.get_record(first.address) == "hello v2"
        held = node.core.storage.get(key)
        assert held is None or rec.open_value(key, held, now(), CONFIG.value_ttl) == record
    refused = sum(
        total(
            n,
            "value_store.refused.invalid_record",
            "value_store.refused.stale_seq",
            "value_store.refused.unsigned_over_signed",
            "value_store.refused.own_value",  # the publisher's own copy
        )
        for n in honest
    )
    holders = sum(1 for n in honest if n.core.storage.get(key) is not None)
    assert refused >= 4 * holders


# -- attack 2: provider spam ---------------------------------------------------------------


def provider_record(identity: Identity, key: bytes, host: str, port: int) -> list[object]:
    record = rec.sign_provider_record(
        identity, key, [(host, port)], int(now() * 1000), int(now() + 3600)
    )
    return record.to_wire()


def made_up_record(host: str, port: int) -> list[object]:
    """A record of the right shape whose signature is random bytes."""
    return [os.urandom(20), os.urandom(32), [[host, port]], 1, int(now() + 3600), os.urandom(64)]


def listed_hosts(answer: object) -> list[str]:
    assert isinstance(answer, dict), answer
    return [wire[2][0][0] for wire in answer["providers"]]


@needs_loopbacks
async def test_provider_spam_cannot_hide_the_honest_provider(
    honest: list[Discovery], attackers: Attackers
) -> None:
    """Attack 2: 64 add_provider per node from 127.0.0.2. Without a token or with
    made-up records, every one is refused and counted; with a token and 64 validly
    signed records of fresh keys (all dialling 127.0.0.2), answers still list at
    most one record per address, so the honest provider is in every answer and
    find_providers returns it.

    Before: all 192 bogus announcements per node were accepted, and answers listed
    8 records from 127.0.0.2 for 1 honest one."""
    key = os.urandom(20)
    provider, asker = honest[3], honest[5]
    assert await provider.add_provider(key, 4003) >= 3
    spammer = await attackers.socket(ATTACKER)
    for node in honest:
        before = total(node, "providers_accepted")
        for _ in range(64):
            made_up = made_up_record(ATTACKER, 9)
            # No token at all: not even a valid request (dropped, no answer).
            spammer.send(addr(node), "add_provider", os.urandom(20), key, made_up)
            answer = await spammer.ask(
                addr(node), "add_provider", os.urandom(20), key, made_up, os.urandom(8)
            )
            assert answer is False
        token = await spammer.earn_token(addr(node))
        assert token is not None
        for _ in range(64):
            made_up = made_up_record(ATTACKER, 9)
            answer = await spammer.ask(
                addr(node), "add_provider", os.urandom(20), key, made_up, token
            )
            assert answer is False
        assert total(node, "providers_accepted") == before
        assert total(node, "providers_refused_token") >= 64
        assert total(node, "provider_store.refused.invalid_record") >= 64
        assert total(node, "dropped.bad_args") >= 64

        # Now the spam an attacker can really make: fresh keys, signed records.
        signed = 0
        for _ in range(64):
            wire = provider_record(Identity.generate(), key, ATTACKER, 9)
            answer = await spammer.ask(addr(node), "add_provider", os.urandom(20), key, wire, token)
            signed += answer is True
        assert signed == 64  # accepted, each evicting the spammer's own oldest
        assert total(node, "provider_store.evicted.key_sender_quota") >= 64 - 8

    for node in honest:
        answer = await spammer.ask(addr(node), "get_providers", os.urandom(20), key)
        hosts = listed_hosts(answer)
        assert len(hosts) == len(set(hosts)), hosts  # at most one record per address
        assert isinstance(answer, dict)
        assert provider.node_id in [wire[0] for wire in answer["providers"]]
    found = await asker.find_providers(key)
    assert provider.node_id in [r.node_id for r in found]


# -- attack 3: Sybil ids next to a key ---------------------------------------------------


async def start_sybils(
    target: bytes, count: int, proven: bool, forged: list[object], attackers: Attackers
) -> list[tuple[Sybil, int]]:
    loop = asyncio.get_running_loop()
    out = []
    for _ in range(count):
        if proven:
            identity: Identity | None = grind(target, 10)
            node_id = identity.node_id  # type: ignore[union-attr]
        else:
            identity = None
            node_id = target[:18] + os.urandom(2)
        transport, sybil = await loop.create_datagram_endpoint(
            lambda i=identity, n=node_id: Sybil(n, i, forged), local_addr=(ATTACKER, 0)
        )
        attackers.made.append(transport)
        out.append((sybil, transport.get_extra_info("sockname")[1]))
    fellows = [[s.node_id, ATTACKER, port] for s, port in out]
    for sybil, _ in out:
        sybil.fellows = fellows
    return out


def sybils_in_tables(node: Discovery, ids: set[bytes]) -> tuple[list[int], list[int]]:
    """Per bucket: (unproven, proven) Sybil contacts."""
    table = node.core.table
    unproven, proven = [], []
    for bucket in table.buckets:
        mine = [n for n in bucket.nodes.values() if n.id in ids]
        unproven.append(sum(1 for n in mine if not table.is_proven(n.id)))
        proven.append(sum(1 for n in mine if table.is_proven(n.id)))
    return unproven, proven


@needs_loopbacks
@pytest.mark.parametrize("proven", [False, True], ids=["claimed_ids", "ground_keys"])
async def test_sybils_next_to_a_key_cannot_take_it_over(
    honest: list[Discovery], attackers: Attackers, proven: bool
) -> None:
    """Attack 3: 20 sockets on 127.0.0.2 with ids next to the key a publisher will
    use, answering every RPC (claimed ids they cannot prove, or real keys ground to
    share 10 leading bits with the key). Honest tables keep at most
    max_unproven_per_bucket unproven Sybils per bucket and at most the diversity cap
    of proven ones; a signed record put afterwards comes back intact from every
    node, and a fresh share next to that key is found.

    Before: 8 of the Sybils filled the key's bucket of every table (ksize 8), and
    the put and announce went to the Sybils. Writes now go to the closest nodes of a
    wider lookup that prove their id, a few per subnet (Discovery._write_targets)."""
    publisher = honest[0]
    target = rec.mutable_key(publisher.node_id, "takeover")
    forged: list[object] = ["pwned", rec.RECORD_MAGIC + b"\x01junk"]
    sybils = await start_sybils(target, 20, proven, forged, attackers)
    ids = {s.node_id for s, _ in sybils}
    # They announce themselves to everyone, and answer every lookup with each other.
    for sybil, _ in sybils:
        for node in honest:
            sybil.transport.sendto(
                b"\x00" + os.urandom(20) + msgpack.packb(["ping", [sybil.node_id]]), addr(node)
            )
    for node in honest:
        await node.closest(target)
    await eventually(
        lambda: sum(s.requests for s, _ in sybils) >= len(honest), timeout=10, what="Sybils asked"
    )

    for node in honest:
        unproven, proven_counts = sybils_in_tables(node, ids)
        assert max(unproven) <= CONFIG.max_unproven_per_bucket, unproven
        assert max(proven_counts) <= CONFIG.max_contacts_per_subnet_bucket, proven_counts
        assert sum(proven_counts) <= CONFIG.max_contacts_per_subnet_table

    outcome = await publisher.put_mutable("takeover", "honest value")
    assert outcome.address is not None
    assert outcome.stored, outcome
    for node in honest:
        assert await node.get_record(outcome.address) == "honest value", addr(node)

    share = target[:19] + bytes([target[19] ^ 1])  # a fresh resource next to that key
    sharer, finder = honest[2], honest[4]
    await sharer.add_provider(share, 4000)
    holders = [n for n in honest if n is not sharer and n.core.providers.get_records(share)]
    assert len(holders) >= 3, "the announcement went to the Sybils"
    found = await finder.find_providers(share)
    assert sharer.node_id in [r.node_id for r in found]


# -- attack 4: spoofed sources -----------------------------------------------------------


class Accepts:
    """A TCP listener at the victim's address that counts connections reaching it."""

    def __init__(self) -> None:
        self.count = 0
        self.server: asyncio.Server | None = None

    async def start(self, host: str) -> int:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.count += 1
            writer.close()

        self.server = await asyncio.start_server(accepted, host, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass
class Downloader:
    discovery: Discovery
    host: PeerHost
    exchange: Exchange

    async def close(self) -> None:
        await self.exchange.close()
        await self.host.close()
        await self.discovery.close()


async def start_downloader(home: Path, host: str, entry: tuple[str, int]) -> Downloader:
    identity = Identity.generate()
    discovery = Discovery(identity, CONFIG)
    await discovery.listen(host, 0)
    peer_host = PeerHost(identity, NetLimits(request_timeout=5.0, handshake_timeout=5.0))
    tcp = await peer_host.listen(host, 0)
    config = ExchangeConfig(
        piece_timeout=3.0,
        manifest_timeout=3.0,
        dial_timeout=1.0,
        rediscover_attempts=0,
        fsync=False,
        io_threads=1,
        stale_check_interval=0,
    )
    exchange = Exchange(home, config, discovery, peer_host, tcp)
    await exchange.start()
    assert await discovery.bootstrap([entry])
    return Downloader(discovery, peer_host, exchange)


def spoofed_announcement(key: bytes, victim: tuple[str, int], token: bytes) -> list[object]:
    """add_provider args claiming a provider of ``key`` at the victim's address."""
    return [os.urandom(20), key, provider_record(Identity.generate(), key, *victim), token]


@needs_loopbacks
async def test_spoofed_announcements_reflect_no_connects(
    honest: list[Discovery], attackers: Attackers, tmp_path: Path
) -> None:
    """Attack 4: add_provider claiming a provider at the victim's address, sent from
    127.0.0.3 (which never earned a token there: it brings one earned at 127.0.0.2)
    and, as root, as raw datagrams whose source is forged to be the victim itself.
    The records are refused, a download of that key makes no TCP connect to the
    victim, and a flood of requests from forged sources in one /24 is capped in the
    verify queue while an honest newcomer still enters the table.

    Before: the raw datagrams forged from 127.0.0.9 became records at every
    node, the download made 6 TCP connects to the victim, and the forged
    requests filled the verify queue (64 queued, 129 dropped): the newcomer was
    not in the table 5 s later."""
    key = os.urandom(20)
    resource_id = key + os.urandom(12)
    victim = Accepts()
    victim_port = await victim.start(VICTIM)
    raw = raw_socket()
    try:
        earner = await attackers.socket(ATTACKER)
        spoofer = await attackers.socket(SPOOFER)
        for node in honest:
            token = await earner.earn_token(addr(node)) or os.urandom(8)
            args = spoofed_announcement(key, (VICTIM, victim_port), token)
            assert await spoofer.ask(addr(node), "add_provider", *args) is False
            # From 127.0.0.3 about itself, with the token of another address: refused.
            own = spoofed_announcement(key, (SPOOFER, victim_port), token)
            assert await spoofer.ask(addr(node), "add_provider", *own) is False
            if raw is not None:
                data = dht_datagram("add_provider", *args)
                raw.sendto(raw_udp((VICTIM, victim_port), addr(node), data), (addr(node)[0], 0))
                await spoofer.ask(addr(node), "ping", spoofer.node_id)  # it was read
        for node in honest:
            assert node.core.providers.get_records(key) == []
            assert total(node, "providers_refused_token") >= 2 + (raw is not None)
            assert total(node, "providers_accepted") == 0

        downloader = await start_downloader(tmp_path / "dl", "127.0.8.1", addr(honest[0]))
        try:
            assert await downloader.discovery.find_providers(key) == []
            with pytest.raises(NotFoundError):
                await asyncio.wait_for(downloader.exchange.get(resource_id, tmp_path / "x"), 20)
        finally:
            await downloader.close()
        assert victim.count == 0, "a downloader was made to connect to the victim"

        # Requests from 200 forged sources of one /24, more than the verify queue
        # holds: unknown senders are verified with a ping first, and at most
        # verify_queue_per_subnet of those pings are queued per /24.
        target = honest[1]
        forged = [(f"127.0.0.{i}", 40000 + i) for i in range(10, 210)]
        assert len(forged) > CONFIG.verify_queue_max
        if raw is not None:
            for source in forged:
                data = dht_datagram("find_node", os.urandom(20), os.urandom(20))
                raw.sendto(raw_udp(source, addr(target), data), (addr(target)[0], 0))
        else:  # without root: real sockets in that /24 that never answer
            for host, _ in forged:
                silent = await attackers.socket(host)
                silent.send(addr(target), "find_node", os.urandom(20), os.urandom(20))
        await spoofer.ask(addr(target), "ping", spoofer.node_id)
        await eventually(
            lambda: total(target, "verify_dropped_subnet") > 0,
            timeout=5,
            what="verify work capped per subnet",
        )
        assert target.stats()["verify_queue"] <= CONFIG.verify_queue_per_subnet
        newcomer = (await start_nodes([NEWCOMER]))[0]
        try:
            # It only asks the target things: the target must verify it to add it.
            await newcomer.bootstrap([addr(target)])
            await eventually(
                lambda: target.core.table.node_for(newcomer.node_id) is not None,
                timeout=5,
                what="the honest newcomer in the target's table",
            )
        finally:
            await newcomer.close()
    finally:
        if raw is not None:
            raw.close()
        await victim.close()
