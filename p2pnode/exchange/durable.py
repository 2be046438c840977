"""Making a written file or folder durable before it is renamed into place.

One ``fsync`` per file, in a row, costs a journal commit each: 10,000 small files
took 2.7 s here. Measured on this ext4 VM (10,000 files of 2-5 KB just written,
best of 2: ``python benchmarks/bench_small_files.py --durability``):

    fsync each file in a row          2.6-2.7 s
    fsyncs from 4 / 16 / 64 threads   1.6 / 1.2-1.4 / 1.0-1.5 s (commits get batched)
    sync_file_range(WRITE) + syncfs   0.47-0.54 s (starting writeback early: no help)
    syncfs on the destination's fs    0.26-0.28 s

So a folder of more than a few files is made durable with ``syncfs`` (one call:
every dirty page and inode of that filesystem, the new folders' entries
included), a file resource or a folder of a few files with per-file ``fsync``
(syncfs would also flush unrelated data on the same filesystem). Where syncfs is
missing (not Linux), fsyncs run from a thread pool.

Errors: since Linux 5.8 ``syncfs`` reports writeback errors of the filesystem
that the fd has not seen yet (``errseq``, sampled when the fd is opened: an
error nobody has seen is still reported). The fd is opened on the partial
folder before its pieces are written (``TreeSync``), so a writeback error
during the download fails the sync and the destination is never created.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

from p2pnode.exchange.manifest import Manifest, file_paths

# Up to this many files, fsync them one by one (no unrelated data flushed).
FSYNC_MAX_FILES = 8
# Threads for concurrent fsyncs where syncfs is missing.
FSYNC_THREADS = 16


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int
    return cast(Callable[[int], int], func)


_SYNCFS = _load_syncfs()


def syncfs(fd: int) -> bool:
    """``syncfs(2)`` on the filesystem holding ``fd``; False if unavailable."""
    if _SYNCFS is None:
        return False
    if _SYNCFS(fd) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            return False
        raise OSError(err, os.strerror(err))
    return True


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TreeSync:
    """Opened on a partial download before its data is written; ``sync`` then
    makes the file or folder durable (see the module doc). ``root`` must exist."""

    def __init__(self, root: Path) -> None:
        where = root if root.is_dir() else root.parent
        self._fd: int | None = os.open(where, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))

    def sync(self, root: Path, manifest: Manifest) -> None:
        paths = file_paths(root, manifest)
        if len(paths) > FSYNC_MAX_FILES and self._fd is not None and syncfs(self._fd):
            return
        if len(paths) <= FSYNC_MAX_FILES:
            for path in paths:
                _fsync_path(path)
            return
        with ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="p2pnode-fsync") as pool:
            for _ in pool.map(_fsync_path, paths, chunksize=64):
                pass

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> TreeSync:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def sync_tree(root: Path, manifest: Manifest) -> None:
    """Make a written file or folder durable (an fd opened now: see ``TreeSync``)."""
    with TreeSync(root) as ts:
        ts.sync(root, manifest)
