"""The exchange over real PeerHosts and Discovery instances on 127.0.0.1.

Rules of this module: port 0 only; no sleeps used as synchronisation (tests wait
on events set by the code under test, or on the download's own completion);
misbehaving providers are made by wrapping a real provider's request handler.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest

from p2pnode.dht import DhtConfig, Discovery
from p2pnode.errors import NotFoundError, ProtocolError, UsageError
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.fetcher import Progress
from p2pnode.exchange.manifest import MIN_PIECE_SIZE, Manifest, build_manifest, dht_key
from p2pnode.exchange.messages import GetManifest, GetPiece, ManifestData, PieceData
from p2pnode.exchange.service import Exchange
from p2pnode.identity import Identity
from p2pnode.net.config import NetLimits
from p2pnode.net.host import PeerHost
from p2pnode.wire.messages import ErrorCode, ErrorReply, Message

PS = MIN_PIECE_SIZE
Handler = Callable[[bytes, Message], Awaitable[Message]]

CONFIG = ExchangeConfig(
    requests_per_peer=4,
    piece_timeout=5.0,
    manifest_timeout=5.0,
    rediscover_attempts=1,
    rediscover_delay=0.05,
    fsync=False,
    io_threads=2,
    stale_check_interval=0,
    progress_interval=0.0,
)
DHT = DhtConfig(rpc_timeout=1.0, lookup_timeout=5.0)


@dataclass
class Peer:
    home: Path
    identity: Identity
    discovery: Discovery
    host: PeerHost
    exchange: Exchange
    udp_port: int
    host_port: int
    closed: bool = False
    served_pieces: list[int] = field(default_factory=list)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.exchange.close()
        await self.host.close()
        await self.discovery.close()

    def wrap_handler(self, make: Callable[[Handler], Handler]) -> None:
        self.host.set_handler(make(self.exchange.handle))

    def count_pieces(self) -> None:
        inner = self.exchange.handle

        async def counting(remote: bytes, msg: Message) -> Message:
            if isinstance(msg, GetPiece):
                self.served_pieces.append(msg.index)
            return await inner(remote, msg)

        self.host.set_handler(counting)


Factory = Callable[..., Awaitable[Peer]]


@pytest.fixture
async def make_peer(tmp_path: Path) -> AsyncIterator[Factory]:
    peers: list[Peer] = []

    async def factory(
        name: str, bootstrap: Peer | None = None, config: ExchangeConfig = CONFIG
    ) -> Peer:
        identity = Identity.generate()
        discovery = Discovery(identity, DHT)
        udp = await discovery.listen("127.0.0.1", 0)
        host = PeerHost(identity, NetLimits(request_timeout=10.0))
        tcp = await host.listen("127.0.0.1", 0)
        home = tmp_path / name
        exchange = Exchange(home, config, discovery, host, tcp)
        await exchange.start()
        peer = Peer(home, identity, discovery, host, exchange, udp, tcp)
        peers.append(peer)
        if bootstrap is not None:
            assert await discovery.bootstrap([("127.0.0.1", bootstrap.udp_port)])
        return peer

    yield factory
    for peer in reversed(peers):
        await peer.close()


def _random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


async def _provide(peer: Peer, path: Path, piece_size: int = PS) -> Manifest:
    """Share ``path`` on ``peer`` (small pieces: many of them) and announce it."""
    manifest, listing = build_manifest(path, piece_size=piece_size)
    peer.exchange.store.add_shared(manifest, listing.root, listing.stats)
    await peer.discovery.add_provider(dht_key(manifest.resource_id), peer.host_port)
    return manifest


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


async def _wait_provider_count(peer: Peer, rid: bytes, n: int) -> None:
    """Provider records propagate with the announce itself; poll with a deadline."""
    for _ in range(200):
        if len(await peer.exchange.providers(rid)) >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} providers after 10 s")


async def test_share_then_get_through_dht(make_peer: Factory, tmp_path: Path) -> None:
    seed = await make_peer("seed")
    leech = await make_peer("leech", bootstrap=seed)
    data = _random_file(tmp_path / "files" / "movie.bin", 3 * 256 * 1024 + 12345)
    info = await seed.exchange.share(tmp_path / "files" / "movie.bin")
    assert info.state == "shared" and info.served and info.size == len(data)
    providers = await leech.exchange.providers(info.resource_id)
    assert [p.node_id for p in providers] == [seed.identity.node_id]

    events: list[Progress] = []
    out = tmp_path / "out"
    out.mkdir()
    got = await leech.exchange.get(info.resource_id, out / "movie.bin", progress=events.append)
    assert (out / "movie.bin").read_bytes() == data
    assert not (out / "movie.bin.p2pnode-partial").exists()
    assert got.state == "complete" and got.served and got.path == str(out / "movie.bin")
    assert events[-1].done_bytes == len(data) and events[-1].state == "done"
    assert events[-1].to_json()["total_bytes"] == len(data)
    # The final progress says where the bytes came from: the one provider (the
    # peers taking part at that instant are none by then: the workers ended).
    assert events[-1].peers_used == 1 and events[-1].to_json()["peers_used"] == 1, events[-1]
    assert all(e.peers_used <= 1 for e in events), events
    # The leech now serves it too and is announced.
    await _wait_provider_count(seed, info.resource_id, 2)
    [row] = leech.exchange.list()
    assert row.to_json()["state"] == "complete" and row.pieces_done == row.pieces_total

    # An existing destination needs force; an existing folder receives it by name.
    third = await make_peer("third", bootstrap=seed)
    (tmp_path / "exists").write_bytes(b"old")
    with pytest.raises(UsageError, match="already exists"):
        await third.exchange.get(info.resource_id, tmp_path / "exists")
    got3 = await third.exchange.get(info.resource_id, tmp_path / "exists", force=True)
    assert (tmp_path / "exists").read_bytes() == data
    assert got3.path == str(tmp_path / "exists")
    # Already here: a get elsewhere is a local copy; the same place is a no-op.
    sent = third.host.stats().get("bytes_in", 0)
    copy = await third.exchange.get(info.resource_id, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == data and copy.path == str(tmp_path / "copy")
    assert third.host.stats().get("bytes_in", 0) == sent, "no network for a local copy"
    same = await third.exchange.get(info.resource_id, tmp_path / "exists")
    assert same.path == str(tmp_path / "exists")
    assert [r.to_json()["path"] for r in third.exchange.list()] == [str(tmp_path / "exists")]


async def test_unknown_id_is_not_found(make_peer: Factory) -> None:
    seed = await make_peer("seed")
    leech = await make_peer("leech", bootstrap=seed)
    with pytest.raises(NotFoundError, match="no providers"):
        await leech.exchange.get(hashlib.sha256(b"nothing").digest(), Path("/tmp/never"))


async def test_nested_folder(make_peer: Factory, tmp_path: Path) -> None:
    seed = await make_peer("seed")
    leech = await make_peer("leech", bootstrap=seed)
    root = tmp_path / "album"
    files = {
        "a/b/c/deep.bin": os.urandom(PS * 3 + 5),
        "a/empty": b"",
        "a/small.txt": b"hello",
        "top.dat": os.urandom(PS // 2),
        "z/\u00e9t\u00e9.txt": os.urandom(PS + 1),
    }
    for rel, blob in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(blob)
    manifest = await _provide(seed, root)
    dest_parent = tmp_path / "downloads"
    dest_parent.mkdir()
    # An existing folder as destination receives the folder under its own name.
    got = await leech.exchange.get(manifest.resource_id, dest_parent)
    assert got.kind == "dir" and got.files == len(files)
    for rel, blob in files.items():
        assert (dest_parent / "album" / rel).read_bytes() == blob
    assert not (dest_parent / "album.p2pnode-partial").exists()


async def test_corrupt_and_vanishing_providers(make_peer: Factory, tmp_path: Path) -> None:
    data = _random_file(tmp_path / "src" / "big.bin", PS * 300 + 77)
    manifest, listing = build_manifest(tmp_path / "src" / "big.bin", piece_size=PS)
    rid = manifest.resource_id

    good = await make_peer("good")
    evil = await make_peer("evil", bootstrap=good)
    flaky = await make_peer("flaky", bootstrap=good)
    leech = await make_peer("leech", bootstrap=good)
    for peer in (good, evil, flaky):
        peer.exchange.store.add_shared(manifest, listing.root, listing.stats)
        await peer.discovery.add_provider(dht_key(rid), peer.host_port)
    await _wait_provider_count(leech, rid, 3)

    def corrupting(inner: Handler) -> Handler:
        async def handler(remote: bytes, msg: Message) -> Message:
            reply = await inner(remote, msg)
            if isinstance(reply, PieceData):
                bad = bytearray(reply.data)
                bad[0] ^= 0xFF
                evil.served_pieces.append(reply.index)
                return PieceData(reply.resource_id, reply.index, bytes(bad))
            return reply

        return handler

    vanished = asyncio.Event()

    def vanishing(inner: Handler) -> Handler:
        async def handler(remote: bytes, msg: Message) -> Message:
            if isinstance(msg, GetPiece):
                flaky.served_pieces.append(msg.index)
                if len(flaky.served_pieces) > 6:
                    vanished.set()
                    await asyncio.Event().wait()  # hang until the host closes
            return await inner(remote, msg)

        return handler

    evil.wrap_handler(corrupting)
    flaky.wrap_handler(vanishing)
    good.count_pieces()

    async def kill_flaky() -> None:
        await vanished.wait()
        await flaky.close()

    killer = asyncio.create_task(kill_flaky())
    try:
        got = await leech.exchange.get(rid, tmp_path / "out.bin")
        assert vanished.is_set(), "the flaky provider was not asked enough to vanish"
        await killer
    finally:
        killer.cancel()
    assert (tmp_path / "out.bin").read_bytes() == data
    assert got.state == "complete"
    assert evil.served_pieces, "the corrupt provider was asked at least once"
    # Banned after its first bad piece: it was not asked again beyond its first window.
    assert len(evil.served_pieces) <= CONFIG.requests_per_peer
    assert flaky.closed and len(flaky.served_pieces) > 6
    assert good.served_pieces


async def test_interrupted_download_resumes(make_peer: Factory, tmp_path: Path) -> None:
    data = _random_file(tmp_path / "src.bin", PS * 40 + 3)
    seed = await make_peer("seed")
    leech = await make_peer("leech", bootstrap=seed)
    info = await seed.exchange.share(tmp_path / "src.bin")
    # Use small pieces: re-share with PS so there are many.
    manifest, listing = build_manifest(tmp_path / "src.bin", piece_size=PS)
    seed.exchange.store.add_shared(manifest, listing.root, listing.stats)
    await seed.exchange.unshare(info.resource_id)
    rid = manifest.resource_id
    await seed.discovery.add_provider(dht_key(rid), seed.host_port)

    stall = asyncio.Event()
    release = asyncio.Event()

    def stalling(inner: Handler) -> Handler:
        async def handler(remote: bytes, msg: Message) -> Message:
            if isinstance(msg, GetPiece):
                seed.served_pieces.append(msg.index)
                if len(seed.served_pieces) > 15 and not release.is_set():
                    stall.set()
                    await release.wait()
            return await inner(remote, msg)

        return handler

    seed.wrap_handler(stalling)
    dest = tmp_path / "dest.bin"
    landed = asyncio.Event()

    def on_progress(p: Progress) -> None:
        if p.pieces_done >= 15:
            landed.set()

    download = asyncio.create_task(leech.exchange.get(rid, dest, progress=on_progress))
    await stall.wait()
    # Let the pieces already answered land, then "crash" the download.
    await landed.wait()
    download.cancel()
    with pytest.raises(asyncio.CancelledError):
        await download
    kept = set(leech.exchange.store.verified_pieces(rid))
    assert len(kept) >= 15 and not dest.exists()
    [row] = [r for r in leech.exchange.list() if r.resource_id == rid]
    assert row.state == "partial" and row.pieces_done == len(kept)

    # Restart the leech's exchange from its home (as after a crash), then resume.
    await leech.exchange.close()
    leech.exchange = Exchange(leech.home, CONFIG, leech.discovery, leech.host, leech.host_port)
    await leech.exchange.start()
    release.set()
    seed.served_pieces.clear()
    await leech.exchange.get(rid, dest)
    assert dest.read_bytes() == data
    asked = sorted(seed.served_pieces)
    assert set(asked).isdisjoint(kept)
    assert asked == sorted(set(range(manifest.piece_count)) - kept)


async def test_resume_rechecks_damaged_partial(make_peer: Factory, tmp_path: Path) -> None:
    data = _random_file(tmp_path / "src.bin", PS * 8)
    seed = await make_peer("seed")
    leech = await make_peer("leech", bootstrap=seed)
    manifest = await _provide(seed, tmp_path / "src.bin")
    rid = manifest.resource_id
    dest = tmp_path / "dest.bin"
    # Pretend an earlier run recorded pieces 0-3, but piece 2 never reached the disk.
    res = leech.exchange.store.begin_download(manifest, dest)
    _patch(res.root, 0, data[: 2 * PS])
    _patch(res.root, 3 * PS, data[3 * PS : 4 * PS])
    leech.exchange.store.record_pieces(rid, [0, 1, 2, 3])
    seed.count_pieces()
    await leech.exchange.get(rid, dest)
    assert dest.read_bytes() == data
    assert sorted(seed.served_pieces) == [2, 4, 5, 6, 7]


async def test_path_escape_manifest_rejected(make_peer: Factory, tmp_path: Path) -> None:
    evil = await make_peer("evil")
    leech = await make_peer("leech", bootstrap=evil)
    bad = msgpack.packb(
        [1, "dir", "x", PS, [["../../escape", 5]], hashlib.sha256(b"hello").digest()],
        use_bin_type=True,
    )
    rid = hashlib.sha256(bad).digest()

    def serving_bad(inner: Handler) -> Handler:
        async def handler(remote: bytes, msg: Message) -> Message:
            if isinstance(msg, GetManifest):
                return ManifestData(msg.resource_id, bad)
            if isinstance(msg, GetPiece):
                return PieceData(msg.resource_id, 0, b"hello")
            return ErrorReply(ErrorCode.NOT_FOUND, "no")

        return handler

    evil.wrap_handler(serving_bad)
    await evil.discovery.add_provider(dht_key(rid), evil.host_port)
    with pytest.raises(ProtocolError, match="rejected"):
        await leech.exchange.get(rid, tmp_path / "dest")
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path.parent / "escape").exists()
    assert not (tmp_path / "dest").exists()


async def test_manifest_not_matching_id_is_skipped(make_peer: Factory, tmp_path: Path) -> None:
    data = _random_file(tmp_path / "f.bin", PS * 2)
    liar = await make_peer("liar")
    seed = await make_peer("seed", bootstrap=liar)
    leech = await make_peer("leech", bootstrap=liar)
    info = await seed.exchange.share(tmp_path / "f.bin")
    other = build_manifest(_write_other(tmp_path), piece_size=PS)[0]

    def lying(inner: Handler) -> Handler:
        async def handler(remote: bytes, msg: Message) -> Message:
            if isinstance(msg, GetManifest):
                return ManifestData(msg.resource_id, other.canonical)
            return await inner(remote, msg)

        return handler

    liar.wrap_handler(lying)
    await liar.discovery.add_provider(dht_key(info.resource_id), liar.host_port)
    await _wait_provider_count(leech, info.resource_id, 2)
    await leech.exchange.get(info.resource_id, tmp_path / "got.bin")
    assert (tmp_path / "got.bin").read_bytes() == data


def _write_other(tmp_path: Path) -> Path:
    path = tmp_path / "other.bin"
    path.write_bytes(b"other content")
    return path


async def test_stale_shared_file_stops_being_served(make_peer: Factory, tmp_path: Path) -> None:
    src = tmp_path / "live.bin"
    _random_file(src, PS * 4)
    seed = await make_peer("seed")
    leech = await make_peer("leech", bootstrap=seed)
    info = await seed.exchange.share(src)
    _patch(src, 0, b"edited")
    os.utime(src, ns=(1, 1))
    with pytest.raises(Exception) as caught:
        await leech.exchange.get(info.resource_id, tmp_path / "got.bin")
    assert "changed on disk" in str(caught.value) or "not served" in str(caught.value)
    [row] = seed.exchange.list()
    assert not row.served and row.stale is not None and "changed" in row.stale
    assert not (tmp_path / "got.bin").exists()
    # The check without any request notices it too.
    seed2 = await make_peer("seed2")
    other = tmp_path / "other.bin"
    _random_file(other, 100)
    info2 = await seed2.exchange.share(other)
    other.write_bytes(b"x")
    assert await seed2.exchange.check_stale() == [info2.resource_id]


async def test_all_providers_gone(make_peer: Factory, tmp_path: Path) -> None:
    _random_file(tmp_path / "f.bin", PS * 30)
    seed = await make_peer("seed")
    leech = await make_peer("leech", bootstrap=seed)
    manifest = await _provide(seed, tmp_path / "f.bin")
    rid = manifest.resource_id
    gone = asyncio.Event()

    def dying(inner: Handler) -> Handler:
        async def handler(remote: bytes, msg: Message) -> Message:
            if isinstance(msg, GetPiece) and msg.index >= 10:
                gone.set()
                await asyncio.Event().wait()
            return await inner(remote, msg)

        return handler

    seed.wrap_handler(dying)

    async def kill() -> None:
        await gone.wait()
        await seed.close()

    killer = asyncio.create_task(kill())
    from p2pnode.exchange.fetcher import DownloadError

    with pytest.raises((DownloadError, NotFoundError), match=r"resume|providers"):
        await leech.exchange.get(rid, tmp_path / "got.bin")
    await killer
    assert not (tmp_path / "got.bin").exists()
    assert leech.exchange.store.verified_pieces(rid)


async def test_disk_full_keeps_partial_for_resume(
    make_peer: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from p2pnode.exchange.store import StorageError
    from p2pnode.exchange.writer import PieceWriter

    data = _random_file(tmp_path / "src.bin", PS * 20)
    seed = await make_peer("seed")
    leech = await make_peer("leech", bootstrap=seed)
    manifest = await _provide(seed, tmp_path / "src.bin")
    rid = manifest.resource_id

    real = PieceWriter.verify_and_write
    writes = 0

    def filling(self: PieceWriter, index: int, blob: bytes) -> bool:
        nonlocal writes
        writes += 1
        if writes > 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, index, blob)

    monkeypatch.setattr(PieceWriter, "verify_and_write", filling)
    dest = tmp_path / "dest.bin"
    with pytest.raises(StorageError, match="disk full"):
        await leech.exchange.get(rid, dest)
    assert not dest.exists()
    kept = set(leech.exchange.store.verified_pieces(rid))
    assert kept and len(kept) <= 8
    monkeypatch.setattr(PieceWriter, "verify_and_write", real)
    seed.count_pieces()
    await leech.exchange.get(rid, dest)
    assert dest.read_bytes() == data
    assert set(seed.served_pieces).isdisjoint(kept)


async def test_get_again_after_download_deleted(make_peer: Factory, tmp_path: Path) -> None:
    data = _random_file(tmp_path / "src.bin", PS * 3)
    seed = await make_peer("seed")
    leech = await make_peer("leech", bootstrap=seed)
    info = await seed.exchange.share(tmp_path / "src.bin")
    await leech.exchange.get(info.resource_id, tmp_path / "a.bin")
    (tmp_path / "a.bin").unlink()
    got = await leech.exchange.get(info.resource_id, tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == data and got.path == str(tmp_path / "b.bin")


_KILLED_DOWNLOADER = """
import asyncio, json, sys
from pathlib import Path
from p2pnode.dht import DhtConfig, Discovery
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.service import Exchange
from p2pnode.identity import Identity
from p2pnode.net.config import NetLimits
from p2pnode.net.host import PeerHost

async def main(home, udp, rid, dest):
    identity = Identity.generate()
    discovery = Discovery(identity, DhtConfig(rpc_timeout=1.0))
    await discovery.listen("127.0.0.1", 0)
    host = PeerHost(identity, NetLimits())
    port = await host.listen("127.0.0.1", 0)
    config = ExchangeConfig(requests_per_peer=2, progress_interval=0.0, fsync=False)
    exchange = Exchange(Path(home), config, discovery, host, port)
    await exchange.start()
    await discovery.bootstrap([("127.0.0.1", int(udp))])
    def progress(p):
        print(json.dumps({"pieces": p.pieces_done}), flush=True)
    await exchange.get(bytes.fromhex(rid), Path(dest), progress=progress)

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.parametrize("piece_size", [PS, 256 * 1024], ids=["page-cache", "o-direct"])
async def test_kill_9_mid_download_then_resume(
    make_peer: Factory, tmp_path: Path, piece_size: int
) -> None:
    """A downloader process killed with SIGKILL resumes from its recorded pieces
    (small pieces are written through the page cache, large ones with O_DIRECT)."""
    import json
    import signal
    import sys

    data = _random_file(tmp_path / "src.bin", piece_size * 200)
    seed = await make_peer("seed")
    manifest = await _provide(seed, tmp_path / "src.bin", piece_size)
    rid = manifest.resource_id
    # Answer slowly once some pieces went out, so the kill lands mid-download.
    throttle = asyncio.Event()

    def slow(inner: Handler) -> Handler:
        async def handler(remote: bytes, msg: Message) -> Message:
            if isinstance(msg, GetPiece):
                seed.served_pieces.append(msg.index)
                if len(seed.served_pieces) > 60:
                    await throttle.wait()
            return await inner(remote, msg)

        return handler

    seed.wrap_handler(slow)
    home = tmp_path / "leech-home"
    dest = tmp_path / "dest.bin"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _KILLED_DOWNLOADER,
        str(home),
        str(seed.udp_port),
        rid.hex(),
        str(dest),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            while True:
                line = await proc.stdout.readline()
                assert line, "the downloader exited early"
                if json.loads(line)["pieces"] >= 50:
                    break
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not dest.exists()
    throttle.set()

    leech = await make_peer("leech", bootstrap=seed)
    # The leech's exchange is replaced by one on the killed process's home.
    await leech.exchange.close()
    leech.exchange = Exchange(home, CONFIG, leech.discovery, leech.host, leech.host_port)
    await leech.exchange.start()
    [row] = leech.exchange.list()
    assert row.state == "partial" and row.pieces_done >= 32  # committed in batches
    recorded = set(leech.exchange.store.verified_pieces(rid))
    seed.served_pieces.clear()
    await leech.exchange.get(rid, dest)
    assert dest.read_bytes() == data
    assert set(seed.served_pieces).isdisjoint(recorded)
    assert len(seed.served_pieces) == manifest.piece_count - len(recorded)


async def test_unshare_stops_serving(make_peer: Factory, tmp_path: Path) -> None:
    from p2pnode.exchange.fetcher import DownloadError

    _random_file(tmp_path / "f.bin", PS * 2)
    seed = await make_peer("seed")
    leech = await make_peer("leech", bootstrap=seed)
    info = await seed.exchange.share(tmp_path / "f.bin")
    await seed.exchange.unshare(info.resource_id)
    [row] = seed.exchange.list()
    assert not row.served and row.to_json()["served"] is False
    # Remote provider records outlive the unshare (until their TTL); asking us fails.
    with pytest.raises((DownloadError, NotFoundError)):
        await leech.exchange.get(info.resource_id, tmp_path / "got.bin")
    assert not (tmp_path / "got.bin").exists()
    with pytest.raises(NotFoundError):
        await seed.exchange.unshare(bytes(32))
    # Sharing it again serves it again, under the same id.
    again = await seed.exchange.share(tmp_path / "f.bin")
    assert again.resource_id == info.resource_id and again.served


async def test_busy_provider_is_waited_for_not_dropped(make_peer: Factory, tmp_path: Path) -> None:
    from dataclasses import replace

    data = _random_file(tmp_path / "f.bin", PS * 12)
    seed = await make_peer("seed")
    config = replace(CONFIG, busy_backoff=0.01, busy_backoff_max=0.05)
    leech = await make_peer("leech", bootstrap=seed, config=config)
    manifest = await _provide(seed, tmp_path / "f.bin")
    rid = manifest.resource_id
    refusals = 0

    def overloaded(inner: Handler) -> Handler:
        async def handler(remote: bytes, msg: Message) -> Message:
            nonlocal refusals
            if isinstance(msg, GetPiece) and refusals < 10:  # > max_failures in a row
                refusals += 1
                return ErrorReply(ErrorCode.BUSY, "try later")
            return await inner(remote, msg)

        return handler

    seed.wrap_handler(overloaded)
    await leech.exchange.get(rid, tmp_path / "got.bin")
    assert (tmp_path / "got.bin").read_bytes() == data
    assert refusals == 10


class _Silent:
    """A TCP listener that accepts and never speaks: a dial to it hangs until the
    handshake timeout (as behind a NAT dropping the SYN, only later)."""

    def __init__(self) -> None:
        self.dialed = asyncio.Event()
        self.held: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.held.append(writer)
            self.dialed.set()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        for writer in self.held:
            writer.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize("resume", [False, True], ids=["manifest", "pieces"])
async def test_a_stale_provider_record_is_looked_up_again(
    make_peer: Factory, tmp_path: Path, resume: bool
) -> None:
    """The first record a leech finds sends it to an address where the dial hangs
    (a listener that never speaks: a NAT dropping the SYN, a provider not yet
    announcing its relays); the provider then announces a fresh record. The leech
    looks the providers up again once its dial is past dial_timeout, tries the
    new address and completes, long before the stale dial's handshake timeout
    (NetLimits: 10 s) or the request timeouts (5 s). ``resume``: the leech has the
    manifest already (a partial download), so the stale dial is its first piece
    worker's."""
    from dataclasses import replace

    data = _random_file(tmp_path / "f.bin", PS * 4)
    seed = await make_peer("seed")
    # The provider's announce loop runs once, at start (nothing to announce then):
    # every announcement below is the test's.
    provider = await make_peer("provider", seed, replace(CONFIG, contact_poll_interval=1000.0))
    config = replace(CONFIG, dial_timeout=1.0, rediscover_attempts=2, rediscover_delay=0.05)
    leech = await make_peer("leech", seed, config)
    silent = _Silent()
    async with silent as silent_port:
        manifest, listing = build_manifest(tmp_path / "f.bin", piece_size=PS)
        rid = manifest.resource_id
        provider.exchange.store.add_shared(manifest, listing.root, listing.stats)
        await provider.discovery.add_provider(dht_key(rid), silent_port)
        await _wait_provider_count(leech, rid, 1)
        if resume:
            leech.exchange.store.begin_download(manifest, tmp_path / "got.bin")
        loop = asyncio.get_running_loop()
        started = loop.time()
        get = asyncio.ensure_future(leech.exchange.get(rid, tmp_path / "got.bin"))
        async with asyncio.timeout(5):
            await silent.dialed.wait()  # the leech dials the stale address
        await provider.discovery.add_provider(dht_key(rid), provider.host_port)
        async with asyncio.timeout(15):
            await get
        took = loop.time() - started
        assert (tmp_path / "got.bin").read_bytes() == data
        assert took < 4.0, took
