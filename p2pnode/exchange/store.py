"""The resource store: an SQLite index in the node's home, plus files on disk.

Rules:

- One row per resource id. ``state`` is ``shared`` (a local file or folder served
  in place, never copied), ``partial`` (a download not finished yet) or
  ``complete`` (a finished download, served from its destination). ``served``
  says whether the node answers for it and announces it.
- For shared and complete resources the size and ``mtime_ns`` of every file are
  recorded. ``PieceSource.read`` checks them before every read; on a mismatch it
  raises ``StaleError`` and the caller stops serving the resource
  (``mark_stale``), rather than serve a piece that no longer matches its hash.
- A download writes into ``<dest>.p2pnode-partial`` (a file, or a folder for a
  folder resource) next to its destination, so the final rename is atomic and on
  the same file system. Each verified piece is recorded (committed) as it is
  written; after a crash the download resumes from the recorded pieces. The
  destination appears only when every piece is verified (``finish_download``).
- Crash safety without an fsync per piece or per file: a piece is recorded once
  written, not once on disk, so a record is only a hint until the data is
  durable. A resumed download re-hashes every recorded piece from disk before
  trusting it (``Fetcher._recheck``): a piece lost in a crash is fetched again.
  The partial becomes the destination only after it is made durable
  (exchange/durable.py: one ``syncfs`` for a folder, ``fsync`` for a file) and
  renamed, and the parent folder is then fsynced: a crash at any point leaves
  either the old state or the whole verified resource, never a half one.
- Only the event-loop thread touches the database. ``PieceSource`` objects are
  immutable snapshots that worker threads use to read pieces.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from p2pnode.errors import StaleError, StorageError, UsageError
from p2pnode.exchange.durable import TreeSync, sync_tree
from p2pnode.exchange.manifest import (
    FileStat,
    Manifest,
    Segment,
    empty_dir_paths,
    file_paths,
    resource_id_to_str,
)
from p2pnode.wire.buffers import BufferPool


class ResourceState(StrEnum):
    SHARED = "shared"  # a local file or folder, served in place
    COMPLETE = "complete"  # downloaded and verified
    PARTIAL = "partial"  # a download in progress


DB_NAME = "exchange.sqlite3"
PARTIAL_SUFFIX = ".p2pnode-partial"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    id BLOB PRIMARY KEY,
    manifest BLOB NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('shared', 'complete', 'partial')),
    served INTEGER NOT NULL,
    root TEXT NOT NULL,
    dest TEXT,
    stale TEXT,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    resource_id BLOB NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    PRIMARY KEY (resource_id, idx)
);
CREATE TABLE IF NOT EXISTS pieces (
    resource_id BLOB NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    PRIMARY KEY (resource_id, idx)
) WITHOUT ROWID;
"""

# Buffers for pieces read to be served (a piece is at most 2 MiB).
_READ_POOL = BufferPool(keep=16)
# preadv flag: fail with EAGAIN instead of waiting for the disk (Linux only).
_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
# read_cached only takes pieces spread over at most this many files.
_CACHED_MAX_FILES = 4


def storage_error(exc: OSError, where: Path) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(
            f"disk full writing {str(where)!r}; verified pieces are kept, "
            "free some space and run the same get again to resume"
        )
    return StorageError(f"cannot write {str(where)!r}: {exc.strerror or exc}")


def partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + PARTIAL_SUFFIX)


@dataclass(frozen=True)
class PieceSource:
    """What a worker thread needs to read a resource's pieces."""

    resource_id: bytes
    manifest: Manifest
    paths: tuple[str, ...]
    stats: tuple[FileStat, ...] | None  # None: our own partial files, not checked

    @property
    def partial(self) -> bool:
        return self.stats is None

    def read(self, index: int) -> memoryview:
        """Read piece ``index`` (blocking). StaleError if a file changed since hashing.

        Each file is opened by path and checked with ``fstat`` before it is read, so
        a file replaced or rewritten since sharing is noticed, not served. The piece
        lands in a pooled buffer (``os.preadv``), reused only once the returned view
        and every view of it are gone.
        """
        view = self._read(index, self.manifest.piece_segments(index), 0)
        assert view is not None
        return view

    def read_cached(self, index: int) -> memoryview | None:
        """:meth:`read`, but only if the piece is all in the page cache: None as soon
        as the disk would be needed (``RWF_NOWAIT``), or where that flag is not
        supported. Cheap enough for the event loop: it saves two thread hand-offs a
        piece, which cost more than the copy on a busy machine."""
        segments = self.manifest.piece_segments(index)
        if not _NOWAIT or len(segments) > _CACHED_MAX_FILES:
            return None  # (each file is opened and checked: many would stall the loop)
        try:
            return self._read(index, segments, _NOWAIT)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL):
                return None
            raise

    def _read(self, index: int, segments: list[Segment], flags: int) -> memoryview | None:
        length = self.manifest.piece_length(index)
        view = _READ_POOL.view(length)
        for seg in segments:
            path = self.paths[seg.entry]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                if self.stats is not None:
                    raise StaleError(f"{str(path)!r} is gone: {exc.strerror}") from None
                raise
            try:
                if self.stats is not None:
                    want = self.stats[seg.entry]
                    st = os.fstat(fd)
                    if st.st_size != want.size or st.st_mtime_ns != want.mtime_ns:
                        raise StaleError(f"{str(path)!r} changed on disk since it was shared")
                part = view[seg.piece_offset : seg.piece_offset + seg.length]
                done = 0
                while done < seg.length:
                    n = os.preadv(fd, [part[done:]], seg.file_offset + done, flags)
                    if n <= 0:
                        if self.stats is not None:
                            raise StaleError(f"{str(path)!r} is shorter than when shared")
                        raise OSError(f"{str(path)!r} is shorter than expected")
                    if flags and n < seg.length - done:
                        return None  # partly cached: the rest would wait for the disk
                    done += n
            finally:
                os.close(fd)
        return view


@dataclass(frozen=True)
class StoredResource:
    resource_id: bytes
    manifest: Manifest
    state: ResourceState
    served: bool
    root: Path  # where the content is now (shared path, destination, or partial)
    dest: Path | None  # downloads: where it goes / went
    stale: str | None
    pieces_done: int

    @property
    def id_str(self) -> str:
        return resource_id_to_str(self.resource_id)


class Store:
    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.path = home / DB_NAME
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise UsageError(f"cannot open the resource store {str(self.path)!r}: {exc}") from None
        self._manifests: dict[bytes, Manifest] = {}
        self._verified: dict[bytes, set[int]] = {}
        self._sources: dict[bytes, PieceSource] = {}
        self._claimed: set[Path] = set()

    def close(self) -> None:
        self._db.close()

    # -- reading ------------------------------------------------------------------

    def _manifest(self, rid: bytes, blob: bytes) -> Manifest:
        manifest = self._manifests.get(rid)
        if manifest is None:
            manifest = Manifest.decode(blob)
            self._manifests[rid] = manifest
        return manifest

    def _row_to_resource(self, row: tuple[object, ...]) -> StoredResource:
        rid, blob, state, served, root, dest, stale = row
        assert isinstance(rid, bytes) and isinstance(blob, bytes)
        manifest = self._manifest(rid, blob)
        state = ResourceState(str(state))
        partial = state is ResourceState.PARTIAL
        done = len(self.verified_pieces(rid)) if partial else manifest.piece_count
        return StoredResource(
            resource_id=rid,
            manifest=manifest,
            state=state,
            served=bool(served),
            root=Path(str(root)),
            dest=Path(str(dest)) if dest is not None else None,
            stale=None if stale is None else str(stale),
            pieces_done=done,
        )

    _COLUMNS = "id, manifest, state, served, root, dest, stale"

    def get(self, rid: bytes) -> StoredResource | None:
        row = self._db.execute(
            f"SELECT {self._COLUMNS} FROM resources WHERE id = ?", (rid,)
        ).fetchone()
        return None if row is None else self._row_to_resource(row)

    def resources(self) -> list[StoredResource]:
        rows = self._db.execute(f"SELECT {self._COLUMNS} FROM resources ORDER BY added").fetchall()
        return [self._row_to_resource(row) for row in rows]

    def served(self) -> list[StoredResource]:
        return [r for r in self.resources() if r.served]

    def manifest_bytes(self, rid: bytes) -> bytes | None:
        row = self._db.execute("SELECT manifest FROM resources WHERE id = ?", (rid,)).fetchone()
        return None if row is None else bytes(row[0])

    def verified_pieces(self, rid: bytes) -> set[int]:
        cached = self._verified.get(rid)
        if cached is None:
            rows = self._db.execute("SELECT idx FROM pieces WHERE resource_id = ?", (rid,))
            cached = {int(r[0]) for r in rows}
            self._verified[rid] = cached
        return cached

    def _stats(self, rid: bytes) -> tuple[FileStat, ...]:
        manifest = self._manifests[rid]
        rows = self._db.execute(
            "SELECT idx, size, mtime_ns FROM files WHERE resource_id = ? ORDER BY idx", (rid,)
        ).fetchall()
        return tuple(
            FileStat(manifest.entries[int(idx)].path, int(size), int(mtime))
            for idx, size, mtime in rows
        )

    def source(self, rid: bytes) -> PieceSource | None:
        """A reader for a resource this node serves or is downloading, else None.

        For a download the caller must check ``verified_pieces`` before reading.
        """
        cached = self._sources.get(rid)
        if cached is not None:
            return cached
        res = self.get(rid)
        if res is None or not (res.served or res.state is ResourceState.PARTIAL):
            return None
        paths = tuple(file_paths(res.root, res.manifest))
        stats = None if res.state is ResourceState.PARTIAL else self._stats(rid)
        src = PieceSource(rid, res.manifest, paths, stats)
        self._sources[rid] = src
        return src

    # -- sharing ------------------------------------------------------------------

    def add_shared(self, manifest: Manifest, root: Path, stats: Iterable[FileStat]) -> None:
        """Record a local file or folder served in place (same content: same row)."""
        rid = manifest.resource_id
        existing = self.get(rid)
        if existing is not None and existing.state is ResourceState.PARTIAL:
            # We were downloading what we now share: the local copy wins.
            self._discard_partial(existing)
        self._put(rid, manifest, ResourceState.SHARED, root, None, stats)

    def _put(
        self,
        rid: bytes,
        manifest: Manifest,
        state: ResourceState,
        root: Path,
        dest: Path | None,
        stats: Iterable[FileStat],
    ) -> None:
        stats = list(stats)
        with self._transaction():
            self._db.execute("DELETE FROM files WHERE resource_id = ?", (rid,))
            self._db.execute("DELETE FROM pieces WHERE resource_id = ?", (rid,))
            self._db.execute(
                "INSERT INTO resources (id, manifest, name, size, state, served, root, dest,"
                " stale, added) VALUES (?, ?, ?, ?, ?, 1, ?, ?, NULL, ?)"
                " ON CONFLICT(id) DO UPDATE SET state = excluded.state, served = 1,"
                " root = excluded.root, dest = excluded.dest, stale = NULL",
                (
                    rid,
                    manifest.canonical,
                    manifest.name,
                    manifest.total_size,
                    state,
                    str(root),
                    None if dest is None else str(dest),
                    time.time(),
                ),
            )
            self._db.executemany(
                "INSERT INTO files (resource_id, idx, size, mtime_ns) VALUES (?, ?, ?, ?)",
                [(rid, i, s.size, s.mtime_ns) for i, s in enumerate(stats)],
            )
        self._manifests[rid] = manifest
        self._verified.pop(rid, None)
        self._sources.pop(rid, None)

    def set_served(self, rid: bytes, served: bool) -> None:
        self._db.execute("UPDATE resources SET served = ? WHERE id = ?", (int(served), rid))
        self._sources.pop(rid, None)

    def mark_stale(self, rid: bytes, reason: str) -> None:
        self._db.execute("UPDATE resources SET served = 0, stale = ? WHERE id = ?", (reason, rid))
        self._sources.pop(rid, None)

    def remove(self, rid: bytes) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM resources WHERE id = ?", (rid,))
        self._manifests.pop(rid, None)
        self._verified.pop(rid, None)
        self._sources.pop(rid, None)

    # -- downloading ----------------------------------------------------------------

    def claim_dest(self, dest: Path) -> None:
        """Reserve a destination for one running download (UsageError if taken)."""
        dest = dest.absolute()
        if dest in self._claimed:
            raise UsageError(f"another download is writing to {str(dest)!r}")
        self._claimed.add(dest)

    def release_dest(self, dest: Path) -> None:
        self._claimed.discard(dest.absolute())

    def begin_download(
        self, manifest: Manifest, dest: Path, *, lay_out: bool = True
    ) -> StoredResource:
        """Start or resume a download to ``dest``; lays out the partial file(s) unless
        ``lay_out`` is False (then the caller runs ``lay_out_partial`` off the event
        loop and forgets the recorded pieces if it says some were lost)."""
        rid = manifest.resource_id
        dest = dest.absolute()
        target = partial_path(dest)
        existing = self.get(rid)
        if existing is not None and existing.state is not ResourceState.PARTIAL:
            raise UsageError(
                f"{existing.id_str} is already here ({existing.state}) at {str(existing.root)!r}"
            )
        if existing is not None and existing.root != target:
            try:
                if existing.root.exists() and not target.exists():
                    os.rename(existing.root, target)
                else:
                    self._discard_partial(existing)
            except OSError:
                self._discard_partial(existing)
            existing = None
        if existing is None:
            self._put(rid, manifest, ResourceState.PARTIAL, target, dest, ())
            self.set_served(rid, False)
        else:
            self._db.execute("UPDATE resources SET dest = ? WHERE id = ?", (str(dest), rid))
        self._sources.pop(rid, None)
        if lay_out and lay_out_partial(manifest, target):
            self.forget_pieces(rid, self.verified_pieces(rid))
        res = self.get(rid)
        assert res is not None
        return res

    def record_piece(self, rid: bytes, index: int) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO pieces (resource_id, idx) VALUES (?, ?)", (rid, index)
        )
        self.verified_pieces(rid).add(index)

    def record_pieces(self, rid: bytes, indices: Iterable[int]) -> None:
        indices = list(indices)
        if not indices:
            return
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO pieces (resource_id, idx) VALUES (?, ?)",
                [(rid, i) for i in indices],
            )
        self.verified_pieces(rid).update(indices)

    def forget_pieces(self, rid: bytes, indices: Iterable[int]) -> None:
        indices = list(indices)
        with self._transaction():
            self._db.executemany(
                "DELETE FROM pieces WHERE resource_id = ? AND idx = ?", [(rid, i) for i in indices]
            )
        self.verified_pieces(rid).difference_update(indices)

    def finish_download(self, rid: bytes, *, force: bool = False, fsync: bool = True) -> None:
        """Move a fully verified partial into place and serve it from there."""
        res = self.get(rid)
        if res is None or res.state is not ResourceState.PARTIAL or res.dest is None:
            raise UsageError("no such download in progress")
        if res.pieces_done != res.manifest.piece_count:
            raise UsageError("download is not complete")
        dest = res.dest
        try:
            if fsync:
                fsync_tree(res.root, res.manifest)
            _move_into_place(res.root, dest, res.manifest, force=force)
            stats = [
                FileStat(e.path, st.st_size, st.st_mtime_ns)
                for e, st in zip(
                    res.manifest.entries,
                    (os.stat(p) for p in file_paths(dest, res.manifest)),
                    strict=True,
                )
            ]
        except FileExistsError:
            raise UsageError(
                f"{str(dest)!r} already exists (use force to replace it); "
                f"the verified download waits at {str(res.root)!r}"
            ) from None
        except OSError as exc:
            raise storage_error(exc, dest) from None
        self._put(rid, res.manifest, ResourceState.COMPLETE, dest, dest, stats)

    def _discard_partial(self, res: StoredResource) -> None:
        _remove_path(res.root)
        self.remove(res.resource_id)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


# --- files of a download --------------------------------------------------------


def _remove_path(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _layout_partial(manifest: Manifest, target: Path) -> bool:
    """Create the partial file(s) at their full sizes (sparse).

    Returns True if something recorded may be lost (a file missing or of the wrong
    size), in which case the recorded pieces must not be trusted.
    """
    lost = False
    paths = file_paths(target, manifest)
    # A new partial folder holds nothing yet: its files are created without first
    # looking for them (one lstat per file saved), and empty ones left at size 0.
    fresh = manifest.kind == "dir" and not os.path.lexists(target)
    if manifest.kind == "dir":
        if target.exists() and not target.is_dir():
            target.unlink()
            lost = True
        target.mkdir(parents=True, exist_ok=True)  # a local path, not the manifest's
    else:
        if target.is_dir():
            shutil.rmtree(target)
            lost = True
        target.parent.mkdir(parents=True, exist_ok=True)
    _make_dirs(target, _parent_dirs(manifest))
    if fresh:
        for entry, path in zip(manifest.entries, paths, strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if entry.size:
                    os.ftruncate(fd, entry.size)
            finally:
                os.close(fd)
        _make_empty_dirs(manifest, target)
        return manifest.piece_count > 0
    for entry, path in zip(manifest.entries, paths, strict=True):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            if st is not None:
                lost = True
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            else:
                lost = lost or manifest.piece_count > 0
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.ftruncate(fd, entry.size)
            finally:
                os.close(fd)
    _make_empty_dirs(manifest, target)
    return lost


def _make_empty_dirs(manifest: Manifest, target: Path) -> None:
    """Create a folder resource's empty folders under ``target`` (real folders:
    anything else in their place, a link included, is replaced)."""
    for path in empty_dir_paths(target, manifest):
        try:
            st = path.lstat()
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            path.unlink()
    _make_dirs(target, manifest.empty_dirs)


def lay_out_partial(manifest: Manifest, target: Path) -> bool:
    """Create or repair a download's partial file(s) at ``target`` (blocking: 10,000
    small files can take seconds on a slow disk); True if recorded data was lost."""
    try:
        return _layout_partial(manifest, target)
    except OSError as exc:
        raise storage_error(exc, target) from None


def _parent_dirs(manifest: Manifest) -> list[str]:
    """The folders holding a folder resource's files (relative POSIX paths)."""
    if manifest.kind != "dir":
        return []
    return list({e.path.rpartition("/")[0] for e in manifest.entries} - {""})


def _make_dirs(root: Path, rels: Iterable[str]) -> None:
    """Create the folders ``rels`` (relative POSIX paths) under ``root`` and their
    parents, shallowest first, in a loop: no recursion however deep a path from a
    manifest is (``Path.mkdir(parents=True)`` recurses once per missing level).
    An existing folder is kept; anything else in the way raises FileExistsError."""
    wanted: set[tuple[str, ...]] = set()
    for rel in rels:
        parts = tuple(rel.split("/"))
        for depth in range(len(parts), 0, -1):
            prefix = parts[:depth]
            if prefix in wanted:
                break  # its parents are already in
            wanted.add(prefix)
    for parts in sorted(wanted, key=len):
        path = root.joinpath(*parts)
        try:
            os.mkdir(path)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise


def fsync_tree(root: Path, manifest: Manifest) -> None:
    """Make a written file or folder durable (syncfs for many files: see durable.py)."""
    sync_tree(root, manifest)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def copy_into_place(
    src: Path, partial: Path, dest: Path, manifest: Manifest, force: bool, fsync: bool
) -> None:
    """Copy a complete resource to ``dest`` through ``partial`` (blocking)."""
    _remove_path(partial)
    try:
        if manifest.kind == "file":
            _copy_file(src, partial)
            if fsync:
                sync_tree(partial, manifest)
        else:
            # What the manifest lists, nothing else: regular files and folders only.
            os.mkdir(partial)
            with TreeSync(partial) as durable:  # before writing: see durable.py
                _make_dirs(partial, [*_parent_dirs(manifest), *manifest.empty_dirs])
                for s_path, d_path in zip(
                    file_paths(src, manifest), file_paths(partial, manifest), strict=True
                ):
                    _copy_file(s_path, d_path)
                if fsync:
                    durable.sync(partial, manifest)
        _move_into_place(partial, dest, manifest, force=force)
    except BaseException:
        _remove_path(partial)
        raise


def _copy_file(src: str | Path, dst: str | Path) -> None:
    """Copy one file's bytes to a new file: ``copy_file_range`` (in the kernel, and
    a reflink where the filesystem shares blocks: btrfs, XFS), else ``sendfile``."""
    sfd = os.open(src, os.O_RDONLY)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if not _copy_fds(sfd, dfd):
                os.lseek(sfd, 0, os.SEEK_SET)
                os.lseek(dfd, 0, os.SEEK_SET)
                os.ftruncate(dfd, 0)
                while os.sendfile(dfd, sfd, None, _COPY_CHUNK):
                    pass
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


_COPY_CHUNK = 1 << 30
_HAS_COPY_RANGE = hasattr(os, "copy_file_range")


def _copy_fds(sfd: int, dfd: int) -> bool:
    """``copy_file_range`` to the end; False if unsupported here (nothing copied)."""
    global _HAS_COPY_RANGE
    if not _HAS_COPY_RANGE:
        return False
    try:
        while os.copy_file_range(sfd, dfd, _COPY_CHUNK):
            pass
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        _HAS_COPY_RANGE = exc.errno != errno.ENOSYS
        return False
    return True


def _move_into_place(partial: Path, dest: Path, manifest: Manifest, *, force: bool) -> None:
    if dest.exists() or dest.is_symlink():
        if not force:
            raise FileExistsError(errno.EEXIST, "destination exists (use force)", str(dest))
        if manifest.kind == "file" and not dest.is_dir():
            os.replace(partial, dest)
            _fsync_dir(dest.parent)
            return
        # Folders cannot be swapped atomically: move the old one aside first.
        aside = dest.with_name(dest.name + ".p2pnode-old")
        _remove_path(aside)
        os.rename(dest, aside)
        os.rename(partial, dest)
        _remove_path(aside)
    else:
        os.rename(partial, dest)
    _fsync_dir(dest.parent)
