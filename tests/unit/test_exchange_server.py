"""The piece server against a real store, no network: answers and error codes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pnode.exchange.manifest import MIN_PIECE_SIZE, build_manifest
from p2pnode.exchange.messages import (
    GetHave,
    GetManifest,
    GetPiece,
    Have,
    ManifestData,
    PieceData,
    bitfield_to_set,
)
from p2pnode.exchange.server import PieceServer
from p2pnode.exchange.store import Store
from p2pnode.wire.messages import ErrorCode, ErrorReply, Ping

PS = MIN_PIECE_SIZE


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "home")
    yield s
    s.close()


async def test_answers_from_a_shared_file(store: Store, tmp_path: Path) -> None:
    data = os.urandom(PS * 2 + 10)
    (tmp_path / "f").write_bytes(data)
    manifest, listing = build_manifest(tmp_path / "f", piece_size=PS)
    store.add_shared(manifest, listing.root, listing.stats)
    stale: list[str] = []
    server = PieceServer(store, None, on_stale=lambda rid, why: stale.append(why))
    rid = manifest.resource_id
    reply = await server.handle(b"x" * 20, GetManifest(rid))
    assert isinstance(reply, ManifestData) and reply.manifest == manifest.canonical
    have = await server.handle(b"x" * 20, GetHave(rid))
    assert isinstance(have, Have) and have.complete
    piece = await server.handle(b"x" * 20, GetPiece(rid, 2))
    assert isinstance(piece, PieceData) and piece.data == data[2 * PS :]
    out = await server.handle(b"x" * 20, GetPiece(rid, 3))
    assert isinstance(out, ErrorReply) and out.code == ErrorCode.BAD_REQUEST
    unknown = await server.handle(b"x" * 20, GetPiece(bytes(32), 0))
    assert isinstance(unknown, ErrorReply) and unknown.code == ErrorCode.NOT_FOUND
    other = await server.handle(b"x" * 20, Ping())
    assert isinstance(other, ErrorReply) and other.code == ErrorCode.UNSUPPORTED
    # Unserved: not found.
    store.set_served(rid, False)
    gone = await server.handle(b"x" * 20, GetManifest(rid))
    assert isinstance(gone, ErrorReply) and gone.code == ErrorCode.NOT_FOUND
    # Served again, then changed on disk: stale, not served.
    store.set_served(rid, True)
    (tmp_path / "f").write_bytes(b"changed")
    changed = await server.handle(b"x" * 20, GetPiece(rid, 0))
    assert isinstance(changed, ErrorReply) and changed.code == ErrorCode.NOT_FOUND
    assert stale and "changed" in stale[0]


async def test_partial_download_serves_verified_pieces_only(store: Store, tmp_path: Path) -> None:
    data = os.urandom(PS * 3)
    (tmp_path / "f").write_bytes(data)
    manifest, _ = build_manifest(tmp_path / "f", piece_size=PS)
    res = store.begin_download(manifest, tmp_path / "dest")
    fd = os.open(res.root, os.O_WRONLY)
    os.pwrite(fd, data[PS : 2 * PS], PS)
    os.close(fd)
    store.record_piece(manifest.resource_id, 1)
    server = PieceServer(store, None, on_stale=lambda rid, why: None)
    rid = manifest.resource_id
    have = await server.handle(b"x" * 20, GetHave(rid))
    assert isinstance(have, Have) and not have.complete
    assert bitfield_to_set(have.bitfield, 3) == {1}
    ok = await server.handle(b"x" * 20, GetPiece(rid, 1))
    assert isinstance(ok, PieceData) and ok.data == data[PS : 2 * PS]
    missing = await server.handle(b"x" * 20, GetPiece(rid, 0))
    assert isinstance(missing, ErrorReply) and missing.code == ErrorCode.NOT_FOUND


async def test_queue_is_bounded_but_fair(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import threading

    from p2pnode.exchange.store import PieceSource

    (tmp_path / "f").write_bytes(os.urandom(PS * 4))
    manifest, listing = build_manifest(tmp_path / "f", piece_size=PS)
    store.add_shared(manifest, listing.root, listing.stats)
    rid = manifest.resource_id
    gate = threading.Event()
    real = PieceSource.read

    def gated(self: PieceSource, index: int) -> bytes:
        gate.wait(10)
        return real(self, index)

    monkeypatch.setattr(PieceSource, "read", gated)
    server = PieceServer(
        store,
        None,
        on_stale=lambda rid, why: None,
        max_reads=1,
        max_queued=1,
        min_per_peer=2,
        cached_reads=False,  # the queue is for disk reads: make every read one
    )
    flooder, honest = b"f" * 20, b"h" * 20
    flood = [asyncio.ensure_future(server.handle(flooder, GetPiece(rid, i))) for i in range(4)]
    await asyncio.sleep(0)  # let them queue (no I/O happens before the gate opens)
    late = asyncio.ensure_future(server.handle(honest, GetPiece(rid, 3)))
    await asyncio.sleep(0)
    # Over the cap: the flooder keeps its 2 per-peer slots, the rest is refused...
    refused = [t.result() for t in flood if t.done()]
    assert len(refused) == 2
    assert all(isinstance(r, ErrorReply) and r.code == ErrorCode.BUSY for r in refused)
    # ...while the honest peer still gets in.
    assert not late.done()
    gate.set()
    reply = await late
    assert isinstance(reply, PieceData)
    stats = server.stats()
    assert stats["rejected_busy"] == 2 and stats["pieces_served"] >= 1
    await asyncio.gather(*flood)


def _drop_page_cache(path: Path, probe_offset: int) -> bool:
    """Ask the kernel to drop the file's pages; True if they really left the page
    cache (a page at ``probe_offset`` is checked). Some filesystems and memory
    cgroups keep them (CI saw this): then the cold path cannot be reached here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        for _ in range(5):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            try:
                os.preadv(fd, [bytearray(4096)], probe_offset, os.RWF_NOWAIT)
            except BlockingIOError:
                return True
        return False
    finally:
        os.close(fd)


async def test_cached_pieces_are_read_on_the_loop_others_in_a_thread(
    store: Store, tmp_path: Path
) -> None:
    """A piece in the page cache costs no thread hand-off; once the kernel drops
    the file's pages (fadvise DONTNEED after fsync), the read goes to the executor
    and still serves the right bytes."""
    from concurrent.futures import ThreadPoolExecutor

    data = os.urandom(PS * 4)
    path = tmp_path / "f"
    path.write_bytes(data)
    manifest, listing = build_manifest(path, piece_size=PS)
    store.add_shared(manifest, listing.root, listing.stats)
    rid = manifest.resource_id

    class Counting(ThreadPoolExecutor):
        submitted = 0

        def submit(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            Counting.submitted += 1
            return super().submit(*args, **kwargs)

    with Counting(1) as pool:
        server = PieceServer(store, pool, on_stale=lambda rid, why: None)
        hot = await server.handle(b"x" * 20, GetPiece(rid, 1))
        assert isinstance(hot, PieceData) and hot.data == data[PS : 2 * PS]
        assert Counting.submitted == 0
        # probed past piece 2: a probe's readahead goes forward, never back
        if not _drop_page_cache(path, probe_offset=3 * PS):
            pytest.skip("the kernel kept the file's pages cached after fadvise DONTNEED")
        cold = await server.handle(b"x" * 20, GetPiece(rid, 2))
        assert isinstance(cold, PieceData) and cold.data == data[2 * PS : 3 * PS]
        assert Counting.submitted == 1


async def test_a_piece_over_many_files_is_read_in_a_thread(store: Store, tmp_path: Path) -> None:
    """Each file of a piece is opened and checked: a piece spread over many small
    files would stall the event loop, so it goes to the I/O threads, cached or not."""
    from concurrent.futures import ThreadPoolExecutor

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        (folder / f"f{i:02}").write_bytes(os.urandom(1000))
    manifest, listing = build_manifest(folder, piece_size=PS)
    store.add_shared(manifest, listing.root, listing.stats)
    assert len(manifest.piece_segments(0)) > 4
    submitted = 0

    class Counting(ThreadPoolExecutor):
        def submit(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal submitted
            submitted += 1
            return super().submit(*args, **kwargs)

    with Counting(1) as pool:
        server = PieceServer(store, pool, on_stale=lambda rid, why: None)
        reply = await server.handle(b"x" * 20, GetPiece(manifest.resource_id, 0))
    assert isinstance(reply, PieceData) and len(reply.data) == manifest.piece_length(0)
    assert submitted == 1
