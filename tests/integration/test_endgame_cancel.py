"""Endgame cancels between real nodes on 127.0.0.x: a download from 4 providers,
one of whose disk stalls, ends with the pieces asked of it raced by the others
and cancelled there by the request mux's cancel (handler stopped, read stopped,
nothing sent).

Real PeerHosts, Discovery and Exchanges over sockets; the only stand-in is the
stalled disk (reads of the slow provider's copy wait for a gate).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2pnode.dht import DhtConfig, Discovery
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.manifest import MIN_PIECE_SIZE, build_manifest, dht_key
from p2pnode.exchange.service import Exchange
from p2pnode.exchange.store import PieceSource
from p2pnode.identity import Identity
from p2pnode.net.config import NetLimits
from p2pnode.net.host import PeerHost
from tests.helpers import can_bind, eventually

pytestmark = pytest.mark.usefixtures("no_errors_logged")

PIECES = 48
CONFIG = ExchangeConfig(
    requests_per_peer=4,
    piece_timeout=10.0,
    rediscover_attempts=1,
    rediscover_delay=0.05,
    fsync=False,
    io_threads=4,
    stale_check_interval=0,
    endgame_copies=2,
)
# The slow provider reads every piece off disk (in a thread): that is what a
# cancel can stop. Page-cache reads are answered at once, nothing to cancel.
SLOW = ExchangeConfig(**{**CONFIG.__dict__, "serve_cached_reads": False})
DHT = DhtConfig(rpc_timeout=1.0, lookup_timeout=5.0)
# A DHT answer lists one provider per host: one address per node where possible.
DISTINCT_HOSTS = can_bind("127.0.0.6") and can_bind("127.0.0.6", socket.SOCK_STREAM)


@dataclass
class Peer:
    discovery: Discovery
    host: PeerHost
    exchange: Exchange
    udp_port: int
    host_port: int


Factory = Callable[..., Awaitable[Peer]]


@pytest.fixture
async def make_peer(tmp_path: Path) -> AsyncIterator[Factory]:
    peers: list[Peer] = []

    async def factory(
        name: str, bootstrap: Peer | None = None, config: ExchangeConfig = CONFIG
    ) -> Peer:
        ip = f"127.0.0.{len(peers) + 1}" if DISTINCT_HOSTS else "127.0.0.1"
        identity = Identity.generate()
        discovery = Discovery(identity, DHT)
        udp = await discovery.listen(ip, 0)
        host = PeerHost(identity, NetLimits(request_timeout=10.0))
        tcp = await host.listen(ip, 0)
        exchange = Exchange(tmp_path / name, config, discovery, host, tcp)
        await exchange.start()
        peer = Peer(discovery, host, exchange, udp, tcp)
        peers.append(peer)
        if bootstrap is not None:
            assert await discovery.bootstrap([(bootstrap_ip(bootstrap), bootstrap.udp_port)])
        return peer

    def bootstrap_ip(peer: Peer) -> str:
        return f"127.0.0.{peers.index(peer) + 1}" if DISTINCT_HOSTS else "127.0.0.1"

    yield factory
    for peer in reversed(peers):
        await peer.exchange.close()
        await peer.host.close()
        await peer.discovery.close()


@dataclass
class Stall:
    """Reads of the slow provider's copy wait for ``gate``; ``entered`` and ``ended``
    count them (a read in a worker thread ends even when its request was cancelled)."""

    gate: threading.Event
    entered: int = 0
    ended: int = 0


@pytest.fixture
def stalled_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stall]:
    """Reads of files under tmp_path/slow wait until the gate opens."""
    stall = Stall(threading.Event())
    lock = threading.Lock()
    slow = str(tmp_path / "slow")
    real = PieceSource.read

    def read(self: PieceSource, index: int) -> memoryview:
        if not any(p.startswith(slow) for p in self.paths):
            return real(self, index)
        with lock:
            stall.entered += 1
        try:
            stall.gate.wait(30)
            return real(self, index)
        finally:
            with lock:
                stall.ended += 1

    monkeypatch.setattr(PieceSource, "read", read)
    yield stall
    stall.gate.set()


async def _four_providers(
    make_peer: Factory, tmp_path: Path
) -> tuple[list[Peer], Peer, bytes, bytes]:
    """Providers 0-2 serve from the page cache; provider 3 (the slow one) stalls."""
    data = os.urandom(PIECES * MIN_PIECE_SIZE - 7)
    digest = hashlib.sha256(data).digest()
    providers: list[Peer] = []
    rid = b""
    for i in range(4):
        folder = tmp_path / ("slow" if i == 3 else f"fast{i}")
        folder.mkdir()
        (folder / "f.bin").write_bytes(data)
        peer = await make_peer(
            f"p{i}", providers[0] if providers else None, SLOW if i == 3 else CONFIG
        )
        # Small pieces, so there are many (share() would pick larger ones).
        manifest, listing = build_manifest(folder / "f.bin", piece_size=MIN_PIECE_SIZE)
        peer.exchange.store.add_shared(manifest, listing.root, listing.stats)
        await peer.discovery.add_provider(dht_key(manifest.resource_id), peer.host_port)
        rid = manifest.resource_id
        providers.append(peer)
    leech = await make_peer("leech", providers[0])

    async def all_found() -> bool:
        return len(await leech.exchange.providers(rid)) >= 4

    await eventually(all_found, what="4 providers found through the DHT")
    return providers, leech, rid, digest


async def test_endgame_duplicates_are_cancelled(
    make_peer: Factory, tmp_path: Path, stalled_disk: Stall
) -> None:
    providers, leech, rid, digest = await _four_providers(make_peer, tmp_path)
    slow = providers[3]
    out = tmp_path / "out.bin"
    await asyncio.wait_for(leech.exchange.get(rid, out), 30.0)
    assert hashlib.sha256(out.read_bytes()).digest() == digest

    got = leech.exchange.stats()
    assert got["pieces_fetched"] == PIECES
    # Every piece asked of the stalled provider was raced, won elsewhere, and
    # cancelled there: its handlers and reads stopped, nothing of it sent.
    assert got["pieces_cancelled"] >= 1

    def stopped() -> bool:
        # (the leech may also cancel duplicates a fast provider lost to another)
        received = slow.host.stats().get("cancels_received", 0)
        return bool(received >= 1 and slow.exchange.stats()["reads_cancelled"] == received)

    await eventually(stopped, what="the slow provider's reads stopped")
    net_leech, net_slow = leech.host.stats(), slow.host.stats()
    # (a request given up before it left, or while dialing, needs no cancel)
    assert net_slow["cancels_received"] <= net_leech["cancels_sent"] <= got["pieces_cancelled"]
    assert net_slow.get("cancels_bogus", 0) == net_slow.get("cancels_too_late", 0) == 0
    assert net_slow["handlers_inflight"] == 0
    # No answer came unasked-for, no message was refused.
    assert net_leech.get("unexpected_responses", 0) == 0
    assert net_slow.get("unknown_messages", 0) == net_slow.get("bad_messages", 0) == 0
    # The stalled reads end later: their pieces are never sent.
    sent_before = net_slow["bytes_out"]
    assert stalled_disk.entered >= 1
    stalled_disk.gate.set()
    await eventually(
        lambda: stalled_disk.ended == stalled_disk.entered, what="the stalled reads ended"
    )
    await asyncio.sleep(0)  # (their results reach the loop, to be dropped)
    served = slow.exchange.stats()
    assert served["pieces_served"] == 0 and served["piece_requests_queued"] == 0
    assert slow.host.stats()["bytes_out"] - sent_before < MIN_PIECE_SIZE
