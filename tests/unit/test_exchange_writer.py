"""PieceWriter: verified pieces land in place, through O_DIRECT for aligned spans
where the filesystem allows it and through the page cache otherwise; with
flushing on, writeback of page-cached bytes starts along the way (fdatasync every
flush_every bytes) rather than all at the end."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from p2pnode.exchange import writer as writer_module
from p2pnode.exchange.manifest import Manifest, build_manifest, file_paths
from p2pnode.exchange.writer import BLOCK, PieceWriter

PIECE = 256 * 1024


def _write_all(manifest: Manifest, root: Path, data: bytes, writer: PieceWriter) -> None:
    order = list(range(manifest.piece_count))
    random.Random(1).shuffle(order)
    try:
        for index in order:
            piece = data[index * manifest.piece_size : (index + 1) * manifest.piece_size]
            assert not writer.verify_and_write(
                index, bytes([piece[0] ^ 0xFF]) + piece[1:]
            )  # corrupt: refused
            assert writer.verify_and_write(index, piece)
    finally:
        writer.close()


def _single_file(tmp_path: Path, pieces: int) -> tuple[bytes, Manifest, Path]:
    """Random content of ``pieces`` pieces, its manifest, and an empty partial file."""
    data = os.urandom(pieces * PIECE)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    manifest, _ = build_manifest(src, piece_size=PIECE)
    root = tmp_path / "out.bin"
    _prepare(root, manifest)
    return data, manifest, root


def _prepare(root: Path, manifest: Manifest) -> None:
    for path, entry in zip(file_paths(root, manifest), manifest.entries, strict=True):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(entry.size)


@pytest.mark.parametrize(("direct", "flush_every", "flushes"), [
    (False, 0, 0), (False, 2 * PIECE, 4), (True, 2 * PIECE, 0),
])  # fmt: skip
def test_pieces_written_and_flushed_along_the_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool, flush_every: int, flushes: int
) -> None:
    data, manifest, root = _single_file(tmp_path, 8)
    synced: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    writer = PieceWriter(manifest, root, direct=direct, flush_every=flush_every)
    _write_all(manifest, root, data, writer)
    assert root.read_bytes() == data
    assert len(synced) == flushes
    assert writer.direct_bytes == (len(data) if direct else 0)  # /tmp here is ext4


def test_page_aligned_pieces_go_to_disk_without_a_copy(tmp_path: Path) -> None:
    """A piece in page-aligned memory (as received: see test_net_session) is written
    with O_DIRECT straight from there; one in ordinary memory is staged first."""
    import mmap

    data, manifest, root = _single_file(tmp_path, 4)
    writer = PieceWriter(manifest, root)
    try:
        for index in range(manifest.piece_count):
            piece = data[index * PIECE : (index + 1) * PIECE]
            if index % 2:
                assert writer.verify_and_write(index, piece)  # bytes: staged
                continue
            aligned = mmap.mmap(-1, PIECE)
            aligned[:] = piece
            assert writer.verify_and_write(index, memoryview(aligned))
    finally:
        writer.close()
    assert root.read_bytes() == data
    assert writer.direct_bytes == len(data)
    assert writer.staged_bytes == len(data) // 2


def test_folder_with_unaligned_files_round_trips(tmp_path: Path) -> None:
    """Files start and end mid-piece and mid-block: heads and tails go through the
    page cache, aligned middles through O_DIRECT, and every byte lands right."""
    src = tmp_path / "tree"
    sizes = {"a.bin": 3 * PIECE + 17, "sub/b.bin": BLOCK - 1, "sub/c.bin": 2 * PIECE + 5000, "d": 1}
    contents: dict[str, bytes] = {}
    for name, size in sizes.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        contents[name] = os.urandom(size)
        (src / name).write_bytes(contents[name])
    manifest, _ = build_manifest(src, piece_size=PIECE)
    data = b"".join(contents[e.path] for e in manifest.entries)
    root = tmp_path / "out"
    _prepare(root, manifest)
    writer = PieceWriter(manifest, root)
    _write_all(manifest, root, data, writer)
    for name, blob in contents.items():
        assert (root / name).read_bytes() == blob, name
    assert 0 < writer.direct_bytes < len(data)


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_filesystem_refusing_o_direct_falls_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused_at: str
) -> None:
    """Some filesystems (FUSE, older tmpfs) answer O_DIRECT with EINVAL, at open or
    at the first write; nothing is lost and the rest is written buffered."""
    data, manifest, root = _single_file(tmp_path, 4)
    direct_fds: set[int] = set()
    real_open, real_pwrite = os.open, os.pwrite

    def refusing_open(path: str, flags: int, *args: int) -> int:
        if flags & writer_module.O_DIRECT and refused_at == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *args)
        if flags & writer_module.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refusing_pwrite(fd: int, data: memoryview, offset: int) -> int:
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    writer = PieceWriter(manifest, root)
    _write_all(manifest, root, data, writer)
    assert not writer.direct
    assert writer.direct_bytes == 0
    assert root.read_bytes() == data


def test_disk_errors_other_than_einval_are_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, manifest, root = _single_file(tmp_path, 2)

    def full(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    writer = PieceWriter(manifest, root)
    with pytest.raises(OSError, match="No space"):
        writer.verify_and_write(0, data[:PIECE])
    writer.close()
    assert writer.direct  # a full disk is not a reason to give up O_DIRECT
