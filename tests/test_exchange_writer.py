"""PieceWriter: verified pieces land in place; with flushing on, writeback starts
along the way (fdatasync every flush_every bytes) rather than all at the end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2pnode.exchange.fetcher import PieceWriter
from p2pnode.exchange.manifest import build_manifest

PIECE = 256 * 1024


@pytest.mark.parametrize(("flush_every", "flushes"), [(0, 0), (2 * PIECE, 4)])
def test_pieces_written_and_flushed_along_the_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flush_every: int, flushes: int
) -> None:
    data = os.urandom(8 * PIECE)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    manifest, _ = build_manifest(src, piece_size=PIECE)
    root = tmp_path / "out.bin"
    root.write_bytes(b"\0" * len(data))
    synced: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    writer = PieceWriter(manifest, root, flush_every=flush_every)
    try:
        for index in reversed(range(manifest.piece_count)):
            piece = data[index * PIECE : (index + 1) * PIECE]
            assert not writer.verify_and_write(index, b"x" + piece[1:])  # corrupt: refused
            assert writer.verify_and_write(index, piece)
    finally:
        writer.close()
    assert root.read_bytes() == data
    assert len(synced) == flushes
