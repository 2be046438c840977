"""Attack 2 of issue 10, against the downloader: the key of a shared file lists
more than 16 fake providers ahead of the honest one.

The fakes are real provider records in the DHT stores of the nodes that hold the
key (as an attacker's announcements would leave them): random ids at closed
ports on other loopback addresses (the dial is refused at once) and at ports
that accept TCP but never answer (the dial hangs). Before the fix the fetcher
asked the lookup for 16 providers and tried only those, in the order found:
``get`` failed with "no provider sent the manifest ... cannot connect".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2pnode.dht import DhtConfig, Discovery
from p2pnode.dht.records import sign_provider_record
from p2pnode.errors import NotFoundError, P2PError
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.manifest import MIN_PIECE_SIZE, build_manifest, dht_key
from p2pnode.exchange.service import Exchange
from p2pnode.identity import Identity
from p2pnode.net.config import NetLimits
from p2pnode.net.host import PeerHost
from tests.helpers import can_bind

CONFIG = ExchangeConfig(
    piece_timeout=5.0,
    manifest_timeout=5.0,
    dial_timeout=1.0,
    rediscover_attempts=0,
    fsync=False,
    io_threads=2,
    stale_check_interval=0,
    progress_interval=0.0,
)
DHT = DhtConfig(rpc_timeout=1.0, lookup_timeout=5.0)
# Fakes on addresses of their own, each in its own /24 so the DHT's per-address
# and per-subnet quotas keep them all (they model many attacking hosts).
REFUSING = [f"127.0.{i}.2" for i in range(1, 19)]  # 18 closed ports
SILENT = [f"127.0.{i}.3" for i in range(101, 107)]  # 6 ports that never answer
needs_other_loopbacks = pytest.mark.skipif(
    not all(can_bind(a, socket.SOCK_STREAM) for a in REFUSING + SILENT),
    reason="other 127.x addresses cannot be bound here",
)


@dataclass
class Node:
    discovery: Discovery
    host: PeerHost
    exchange: Exchange
    udp_port: int
    tcp_port: int

    async def close(self) -> None:
        await self.exchange.close()
        await self.host.close()
        await self.discovery.close()


@asynccontextmanager
async def started_network(
    home: Path, config: ExchangeConfig = CONFIG, dht: DhtConfig = DHT
) -> AsyncIterator[list[Node]]:
    """A sharer and a downloader, joined."""
    nodes: list[Node] = []
    try:
        for name in ("seed", "leech"):
            identity = Identity.generate()
            discovery = Discovery(identity, dht)
            udp = await discovery.listen("127.0.0.1", 0)
            host = PeerHost(identity, NetLimits(request_timeout=10.0, handshake_timeout=10.0))
            tcp = await host.listen("127.0.0.1", 0)
            exchange = Exchange(home / name, config, discovery, host, tcp)
            await exchange.start()
            nodes.append(Node(discovery, host, exchange, udp, tcp))
            if len(nodes) > 1:
                assert await discovery.bootstrap([("127.0.0.1", nodes[0].udp_port)])
        yield nodes
    finally:
        for node in reversed(nodes):
            await node.close()


@contextmanager
def fake_listeners(refusing: list[str], silent: list[str]) -> Iterator[list[tuple[str, int]]]:
    """(host, port) of every fake: closed ports first found free, then listening
    sockets that never accept or read (the kernel completes the TCP handshake,
    the Noise one never comes); the silent ones spread among the others, as a
    real flood would mix them."""
    closed = []
    for host in refusing:
        with socket.socket() as probe:
            probe.bind((host, 0))
            closed.append((host, probe.getsockname()[1]))
    silent_socks = []
    try:
        for host in silent:
            sock = socket.socket()
            silent_socks.append(sock)
            sock.bind((host, 0))
            sock.listen(64)
        mixed = closed[:]
        step = max(1, len(mixed) // max(1, len(silent)))
        for i, sock in enumerate(silent_socks):
            mixed.insert(i * (step + 1), sock.getsockname())
        yield mixed
    finally:
        for sock in silent_socks:
            sock.close()


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[list[Node]]:
    async with started_network(tmp_path) as nodes:
        yield nodes


@pytest.fixture
def fake_addresses() -> Iterator[list[tuple[str, int]]]:
    with fake_listeners(REFUSING, SILENT) as fakes:
        yield fakes


def insert_fakes(nodes: list[Node], key: bytes, fakes: list[tuple[str, int]]) -> None:
    """Put fake provider records for ``key`` straight into each node's DHT store, as
    each fake host's announcement would leave them: validly signed by a fresh key
    of its own (a random peer id), pointing at its own address, newer than the
    honest record (answers list the freshest first)."""
    records = []
    for host, port in fakes:
        expires = int(nodes[0].discovery.clock.now() + 3600)
        records.append(sign_provider_record(Identity.generate(), key, [(host, port)], 1, expires))
    for node in nodes:
        store = node.discovery._proto().providers
        for record in records:
            assert store.add_record(record, record.host, node.discovery.clock.now())


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


async def share(node: Node, path: Path) -> bytes:
    manifest, listing = build_manifest(path, piece_size=MIN_PIECE_SIZE)
    node.exchange.store.add_shared(manifest, listing.root, listing.stats)
    assert await node.discovery.add_provider(dht_key(manifest.resource_id), node.tcp_port)
    return manifest.resource_id


@needs_other_loopbacks
async def test_get_succeeds_past_more_than_16_fake_providers(
    network: list[Node], fake_addresses: list[tuple[str, int]], tmp_path: Path
) -> None:
    seed, leech = network
    data = [os.urandom(5 * MIN_PIECE_SIZE + 123) for _ in range(2)]
    paths = [write(tmp_path / f"file{i}.bin", blob) for i, blob in enumerate(data)]
    rids = [await share(seed, path) for path in paths]
    for rid in rids:
        insert_fakes(network, dht_key(rid), fake_addresses)
    # The attack as the downloader sees it: 24 fakes ahead of the honest provider.
    found = await leech.discovery.find_providers(dht_key(rids[0]), want=200)
    honest_at = [r.node_id for r in found].index(seed.host.node_id)
    assert honest_at > 16 and len(found) == len(fake_addresses) + 1

    t0 = time.monotonic()
    got = await asyncio.wait_for(leech.exchange.get(rids[0], tmp_path / "out0"), 15)
    first = time.monotonic() - t0
    assert (tmp_path / "out0").read_bytes() == data[0] and got.state == "complete"
    # Six silent fakes in a window of six cost about one dial timeout, not six.
    assert first < 4 * CONFIG.dial_timeout

    # A second get on the node benefits from the first: the honest provider is
    # tried first, the fakes are backing off.
    t0 = time.monotonic()
    await asyncio.wait_for(leech.exchange.get(rids[1], tmp_path / "out1"), 15)
    second = time.monotonic() - t0
    assert (tmp_path / "out1").read_bytes() == data[1]
    assert second < CONFIG.dial_timeout, (first, second)


@needs_other_loopbacks
async def test_when_every_provider_is_fake_the_error_counts_them(
    network: list[Node], fake_addresses: list[tuple[str, int]], tmp_path: Path
) -> None:
    """Nobody real provides the key: the get fails once every fake was tried, and
    says how many were tried and why they failed, not just the first 16."""
    _, leech = network
    rid = os.urandom(32)
    insert_fakes(network, dht_key(rid), fake_addresses)
    with pytest.raises(NotFoundError) as failed:
        await asyncio.wait_for(leech.exchange.get(rid, tmp_path / "x"), 15)
    message = str(failed.value)
    assert "tried 24 provider(s): 18 cannot connect, 6 timed out" in message, message


# -- measuring: python -m tests.hostile.test_provider_flood_fetch --fakes 16 64 ----


async def measure(fakes: int, home: Path) -> str:
    """One get of a shared file with ``fakes`` fake providers (a quarter silent)
    ahead of the honest one, with the default download settings."""
    silent = fakes // 4
    refusing = [f"127.0.{i}.2" for i in range(1, fakes - silent + 1)]
    quiet = [f"127.1.{i}.3" for i in range(1, silent + 1)]
    config = ExchangeConfig(fsync=False, stale_check_interval=0)
    # Room for all the fakes and the honest record in the downloader's store: this
    # measures the fetcher, not the DHT's own defences.
    dht = DhtConfig(rpc_timeout=1.0, lookup_timeout=5.0, max_providers_per_key=1024)
    with fake_listeners(refusing, quiet) as addresses:
        async with started_network(home, config, dht) as nodes:
            seed, leech = nodes
            rid = await share(seed, write(home / "file.bin", os.urandom(1 << 20)))
            insert_fakes(nodes, dht_key(rid), addresses)
            found = await leech.discovery.find_providers(dht_key(rid), want=1000)
            at = [r.node_id for r in found].index(seed.host.node_id)
            t0 = time.monotonic()
            try:
                await leech.exchange.get(rid, home / "out.bin")
                outcome = "ok"
            except P2PError as exc:
                outcome = f"FAILED: {str(exc)[:160]}"
            took = time.monotonic() - t0
    return f"{fakes} fakes ({silent} silent), honest provider at {at + 1}: {took:.2f}s {outcome}"


def main() -> None:
    parser = argparse.ArgumentParser(description=measure.__doc__)
    parser.add_argument("--fakes", type=int, nargs="+", default=[16, 64])
    args = parser.parse_args()
    for n in args.fakes:
        with tempfile.TemporaryDirectory() as home:
            print(asyncio.run(measure(n, Path(home))), flush=True)


if __name__ == "__main__":
    main()
