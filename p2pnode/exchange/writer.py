"""Verified pieces into a download's partial files (blocking: runs in worker threads).

Where the filesystem allows it, the block-aligned middle of each piece segment is
written with ``O_DIRECT``: straight from the received piece (or, when it is not
page-aligned, from a per-thread aligned copy) to the disk, with no copy into
the page cache and no dirty pages left for the final fsync. On the 2-core VMs this
project is measured on, touching fresh page-cache memory costs ~2 CPU-s per GiB
(buffered writes of a new file), an O_DIRECT write ~0.05. The unaligned head and
tail of a segment (folder resources, the last piece) go through the page cache;
they never share a block with a direct write, so the two paths stay coherent. A
filesystem that refuses ``O_DIRECT`` (EINVAL at open or at the first write) gets
buffered writes for the rest of the download.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from p2pnode.exchange.manifest import ContentReader, Manifest, file_paths
from p2pnode.wire.buffers import buffer_address

# Alignment O_DIRECT needs (buffer address, file offset, length) on every Linux
# filesystem we expect; 4096 also covers 4Kn disks.
BLOCK = 4096
# Spans shorter than this go through the page cache: not worth a disk round trip.
DIRECT_MIN = 64 * 1024
O_DIRECT: int = getattr(os, "O_DIRECT", 0)


def _aligned(view: memoryview) -> bool:
    """Whether ``view`` starts on a BLOCK boundary (a piece received into a large
    frame body does: see p2pnode/wire/buffers.py), so O_DIRECT can take it as is."""
    if view.readonly or not view.c_contiguous or not len(view):
        return False
    return buffer_address(view) % BLOCK == 0


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class _Scratch(threading.local):
    """A page-aligned buffer per thread (anonymous mmap): O_DIRECT's source."""

    buf: mmap.mmap | None = None

    def get(self, size: int) -> memoryview:
        if self.buf is None or len(self.buf) < size:
            if self.buf is not None:
                self.buf.close()
            self.buf = mmap.mmap(-1, -(-size // BLOCK) * BLOCK)
        return memoryview(self.buf)


class PieceWriter:
    """Verifies pieces and writes them into the partial file(s). Thread-safe.

    ``close`` waits for writes in progress (a cancelled request's thread may still
    be writing) before closing the files, so no write lands on a reused fd.
    ``flush_every`` (bytes, 0 = never) starts writeback of page-cached bytes along
    the way, so the final fsync has little left to do.
    """

    MAX_OPEN = 64

    def __init__(
        self, manifest: Manifest, root: Path, *, direct: bool = True, flush_every: int = 0
    ) -> None:
        self._manifest = manifest
        self._flush_every = flush_every
        self._paths = file_paths(root, manifest)
        self._direct = direct and O_DIRECT != 0
        self._fds: dict[tuple[int, bool], int] = {}
        self._scratch = _Scratch()
        self._cond = threading.Condition()
        self._active = 0
        self._closed = False
        self._unflushed = 0
        self.direct_bytes = 0  # written with O_DIRECT (for tests and figures)
        self.staged_bytes = 0  # of those, copied to an aligned buffer first

    @property
    def direct(self) -> bool:
        """Whether O_DIRECT is (still) in use."""
        return self._direct

    def verify_and_write(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """False if ``data`` is not piece ``index``; OSError if the disk refuses."""
        if not self._manifest.verify_piece(index, data):
            return False
        with self._cond:
            if self._closed:
                raise OSError(errno.EBADF, "download closed")
            self._active += 1
        try:
            view = memoryview(data)
            for seg in self._manifest.piece_segments(index):
                chunk = view[seg.piece_offset : seg.piece_offset + seg.length]
                self._write_segment(seg.entry, seg.file_offset, chunk)
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            while self._active:
                self._cond.wait()
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    # -- internals -------------------------------------------------------------

    def _write_segment(self, entry: int, offset: int, chunk: memoryview) -> None:
        head = min(len(chunk), -offset % BLOCK)
        body = (len(chunk) - head) // BLOCK * BLOCK
        if (
            self._direct
            and body >= DIRECT_MIN
            and self._write_direct(entry, offset + head, chunk[head : head + body])
        ):
            self._write_buffered(entry, offset, chunk[:head])
            self._write_buffered(entry, offset + head + body, chunk[head + body :])
            return
        self._write_buffered(entry, offset, chunk)

    def _write_direct(self, entry: int, offset: int, chunk: memoryview) -> bool:
        """Write an aligned span with O_DIRECT; False if the filesystem refuses it."""
        try:
            fd, owned = self._fd(entry, direct=True)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._direct = False
            return False
        try:
            staged = not _aligned(chunk)
            if staged:
                src = self._scratch.get(len(chunk))[: len(chunk)]
                src[:] = chunk
            else:
                src = chunk
            _pwrite_all(fd, src, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._direct = False  # nothing was written: the caller writes it buffered
            return False
        finally:
            if owned:
                os.close(fd)
        with self._cond:
            self.direct_bytes += len(chunk)
            self.staged_bytes += len(chunk) if staged else 0
        return True

    def _write_buffered(self, entry: int, offset: int, chunk: memoryview) -> None:
        if not chunk:
            return
        fd, owned = self._fd(entry, direct=False)
        try:
            _pwrite_all(fd, chunk, offset)
            self._flush_some(fd, len(chunk))
        finally:
            if owned:
                os.close(fd)

    def _flush_some(self, fd: int, written: int) -> None:
        # Flushes one file; a folder's other files are left to the final fsync.
        if not self._flush_every:
            return
        with self._cond:
            self._unflushed += written
            if self._unflushed < self._flush_every:
                return
            self._unflushed = 0
        os.fdatasync(fd)

    def _fd(self, entry: int, *, direct: bool) -> tuple[int, bool]:
        """An fd for the entry and whether the caller must close it."""
        key = (entry, direct)
        with self._cond:
            fd = self._fds.get(key)
            if fd is not None:
                return fd, False
            fd = os.open(self._paths[entry], os.O_WRONLY | (O_DIRECT if direct else 0))
            if len(self._fds) < self.MAX_OPEN:
                self._fds[key] = fd
                return fd, False
            return fd, True


def recheck_pieces(manifest: Manifest, root: Path, indices: Sequence[int]) -> list[int]:
    """Re-hash recorded pieces of a partial; returns those that no longer verify."""
    bad: list[int] = []
    buf = bytearray(manifest.piece_size)
    view = memoryview(buf)
    try:
        with ContentReader(file_paths(root, manifest), manifest) as reader:
            for index in sorted(indices):
                length = manifest.piece_length(index)
                try:
                    reader.read_into(index * manifest.piece_size, view[:length])
                except OSError:
                    bad.append(index)
                    continue
                if manifest.hash_piece(view[:length]) != manifest.piece_hash(index):
                    bad.append(index)
    except OSError:
        return list(indices)
    return bad
