"""The store: SQLite index plus files, on tmp_path. No network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2pnode.errors import UsageError
from p2pnode.exchange.manifest import MIN_PIECE_SIZE, Manifest, build_manifest
from p2pnode.exchange.store import PieceSource, StaleError, Store, partial_path

PS = MIN_PIECE_SIZE


def _share(store: Store, path: Path) -> Manifest:
    manifest, listing = build_manifest(path, piece_size=PS)
    store.add_shared(manifest, listing.root, listing.stats)
    return manifest


def _write_piece(src: PieceSource, dst_root: Path, manifest: Manifest, index: int) -> None:
    """Write a piece as the fetcher does: segment by segment into the partial."""
    data = src.read(index)
    for seg in manifest.piece_segments(index):
        path = (
            dst_root
            if manifest.kind == "file"
            else dst_root.joinpath(*manifest.entries[seg.entry].path.split("/"))
        )
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data[seg.piece_offset : seg.piece_offset + seg.length], seg.file_offset)
        finally:
            os.close(fd)


def test_share_and_read_pieces(tmp_path: Path) -> None:
    data = os.urandom(PS * 3 + 5)
    (tmp_path / "f.bin").write_bytes(data)
    store = Store(tmp_path / "home")
    manifest = _share(store, tmp_path / "f.bin")
    res = store.get(manifest.resource_id)
    assert res is not None
    assert res.state == "shared" and res.served and res.pieces_done == 4
    assert res.root == (tmp_path / "f.bin").resolve()
    src = store.source(manifest.resource_id)
    assert src is not None
    for i in range(manifest.piece_count):
        assert src.read(i) == data[i * PS : (i + 1) * PS]
    # Same content shared again: same id, one row.
    again = _share(store, tmp_path / "f.bin")
    assert again.resource_id == manifest.resource_id
    assert len(store.resources()) == 1
    store.close()


def test_store_survives_reopen(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100)
    store = Store(tmp_path / "home")
    manifest = _share(store, tmp_path / "f")
    store.close()
    store = Store(tmp_path / "home")
    res = store.get(manifest.resource_id)
    assert res is not None and res.manifest == manifest and res.served
    store.close()


def test_stale_file_detected(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(PS * 2))
    store = Store(tmp_path / "home")
    manifest = _share(store, path)
    src = store.source(manifest.resource_id)
    assert src is not None
    src.read(0)
    # Same size, new content and mtime.
    with open(path, "r+b") as handle:
        handle.write(b"changed")
    os.utime(path, ns=(1, 1))
    with pytest.raises(StaleError, match="changed"):
        src.read(0)
    store.mark_stale(manifest.resource_id, "changed on disk")
    res = store.get(manifest.resource_id)
    assert res is not None and not res.served and res.stale == "changed on disk"
    # Sharing it again re-hashes: a new id; the old one stays unserved.
    new = _share(store, path)
    assert new.resource_id != manifest.resource_id
    path.unlink()
    src2 = store.source(new.resource_id)
    assert src2 is not None
    with pytest.raises(StaleError, match="gone"):
        src2.read(0)
    store.close()


def test_stale_truncated_file_in_folder(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "a").write_bytes(os.urandom(PS))
    (root / "b").write_bytes(os.urandom(PS))
    store = Store(tmp_path / "home")
    manifest = _share(store, root)
    src = store.source(manifest.resource_id)
    assert src is not None
    (root / "b").write_bytes(b"short")
    assert src.read(0)  # piece 0 lies in "a" only
    with pytest.raises(StaleError):
        src.read(1)
    store.close()


def test_download_records_resume_and_finish(tmp_path: Path) -> None:
    data = os.urandom(PS * 5 + 1)
    (tmp_path / "src.bin").write_bytes(data)
    seed = Store(tmp_path / "seed")
    manifest = _share(seed, tmp_path / "src.bin")
    src = seed.source(manifest.resource_id)
    assert src is not None
    rid = manifest.resource_id

    dest = tmp_path / "out" / "got.bin"
    store = Store(tmp_path / "leech")
    res = store.begin_download(manifest, dest)
    assert res.state == "partial" and not res.served and res.pieces_done == 0
    assert res.root == partial_path(dest.absolute())
    assert res.root.stat().st_size == len(data)
    for i in (0, 2, 5):
        _write_piece(src, res.root, manifest, i)
        store.record_piece(rid, i)
    store.close()  # "crash"

    store = Store(tmp_path / "leech")
    res = store.begin_download(manifest, dest)
    assert store.verified_pieces(rid) == {0, 2, 5}
    assert res.pieces_done == 3
    # A partial piece is readable (we could serve it), from the partial file.
    part = store.source(rid)
    assert part is not None and part.read(2) == data[2 * PS : 3 * PS]
    with pytest.raises(UsageError, match="not complete"):
        store.finish_download(rid)
    assert not dest.exists()
    for i in (1, 3, 4):
        _write_piece(src, res.root, manifest, i)
    store.record_pieces(rid, [1, 3, 4])
    store.finish_download(rid)
    assert dest.read_bytes() == data
    assert not res.root.exists()
    done = store.get(rid)
    assert done is not None and done.state == "complete" and done.served
    assert done.root == dest.absolute()
    assert store.verified_pieces(rid) == set()
    served = store.source(rid)
    assert served is not None and served.read(5) == data[5 * PS :]
    with pytest.raises(UsageError, match="already here"):
        store.begin_download(manifest, tmp_path / "other")
    seed.close()
    store.close()


def test_missing_partial_forgets_records(tmp_path: Path) -> None:
    (tmp_path / "s").write_bytes(os.urandom(PS * 2))
    manifest, _ = build_manifest(tmp_path / "s", piece_size=PS)
    store = Store(tmp_path / "home")
    res = store.begin_download(manifest, tmp_path / "d")
    store.record_pieces(manifest.resource_id, [0, 1])
    res.root.unlink()
    res = store.begin_download(manifest, tmp_path / "d")
    assert res.pieces_done == 0
    store.close()


def test_folder_download_builds_partial_dir(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    files = {"a/b/c.txt": os.urandom(PS + 3), "a/d": b"", "e": os.urandom(PS * 2)}
    for rel, blob in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(blob)
    seed = Store(tmp_path / "seed")
    manifest = _share(seed, root)
    src = seed.source(manifest.resource_id)
    assert src is not None
    store = Store(tmp_path / "leech")
    dest = tmp_path / "out"
    res = store.begin_download(manifest, dest)
    assert res.root.is_dir()
    for i in range(manifest.piece_count):
        _write_piece(src, res.root, manifest, i)
    store.record_pieces(manifest.resource_id, range(manifest.piece_count))
    dest.mkdir()
    with pytest.raises(UsageError, match="already exists"):
        store.finish_download(manifest.resource_id)
    store.finish_download(manifest.resource_id, force=True)
    for rel, blob in files.items():
        assert (dest / rel).read_bytes() == blob
    seed.close()
    store.close()


def test_unserve_and_remove(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    store = Store(tmp_path / "home")
    manifest = _share(store, tmp_path / "f")
    store.set_served(manifest.resource_id, False)
    assert store.served() == []
    store.remove(manifest.resource_id)
    assert store.get(manifest.resource_id) is None
    store.close()


def test_corrupt_database_is_a_usage_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "exchange.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(UsageError, match="resource store"):
        Store(home)


def test_deep_folders_created_without_recursion(tmp_path: Path) -> None:
    """Issue 11: folders are created in a loop, not by recursing once per level
    (Path.mkdir(parents=True) hit RecursionError at 1,500 levels). The manifest is
    built unchecked here, as if the decoder's depth limit were ever bypassed."""
    from blake3 import blake3

    from p2pnode.exchange.manifest import Entry

    levels = 1500
    rel = "/".join(["d"] * (levels - 1) + ["f"])
    manifest = Manifest("dir", "deep", MIN_PIECE_SIZE, (Entry(rel, 1, 0),), blake3(b"x").digest())
    store = Store(tmp_path / "home")
    res = store.begin_download(manifest, tmp_path / "deep")
    deepest = res.root.joinpath(*rel.split("/"))
    assert deepest.stat().st_size == 1
    store.close()
    # Cleaned up here, in a loop: pytest's own cleanup (shutil.rmtree) recurses.
    deepest.unlink()
    for folder in deepest.parents:
        if folder == tmp_path:
            break
        folder.rmdir()
