"""Endgame cancels: the piece server stops a cancelled read, the fetcher cancels
the losers of an endgame race. Real stores and servers; no network (the
requester hands each request to the provider's PieceServer in a task of its own
and cancels that task when the request is cancelled, as a connection does)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from p2pnode.clock import MonotonicClock
from p2pnode.dht.discovery import ProviderRecord
from p2pnode.errors import RemoteError
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.fetcher import Fetcher
from p2pnode.exchange.manifest import MIN_PIECE_SIZE, Manifest, build_manifest
from p2pnode.exchange.messages import GetPiece, PieceData
from p2pnode.exchange.server import PieceServer
from p2pnode.exchange.store import PieceSource, Store
from p2pnode.net.host import PeerAddress
from p2pnode.net.memory import MemoryBudget
from p2pnode.wire.messages import ErrorReply, Message

PS = MIN_PIECE_SIZE
SLOW = "slow-disk"  # thread name prefix of the executor whose reads wait for the gate


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Reads in SLOW threads wait until the gate opens (a disk that stalls)."""
    opened = threading.Event()
    real = PieceSource.read

    def read(self: PieceSource, index: int) -> memoryview:
        if threading.current_thread().name.startswith(SLOW):
            opened.wait(10)
        return real(self, index)

    monkeypatch.setattr(PieceSource, "read", read)
    yield opened
    opened.set()  # let stalled threads finish


@pytest.fixture
def slow_executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(4, thread_name_prefix=SLOW)
    yield pool
    pool.shutdown(wait=False)


def _share(tmp_path: Path, name: str, pieces: int) -> tuple[Store, Manifest, bytes]:
    data = os.urandom(PS * pieces - 100)
    path = tmp_path / "files" / "f.bin"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    data = path.read_bytes()
    manifest, listing = build_manifest(path, piece_size=PS)
    store = Store(tmp_path / name)
    store.add_shared(manifest, listing.root, listing.stats)
    return store, manifest, data


# -- the server -------------------------------------------------------------------


async def test_cancelled_read_stops_and_frees_its_slot(
    tmp_path: Path, gate: threading.Event, slow_executor: ThreadPoolExecutor
) -> None:
    store, manifest, data = _share(tmp_path, "home", 4)
    rid = manifest.resource_id
    memory = MemoryBudget(total=16 * PS, per_peer=8 * PS)
    server = PieceServer(
        store,
        slow_executor,
        on_stale=lambda rid, why: None,
        max_reads=1,
        max_queued=2,
        min_per_peer=0,
        cached_reads=False,
        memory=memory,
    )
    me = b"m" * 20

    def ask(peer: bytes, index: int) -> asyncio.Task[Message]:
        # Each request in a task of its own, as the connection runs handlers.
        return asyncio.create_task(server.handle(peer, GetPiece(rid, index)))

    reading, queued = ask(me, 0), ask(me, 1)  # one in the stalled thread, one queued
    await asyncio.sleep(0.05)
    assert server.stats()["piece_requests_queued"] == 2
    assert isinstance(await server.handle(me, GetPiece(rid, 2)), ErrorReply)  # full: busy

    # The peer's cancels (the connection cancels the handler tasks) stop both: the
    # queued one and the one whose thread is still stuck. No answer is made.
    queued.cancel()
    reading.cancel()
    done, _ = await asyncio.wait([queued, reading], timeout=1.0)  # (wait_for would cancel)
    assert len(done) == 2 and queued.cancelled() and reading.cancelled()
    stats = server.stats()
    assert stats["piece_requests_queued"] == 0 and stats["reads_cancelled"] == 2
    assert stats["pieces_served"] == 0 and memory.used == 0  # slots and memory freed at once

    # The freed slots take new requests; they are served once the disk answers.
    later = ask(me, 3)
    await asyncio.sleep(0.05)
    gate.set()
    reply = await asyncio.wait_for(later, 5.0)
    assert isinstance(reply, PieceData) and bytes(reply.data) == data[3 * PS :]
    assert server.stats()["reads_cancelled"] == 2
    store.close()


# -- the fetcher ------------------------------------------------------------------


class DirectRequester:
    """Hands each request to the provider's server in its own task (like a
    connection: a request given up cancels that task, as the mux's cancel does);
    an ErrorReply raises RemoteError (like PeerHost.request)."""

    def __init__(self, own: bytes, servers: dict[bytes, PieceServer]) -> None:
        self._own = own
        self._servers = servers
        self.sent: list[tuple[bytes, Message]] = []
        self.cancelled: list[tuple[bytes, Message]] = []

    async def request(
        self, peer: PeerAddress, msg: Message, timeout: float | None = None
    ) -> Message:
        assert peer.node_id is not None
        self.sent.append((peer.node_id, msg))
        handler = asyncio.create_task(self._servers[peer.node_id].handle(self._own, msg))
        try:
            async with asyncio.timeout(timeout):
                reply = await asyncio.shield(handler)
        except asyncio.CancelledError:
            if not handler.done():
                self.cancelled.append((peer.node_id, msg))
                handler.cancel()
            raise
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.code, reply.message)
        return reply


class Providers:
    def __init__(self, records: list[ProviderRecord]) -> None:
        self.records = records

    async def find_providers(self, key: bytes, want: int = 20) -> list[ProviderRecord]:
        return list(self.records)

    def remove_provider(self, key: bytes) -> None:
        pass


CONFIG = ExchangeConfig(
    requests_per_peer=3,
    piece_timeout=5.0,
    rediscover_attempts=0,
    fsync=False,
    stale_check_interval=0,
    endgame_copies=2,
)


async def _race(
    tmp_path: Path, slow_executor: ThreadPoolExecutor
) -> tuple[Fetcher, DirectRequester, dict[bytes, PieceServer], bytes]:
    """Download 8 pieces from a fast provider and one whose disk stalls: every
    piece asked of the slow one is raced, and won, by the fast one."""
    fast_id, slow_id = b"F" * 20, b"S" * 20
    fast_store, manifest, data = _share(tmp_path, "fast", 8)
    slow_store, _, _ = _share(tmp_path, "slow", 8)
    servers = {
        fast_id: PieceServer(fast_store, None, on_stale=lambda r, w: None),
        slow_id: PieceServer(
            slow_store, slow_executor, on_stale=lambda r, w: None, cached_reads=False
        ),
    }
    requester = DirectRequester(b"L" * 20, servers)
    records = [ProviderRecord(slow_id, "127.0.0.1", 1), ProviderRecord(fast_id, "127.0.0.1", 2)]
    leech = Store(tmp_path / "leech")
    fetcher = Fetcher(
        store=leech,
        requester=requester,
        providers=Providers(records),
        config=CONFIG,
        clock=MonotonicClock(),
        executor=None,
    )
    await asyncio.wait_for(fetcher.fetch(manifest.resource_id, tmp_path / "out.bin"), 10.0)
    assert (tmp_path / "out.bin").read_bytes() == data
    for s in (fast_store, slow_store, leech):
        s.close()
    return fetcher, requester, servers, slow_id


async def test_endgame_losers_are_cancelled(
    tmp_path: Path, gate: threading.Event, slow_executor: ThreadPoolExecutor
) -> None:
    fetcher, requester, servers, slow_id = await _race(tmp_path, slow_executor)
    asked_slow = {m.index for p, m in requester.sent if p == slow_id and isinstance(m, GetPiece)}
    cancelled = {m.index for p, m in requester.cancelled if isinstance(m, GetPiece)}
    assert asked_slow, "the slow provider was asked for pieces"
    # Every piece asked of the stalled provider was cancelled there, and only there.
    assert cancelled == asked_slow
    assert all(p == slow_id for p, m in requester.cancelled)
    for _ in range(100):  # the cancelled handlers end on the next loop iterations
        if servers[slow_id].stats()["reads_cancelled"] == len(asked_slow):
            break
        await asyncio.sleep(0.01)
    c = fetcher.counters
    assert c["pieces_cancelled"] == len(asked_slow)
    assert c["endgame_duplicate_bytes"] == 0 and c["pieces_fetched"] == 8
    served = servers[slow_id].stats()
    assert served["reads_cancelled"] == len(asked_slow) and served["pieces_served"] == 0
    assert served["piece_requests_queued"] == 0
