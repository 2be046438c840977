"""Manifests: what a shared file or folder is, piece by piece, and its resource id.

Format (version 2), one canonical msgpack array::

    [2, kind, name, piece_size, [[path, size], ...], piece_hashes]
    [2, kind, name, piece_size, [[path, size], ...], piece_hashes, [empty_dir, ...]]

- ``kind`` is ``"file"`` or ``"dir"``; ``name`` the top-level name (one path
  component); for a file the single entry's path equals ``name``; for a folder
  the entries are the regular files under it, relative POSIX paths sorted by
  their UTF-8 bytes.
- Pieces span file boundaries (BitTorrent v1 style): the content is the
  concatenation of the entries in order, cut into ``piece_size`` pieces (the last
  one shorter). Chosen over per-file pieces because one offset space keeps the
  picker, the server and the writer simple, every piece but the last has the same
  size, and a folder of many small files costs a few pieces instead of one
  request per file. A piece that spans files is read and written segment by
  segment (``Manifest.segments``).
- The optional 7th element lists a folder's empty folders (leaves only: a folder
  holding a file or another listed folder is implied by that path), relative POSIX
  paths sorted by their UTF-8 bytes. It is present only when there is at least
  one, so a manifest without empty folders encodes exactly as before and keeps its
  resource id; a node older than this field rejects a manifest that has it.
- Symbolic links are never recorded: ``scan`` refuses a folder holding one, or
  with ``follow_links`` records what a link inside the folder points to (a file
  or a folder inside the shared tree) as regular files and folders. A downloader
  therefore only ever creates regular files and folders.
- ``piece_hashes`` is the concatenation of one 32-byte hash per piece: BLAKE3 in
  version 2 (what ``build_manifest`` makes), SHA-256 in version 1 (still read, so
  resources shared before keep their ids). BLAKE3 because a downloader hashes every
  byte it receives: ~0.17 CPU-s/GiB here against ~0.6 for SHA-256 (both release
  the GIL).
- The resource id is SHA-256 over the canonical bytes (small: the algorithm does
  not matter for speed), so it certifies the manifest, and the manifest certifies
  every piece.

Parsing bytes from the network (``Manifest.decode``) applies size limits, strict
types, re-encodes to check the bytes were canonical, and rejects any path that
could escape a destination; everything wrong raises ``ProtocolError``.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import os
import re
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import msgpack  # type: ignore[import-untyped]
from blake3 import blake3

from p2pnode.errors import ProtocolError, UsageError, VerificationError

VERSION = 2
SUPPORTED_VERSIONS = frozenset({1, 2})
HASH_LEN = 32
RESOURCE_ID_LEN = 32
RESOURCE_ID_PREFIX = "res"

MIN_PIECE_SIZE = 16 * 1024
DEFAULT_MIN_PIECE_SIZE = 256 * 1024
# A piece travels in one frame (4 MiB by default), with room for the header.
MAX_PIECE_SIZE = 2 * 1024 * 1024
TARGET_PIECES = 256

# Limits on a manifest from the network: it must fit in one frame.
MAX_MANIFEST_BYTES = 3 * 1024 * 1024 + 512 * 1024
MAX_ENTRIES = 100_000
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
# Folders a path may go down (components - 1 for a file): far beyond real trees,
# and it keeps every walk over a path short (issue 11: a 1,500-level path crashed
# a download with RecursionError and left a row and a folder behind).
MAX_PATH_DEPTH = 64
MAX_TOTAL_SIZE = 1 << 50

Kind = Literal["file", "dir"]

_DRIVE = re.compile(r"^[A-Za-z]:")
# One regex search instead of a Python loop per character: checking 10,000 paths
# was a third of sharing 10,000 small files.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_READ_CHUNK = 8 * 1024 * 1024


# --- resource ids -------------------------------------------------------------


def resource_id_to_str(resource_id: bytes) -> str:
    """``res`` + lower-case base32 without padding (55 characters)."""
    if len(resource_id) != RESOURCE_ID_LEN:
        raise ValueError("a resource id is 32 bytes")
    return RESOURCE_ID_PREFIX + base64.b32encode(resource_id).decode("ascii").rstrip("=").lower()


def resource_id_from_str(text: str) -> bytes:
    """Parse a resource id string (the ``res`` prefix is optional); UsageError on junk."""
    if not isinstance(text, str):
        raise UsageError("a resource id is a string")
    cleaned = text.strip().lower()
    if cleaned.startswith(RESOURCE_ID_PREFIX) and len(cleaned) == 52 + len(RESOURCE_ID_PREFIX):
        cleaned = cleaned[len(RESOURCE_ID_PREFIX) :]
    if len(cleaned) != 52 or not re.fullmatch(r"[a-z2-7]+", cleaned):
        raise UsageError(f"not a resource id: {text!r}")
    try:
        raw = base64.b32decode(cleaned.upper() + "====")
    except ValueError as exc:  # pragma: no cover - the regex above rules this out
        raise UsageError(f"not a resource id: {text!r}") from exc
    # 52 base32 characters carry 260 bits: the last 4 must be zero (canonical form).
    if len(raw) != RESOURCE_ID_LEN or resource_id_to_str(raw) != RESOURCE_ID_PREFIX + cleaned:
        raise UsageError(f"not a resource id: {text!r}")
    return raw


def dht_key(resource_id: bytes) -> bytes:
    """The 20-byte DHT key under which providers of a resource are recorded."""
    return resource_id[:20]


def piece_digest(version: int, data: bytes | bytearray | memoryview) -> bytes:
    """The hash of one piece under manifest format ``version`` (2: BLAKE3, 1: SHA-256)."""
    if version == 2:
        return blake3(data).digest()
    return hashlib.sha256(data).digest()


# --- paths ----------------------------------------------------------------------


def check_component(part: str) -> None:
    """Raise ProtocolError unless ``part`` is one safe path component."""
    if not part:
        raise ProtocolError("empty path component")
    if part in (".", ".."):
        raise ProtocolError(f"path component {part!r} not allowed")
    if "/" in part or "\\" in part:
        raise ProtocolError(f"separator in path component {part!r}")
    if _CONTROL.search(part):
        raise ProtocolError(f"control character in path component {part!r}")
    if _DRIVE.match(part):
        raise ProtocolError(f"drive letter in path component {part!r}")
    if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
        raise ProtocolError("path component too long")
    try:
        part.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("path component is not valid UTF-8") from None


def check_relative_path(path: str) -> tuple[str, ...]:
    """Split a relative POSIX path into safe components or raise ProtocolError."""
    if not path:
        raise ProtocolError("empty path")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise ProtocolError("path too long")
    if path.startswith("/"):
        raise ProtocolError(f"absolute path {path!r}")
    if path.count("/") >= MAX_PATH_DEPTH:
        raise ProtocolError(
            f"path {path[:60]!r}... is {path.count('/') + 1} levels deep (at most {MAX_PATH_DEPTH})"
        )
    parts = tuple(path.split("/"))
    for part in parts:
        check_component(part)
    return parts


def _path_sort_key(path: str) -> bytes:
    return path.encode("utf-8")


# --- the manifest ---------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    offset: int  # where this file starts in the concatenated content


@dataclass(frozen=True)
class Segment:
    """A piece's bytes inside one file: ``length`` bytes at ``file_offset``."""

    entry: int
    file_offset: int
    length: int
    piece_offset: int  # where these bytes sit inside the piece


@dataclass(frozen=True)
class Manifest:
    kind: Kind
    name: str
    piece_size: int
    entries: tuple[Entry, ...]
    piece_hashes: bytes = field(repr=False)
    version: int = VERSION
    empty_dirs: tuple[str, ...] = ()  # a folder's empty folders (leaves), sorted

    # -- building ------------------------------------------------------------

    @classmethod
    def create(
        cls,
        kind: Kind,
        name: str,
        piece_size: int,
        files: Sequence[tuple[str, int]],
        piece_hashes: bytes,
        version: int = VERSION,
        empty_dirs: Sequence[str] = (),
    ) -> Manifest:
        """Build and validate a manifest; raises ProtocolError when inconsistent."""
        entries: list[Entry] = []
        offset = 0
        for path, size in files:
            entries.append(Entry(path, size, offset))
            offset += size
        manifest = cls(
            kind, name, piece_size, tuple(entries), piece_hashes, version, tuple(empty_dirs)
        )
        manifest._validate()
        return manifest

    def _validate(self) -> None:
        if self.version not in SUPPORTED_VERSIONS:
            raise ProtocolError(f"unsupported manifest version {self.version!r}")
        if self.kind not in ("file", "dir"):
            raise ProtocolError(f"unknown manifest kind {self.kind!r}")
        check_component(self.name)
        ps = self.piece_size
        if not MIN_PIECE_SIZE <= ps <= MAX_PIECE_SIZE or ps & (ps - 1):
            raise ProtocolError(f"bad piece size {ps}")
        if self.kind == "file" and (len(self.entries) != 1 or self.entries[0].path != self.name):
            raise ProtocolError("a file manifest has exactly one entry named like it")
        if len(self.entries) > MAX_ENTRIES:
            raise ProtocolError("too many entries")
        seen: set[str] = set()
        dirs: set[str] = set()
        previous: bytes | None = None
        for entry in self.entries:
            if entry.size < 0:
                raise ProtocolError("negative file size")
            parts = check_relative_path(entry.path)
            key = _path_sort_key(entry.path)
            if previous is not None and key <= previous:
                if key == previous:
                    raise ProtocolError(f"duplicate path {entry.path!r}")
                raise ProtocolError("entries not in canonical order")
            previous = key
            if entry.path in dirs:
                raise ProtocolError(f"{entry.path!r} is both a file and a folder")
            seen.add(entry.path)
            for i in range(1, len(parts)):
                prefix = "/".join(parts[:i])
                if prefix in seen:
                    raise ProtocolError(f"{prefix!r} is both a file and a folder")
                dirs.add(prefix)
        self._validate_empty_dirs(seen, dirs)
        if self.total_size > MAX_TOTAL_SIZE:
            raise ProtocolError("resource too large")
        if len(self.piece_hashes) != HASH_LEN * self.piece_count:
            raise ProtocolError(
                f"piece hashes do not match the size: {len(self.piece_hashes)} bytes "
                f"for {self.piece_count} pieces"
            )

    def _validate_empty_dirs(self, files: set[str], dirs: set[str]) -> None:
        """Empty folders: safe paths, canonical order, no duplicates, leaves only,
        and no clash with a file (as itself or as one of its parent folders)."""
        if not self.empty_dirs:
            return
        if self.kind != "dir":
            raise ProtocolError("only a folder manifest lists empty folders")
        if len(self.entries) + len(self.empty_dirs) > MAX_ENTRIES:
            raise ProtocolError("too many entries")
        listed: set[str] = set()
        previous: bytes | None = None
        for path in self.empty_dirs:
            if not isinstance(path, str):
                raise ProtocolError("an empty folder is a string path")
            parts = check_relative_path(path)
            key = _path_sort_key(path)
            if previous is not None and key <= previous:
                if key == previous:
                    raise ProtocolError(f"duplicate empty folder {path!r}")
                raise ProtocolError("empty folders not in canonical order")
            previous = key
            if path in files:
                raise ProtocolError(f"{path!r} is both a file and a folder")
            if path in dirs:
                raise ProtocolError(f"empty folder {path!r} holds files")
            for i in range(1, len(parts)):
                prefix = "/".join(parts[:i])
                if prefix in files:
                    raise ProtocolError(f"{prefix!r} is both a file and a folder")
                if prefix in listed:
                    raise ProtocolError(f"empty folder {prefix!r} holds a folder")
            listed.add(path)

    # -- encoding ------------------------------------------------------------

    def encode(self) -> bytes:
        return _canonical_bytes(self)

    @cached_property
    def canonical(self) -> bytes:
        return self.encode()

    @cached_property
    def resource_id(self) -> bytes:
        return hashlib.sha256(self.canonical).digest()

    @classmethod
    def decode(cls, data: bytes, *, expected_id: bytes | None = None) -> Manifest:
        """Parse manifest bytes from a remote; ProtocolError on anything wrong.

        With ``expected_id`` the bytes must hash to it (VerificationError otherwise),
        checked before anything is parsed.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ProtocolError("manifest must be bytes")
        data = bytes(data)
        if len(data) > MAX_MANIFEST_BYTES:
            raise ProtocolError("manifest too large")
        if expected_id is not None and hashlib.sha256(data).digest() != expected_id:
            raise VerificationError("manifest does not match the resource id")
        try:
            obj = msgpack.unpackb(
                data,
                raw=False,
                use_list=True,
                strict_map_key=True,
                max_str_len=MAX_PATH_BYTES,
                max_bin_len=MAX_MANIFEST_BYTES,
                max_array_len=MAX_ENTRIES,
                max_map_len=0,
                max_ext_len=0,
            )
        except (ValueError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"manifest is not valid msgpack: {exc}") from None
        manifest = cls._from_obj(obj)
        if manifest.canonical != data:
            raise ProtocolError("manifest is not in canonical form")
        return manifest

    @classmethod
    def _from_obj(cls, obj: Any) -> Manifest:
        if not isinstance(obj, list) or len(obj) not in (6, 7):
            raise ProtocolError("manifest must be a 6- or 7-element array")
        version, kind, name, piece_size, entries, hashes = obj[:6]
        empty_dirs: list[str] = []
        if len(obj) == 7:
            if not isinstance(obj[6], list):
                raise ProtocolError("empty folders must be an array")
            for item in obj[6]:
                if not isinstance(item, str):
                    raise ProtocolError("an empty folder is a string path")
                empty_dirs.append(item)
        if type(version) is not int or version not in SUPPORTED_VERSIONS:
            raise ProtocolError(f"unsupported manifest version {version!r}")
        if kind == "file":
            kind_: Kind = "file"
        elif kind == "dir":
            kind_ = "dir"
        else:
            raise ProtocolError(f"unknown manifest kind {kind!r}")
        if not isinstance(name, str):
            raise ProtocolError("manifest name must be a string")
        if type(piece_size) is not int:
            raise ProtocolError("piece size must be an integer")
        if not isinstance(entries, list):
            raise ProtocolError("entries must be an array")
        if not isinstance(hashes, bytes):
            raise ProtocolError("piece hashes must be bytes")
        files: list[tuple[str, int]] = []
        for item in entries:
            if not isinstance(item, list) or len(item) != 2:
                raise ProtocolError("an entry is a [path, size] array")
            path, size = item
            if not isinstance(path, str) or type(size) is not int:
                raise ProtocolError("an entry is a [str, int] pair")
            files.append((path, size))
        return cls.create(kind_, name, piece_size, files, hashes, version, empty_dirs)

    # -- geometry ------------------------------------------------------------

    @cached_property
    def total_size(self) -> int:
        return sum(e.size for e in self.entries)

    @cached_property
    def piece_count(self) -> int:
        return -(-self.total_size // self.piece_size)

    def piece_hash(self, index: int) -> bytes:
        if not 0 <= index < self.piece_count:
            raise IndexError(index)
        return self.piece_hashes[index * HASH_LEN : (index + 1) * HASH_LEN]

    def piece_length(self, index: int) -> int:
        if not 0 <= index < self.piece_count:
            raise IndexError(index)
        start = index * self.piece_size
        return min(self.piece_size, self.total_size - start)

    def verify_piece(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        return len(data) == self.piece_length(index) and (
            piece_digest(self.version, data) == self.piece_hash(index)
        )

    def hash_piece(self, data: bytes | bytearray | memoryview) -> bytes:
        """The hash this manifest's format gives ``data`` (compare with ``piece_hash``)."""
        return piece_digest(self.version, data)

    @cached_property
    def _offsets(self) -> list[int]:
        return [e.offset for e in self.entries]

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        """The file segments holding ``length`` bytes of content at ``offset``.

        Empty files hold no bytes and never appear.
        """
        end = offset + length
        if offset < 0 or end > self.total_size:
            raise IndexError((offset, length))
        i = max(bisect.bisect_right(self._offsets, offset) - 1, 0)
        pos = offset
        while pos < end:
            entry = self.entries[i]
            file_end = entry.offset + entry.size
            if file_end > pos:
                take = min(end, file_end) - pos
                yield Segment(i, pos - entry.offset, take, pos - offset)
                pos += take
            i += 1

    def piece_segments(self, index: int) -> list[Segment]:
        return list(self.segments(index * self.piece_size, self.piece_length(index)))

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "size": self.total_size,
            "files": len(self.entries),
            "empty_folders": len(self.empty_dirs),
            "piece_size": self.piece_size,
            "pieces": self.piece_count,
        }


def _canonical_bytes(manifest: Manifest) -> bytes:
    obj: list[Any] = [
        manifest.version,
        manifest.kind,
        manifest.name,
        manifest.piece_size,
        [[e.path, e.size] for e in manifest.entries],
        manifest.piece_hashes,
    ]
    if manifest.empty_dirs:  # absent when there are none: older ids stay as they were
        obj.append(list(manifest.empty_dirs))
    return msgpack.packb(obj, use_bin_type=True)


def choose_piece_size(total_size: int) -> int:
    """A power of two in [256 KiB, 2 MiB]: at most ~256 pieces up to 512 MiB (2 MiB
    pieces from there; 100 GiB is 51200 pieces, a 1.6 MB manifest).

    Larger pieces cost less per byte (one request, one thread hand-off, one hash,
    one write each), which matters in Python: 2 MiB pieces for 512 MiB took the
    downloader from ~1.4 to ~1.15 CPU-s/GiB and the provider from ~1.0 to ~0.8
    against 512 KiB. A few hundred pieces still spread well over many providers.
    """
    size = DEFAULT_MIN_PIECE_SIZE
    while size < MAX_PIECE_SIZE and size * TARGET_PIECES < total_size:
        size *= 2
    return size


# --- reading content off disk (sharing side) ------------------------------------


@dataclass(frozen=True)
class FileStat:
    """What a shared file looked like when it was hashed."""

    path: str  # entry path
    size: int
    mtime_ns: int


def file_paths(root: Path, manifest: Manifest) -> list[str]:
    """Absolute paths of a manifest's entries under ``root``, as text: a ``Path``
    each costs ~25 µs to build, which is most of a local copy of 10,000 small
    files. Entry paths are validated POSIX paths, so joining the text is safe."""
    base = os.fspath(root)
    if manifest.kind == "file":
        return [base]
    return [os.path.join(base, e.path) for e in manifest.entries]


def empty_dir_paths(root: Path, manifest: Manifest) -> list[Path]:
    """Absolute paths of a folder manifest's empty folders under ``root``."""
    return [root.joinpath(*d.split("/")) for d in manifest.empty_dirs]


class ContentReader:
    """Reads byte ranges of a resource's concatenated content from its files.

    Blocking; meant to run in a worker thread. Keeps files open until ``close``.
    """

    def __init__(self, paths: Sequence[str | Path], manifest: Manifest) -> None:
        self._paths = paths
        self._manifest = manifest
        self._fds: dict[int, int] = {}

    def _fd(self, entry: int) -> int:
        fd = self._fds.get(entry)
        if fd is None:
            fd = os.open(self._paths[entry], os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._fds[entry] = fd
        return fd

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with content at ``offset``; OSError if a file is short."""
        for seg in self._manifest.segments(offset, len(buf)):
            fd = self._fd(seg.entry)
            view = buf[seg.piece_offset : seg.piece_offset + seg.length]
            done = 0
            while done < seg.length:
                n = os.preadv(fd, [view[done:]], seg.file_offset + done)
                if n <= 0:
                    raise OSError(f"{self._paths[seg.entry]} is shorter than recorded")
                done += n

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> ContentReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _hash_range(
    paths: Sequence[Path], manifest: Manifest, first: int, last: int, out: bytearray
) -> None:
    """Hash pieces [first, last) into ``out`` (their slots of the hash array)."""
    ps = manifest.piece_size
    chunk_pieces = max(1, _READ_CHUNK // ps)
    buf = bytearray(chunk_pieces * ps)
    view = memoryview(buf)
    with ContentReader(paths, manifest) as reader:
        index = first
        while index < last:
            n = min(chunk_pieces, last - index)
            start = index * ps
            length = min(n * ps, manifest.total_size - start)
            reader.read_into(start, view[:length])
            for k in range(n):
                piece = view[k * ps : min((k + 1) * ps, length)]
                i = index + k
                out[i * HASH_LEN : (i + 1) * HASH_LEN] = manifest.hash_piece(piece)
            index += n


@dataclass(frozen=True)
class Scan:
    """A file or folder listed for sharing, before hashing."""

    root: Path
    kind: Kind
    name: str
    paths: tuple[Path, ...]
    stats: tuple[FileStat, ...]
    empty_dirs: tuple[str, ...] = ()
    links_followed: int = 0  # symbolic links inside the folder (only with follow_links)

    @property
    def total_size(self) -> int:
        return sum(s.size for s in self.stats)


LINKS_REFUSED_HINT = (
    "symbolic links are refused; --follow-links shares what links inside the folder "
    "point to as regular files and folders"
)


class _Walk:
    """Lists a folder for ``scan``: regular files, empty folders, and (when asked)
    what symbolic links inside the folder point to."""

    def __init__(self, root: Path, follow_links: bool) -> None:
        self.root = root
        self.root_real = os.path.realpath(root)
        self.follow_links = follow_links
        self.files: list[tuple[bytes, str, Path, os.stat_result]] = []
        self.empty: list[str] = []
        self.links = 0

    def _fail(self, what: Path, why: str) -> UsageError:
        return UsageError(f"cannot share {str(self.root)!r}: {str(what)!r} {why}")

    def _rel(self, full: Path) -> str:
        rel = full.relative_to(self.root).as_posix()
        try:
            check_relative_path(rel)
        except ProtocolError as exc:
            raise self._fail(full, f"has an unusable name ({exc})") from None
        return rel

    def _count(self) -> None:
        if len(self.files) + len(self.empty) > MAX_ENTRIES:
            raise UsageError(f"cannot share {str(self.root)!r}: more than {MAX_ENTRIES} entries")

    def _follow(self, full: Path, chain: frozenset[str]) -> tuple[str, os.stat_result]:
        """Where the link ``full`` leads (a real path inside the shared tree)."""
        if not self.follow_links:
            raise self._fail(full, f"is a symbolic link: {LINKS_REFUSED_HINT}")
        try:
            target = os.path.realpath(full, strict=True)
            tst = os.stat(target)
        except (OSError, RuntimeError) as exc:
            raise self._fail(full, f"is a broken symbolic link ({exc})") from None
        if os.path.commonpath([self.root_real, target]) != self.root_real:
            raise self._fail(
                full, f"is a symbolic link to {target!r}, outside the shared folder: refused"
            )
        if stat.S_ISDIR(tst.st_mode) and target in chain:
            raise self._fail(full, f"is a symbolic link to {target!r}, a cycle: refused")
        self.links += 1
        return target, tst

    def walk(self, logical: Path, real: str, chain: frozenset[str]) -> bool:
        """List the folder ``real`` (the real path of ``logical``); ``chain`` holds
        the real paths of the folders above it, to find cycles through links.
        Returns whether anything was listed (a folder with nothing listed in it is
        recorded as an empty folder)."""
        chain = chain | {real}
        try:
            with os.scandir(real) as it:
                names = sorted(e.name for e in it)
        except OSError as exc:
            raise self._fail(logical, f"cannot be listed ({exc})") from None
        listed = False
        for fname in names:
            full = logical / fname
            src = os.path.join(real, fname)
            try:
                fst = os.lstat(src)
            except OSError:
                continue  # vanished meanwhile
            target = src
            if stat.S_ISLNK(fst.st_mode):
                target, fst = self._follow(full, chain)
            if stat.S_ISDIR(fst.st_mode):
                self.walk(full, target, chain)
                listed = True
            elif stat.S_ISREG(fst.st_mode):
                rel = self._rel(full)
                self.files.append((_path_sort_key(rel), rel, full, fst))
                self._count()
                listed = True
            # Other special files (FIFOs, sockets, devices) are not content: skipped.
        if not listed and logical != self.root:
            self.empty.append(self._rel(logical))
            self._count()
        return listed


def scan(path: Path, *, follow_links: bool = False) -> Scan:
    """List what sharing ``path`` would cover: a regular file, or the regular files
    and empty folders under a folder (special files inside it are skipped).

    A symbolic link inside the folder is refused (UsageError naming it), unless
    ``follow_links``: then what it points to is listed as regular files and
    folders under the link's name, provided it is inside the shared folder (a link
    out of it, a broken link or a cycle is refused). ``path`` itself may be a link.
    """
    try:
        root = path.expanduser().resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise UsageError(f"cannot share {str(path)!r}: {exc}") from None
    name = root.name
    try:
        check_component(name)
    except ProtocolError as exc:
        raise UsageError(f"cannot share {str(root)!r}: unusable name ({exc})") from None
    st = root.stat()
    if stat.S_ISREG(st.st_mode):
        return Scan(root, "file", name, (root,), (FileStat(name, st.st_size, st.st_mtime_ns),))
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"cannot share {str(root)!r}: not a regular file or folder")
    walker = _Walk(root, follow_links)
    walker.walk(root, walker.root_real, frozenset())
    found = sorted(walker.files, key=lambda item: item[0])
    empty = sorted(walker.empty, key=_path_sort_key)
    return Scan(
        root,
        "dir",
        name,
        tuple(item[2] for item in found),
        tuple(FileStat(item[1], item[3].st_size, item[3].st_mtime_ns) for item in found),
        tuple(empty),
        walker.links,
    )


def build_manifest(
    path: Path,
    *,
    piece_size: int | None = None,
    workers: int | None = None,
    follow_links: bool = False,
) -> tuple[Manifest, Scan]:
    """Hash a file or folder into a manifest. Blocking: run it in a thread.

    Symbolic links inside a folder are refused unless ``follow_links`` (see ``scan``).

    Pieces are independent, so several threads hash separate ranges (blake3
    releases the GIL). Raises UsageError if a file changes while it is hashed.
    """
    listing = scan(path, follow_links=follow_links)
    total = listing.total_size
    ps = piece_size if piece_size is not None else choose_piece_size(total)
    files = [(s.path, s.size) for s in listing.stats]
    count = -(-total // ps)
    hashes = bytearray(HASH_LEN * count)
    # Geometry only: hashes are filled in below, then checked by Manifest.create.
    draft = Manifest.create(
        listing.kind, listing.name, ps, files, bytes(hashes), empty_dirs=listing.empty_dirs
    )
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    n_workers = max(1, min(n_workers, count))
    try:
        if n_workers == 1:
            _hash_range(listing.paths, draft, 0, count, hashes)
        else:
            bounds = [count * k // n_workers for k in range(n_workers + 1)]
            with ThreadPoolExecutor(n_workers, thread_name_prefix="p2pnode-hash") as pool:
                futures = [
                    pool.submit(_hash_range, listing.paths, draft, bounds[k], bounds[k + 1], hashes)
                    for k in range(n_workers)
                ]
                for fut in futures:
                    fut.result()
    except OSError as exc:
        raise UsageError(f"cannot read {str(listing.root)!r} while hashing: {exc}") from None
    for file_path, before in zip(listing.paths, listing.stats, strict=True):
        try:
            after = file_path.stat()
        except OSError as exc:
            raise UsageError(f"{str(file_path)!r} vanished while hashing: {exc}") from None
        if after.st_size != before.size or after.st_mtime_ns != before.mtime_ns:
            raise UsageError(f"{str(file_path)!r} changed while it was hashed; share it again")
    # Same geometry as the draft, already validated: only the hashes change.
    manifest = replace(draft, piece_hashes=bytes(hashes))
    return manifest, listing
