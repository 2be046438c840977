"""One download: providers from the DHT, manifest from any, pieces from all at once.

Rules:

- The manifest is asked of up to three providers at once and accepted only if it
  hashes to the resource id (a provider sending other bytes is skipped). Bytes that
  hash to the id but fail parsing (a path escape...) end the download with
  ProtocolError: the resource itself is unsafe.
- Every provider gets one worker. It asks GetHave once (complete, or which pieces),
  then keeps up to ``requests_per_peer`` GetPiece requests in flight (fewer for
  large pieces: ``inflight_bytes_per_peer``), as the ``Picker`` hands out pieces
  (rarest first; endgame races the last ones).
- Each request task also checks the answer against the piece hash and writes it
  (``PieceWriter``: O_DIRECT where possible), both in a worker thread, so the
  network never waits on the disk; verified pieces are committed to the store in
  small batches.
- A peer whose piece fails verification, or that answers out of protocol, is
  banned; a peer that times out gets strikes and is dropped after
  ``max_failures``; a peer that says busy is paused with a doubling backoff (no
  strike) and dropped only after ``busy_give_up`` seconds without a piece; a peer
  whose connection fails is dropped. Its pieces go back to the others.
- When the picker has no peers left, the DHT is asked again (``rediscover_attempts``
  times); then the download fails with ``DownloadError``, keeping what it verified.
- Disk errors (ENOSPC...) end the download with ``StorageError``; the partial
  file and its records are kept, so running the same get again resumes.
- Only when every piece is verified is the partial moved to its destination.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from p2pnode.clock import Clock
from p2pnode.errors import (
    LimitExceeded,
    NotFoundError,
    P2PError,
    P2PTimeoutError,
    ProtocolError,
    RemoteError,
    UsageError,
    VerificationError,
)
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.manifest import (
    Manifest,
    dht_key,
    resource_id_to_str,
)
from p2pnode.exchange.picker import Picker
from p2pnode.exchange.server import bitfield_to_set
from p2pnode.exchange.store import (
    StorageError,
    Store,
    StoredResource,
    copy_into_place,
    fsync_tree,
    partial_path,
    storage_error,
)
from p2pnode.exchange.writer import PieceWriter, recheck_pieces
from p2pnode.identity import peer_id_to_str
from p2pnode.net.host import PeerAddress
from p2pnode.wire.messages import (
    ErrorCode,
    ErrorReply,
    GetHave,
    GetManifest,
    GetPiece,
    Have,
    ManifestData,
    Message,
    PieceData,
)

if TYPE_CHECKING:
    from p2pnode.dht.discovery import Discovery, ProviderRecord
    from p2pnode.net.host import PeerHost

log = logging.getLogger(__name__)

ProgressCallback = Callable[["Progress"], None]
RATE_WINDOW = 5.0
# Verified pieces are committed to the store in batches: at most this many, or this
# old (seconds). A crash loses at most that much work, never correctness.
RECORD_BATCH = 32
RECORD_INTERVAL = 0.5
# Providers asked for the manifest at the same time.
MANIFEST_PARALLEL = 3


class _BadAnswer(Exception):
    """A peer answered out of protocol (wrong type, resource or index)."""


class DownloadError(P2PError):
    """A download could not finish with the providers there are; what was verified is kept."""


@dataclass(frozen=True)
class Progress:
    resource_id: bytes
    name: str
    done_bytes: int
    total_bytes: int
    pieces_done: int
    pieces_total: int
    rate: float  # bytes per second, over the last few seconds
    peers: int
    eta: float | None  # seconds
    state: str = "downloading"  # "downloading", "verifying", "finishing", "done"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": resource_id_to_str(self.resource_id),
            "name": self.name,
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "pieces_done": self.pieces_done,
            "pieces_total": self.pieces_total,
            "rate": round(self.rate, 1),
            "peers": self.peers,
            "eta": None if self.eta is None else round(self.eta, 1),
            "state": self.state,
        }


# With fsync on, writeback of page-cached bytes is started every this many bytes
# written, so it overlaps the transfer instead of following it.
FLUSH_EVERY = 64 * 1024 * 1024


# --- the download -----------------------------------------------------------------


@dataclass
class _PeerInfo:
    record: ProviderRecord
    last_error: str = ""
    # "busy" answers: ask again after backoff_until; give up if busy for too long.
    backoff_delay: float = 0.0
    backoff_until: float = 0.0
    busy_since: float | None = None


@dataclass
class _Download:
    resource_id: bytes
    manifest: Manifest
    resource: StoredResource
    picker: Picker
    writer: PieceWriter
    name: str
    done_bytes: int
    peers: dict[bytes, _PeerInfo] = field(default_factory=dict)
    tasks: dict[tuple[bytes, int], asyncio.Task[str]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    last_progress: float = -1e18
    # Verified and written, not yet committed to the store (committed in batches).
    unrecorded: list[int] = field(default_factory=list)
    last_record: float = 0.0

    def wake(self) -> None:
        """Wake idle workers: pieces came back, a peer joined, or we are done."""
        self.changed.set()
        self.changed = asyncio.Event()


class Fetcher:
    def __init__(
        self,
        *,
        store: Store,
        host: PeerHost,
        discovery: Discovery,
        config: ExchangeConfig,
        clock: Clock,
        executor: Executor | None,
        own_node_id: bytes | None = None,
    ) -> None:
        self._store = store
        self._host = host
        self._discovery = discovery
        self._config = config
        self._clock = clock
        self._executor = executor
        self._own = own_node_id

    # -- entry point ------------------------------------------------------------------

    async def fetch(
        self,
        resource_id: bytes,
        dest: Path,
        *,
        force: bool = False,
        progress: ProgressCallback | None = None,
    ) -> StoredResource:
        rid = resource_id
        rid_text = resource_id_to_str(rid)
        t_start = time.perf_counter()
        existing = self._store.get(rid)
        if existing is not None and existing.state != "partial":
            if existing.served and existing.stale is None and _intact(self._store, rid):
                return await self._copy_local(existing, dest, force=force)
            # We had it, but it changed or went away: forget that copy, fetch anew.
            self._store.remove(rid)
            self._discovery.remove_provider(dht_key(rid))
            existing = None
        providers: list[ProviderRecord] | None = None
        if existing is not None:
            manifest = existing.manifest
        else:
            providers = await self._find_providers(rid)
            for attempt in range(1, self._config.rediscover_attempts + 1):
                if providers:
                    break
                # A lookup can miss under loss or churn: ask again before giving up.
                await asyncio.sleep(self._config.rediscover_delay * attempt)
                providers = await self._find_providers(rid)
            if not providers:
                raise NotFoundError(
                    f"no providers found for {rid_text} "
                    f"({self._config.rediscover_attempts + 1} lookups)"
                )
            manifest = await self._fetch_manifest(rid, providers)
        dest = self._resolve_dest(dest, manifest, existing, force=force)
        self._store.claim_dest(dest)
        try:
            return await self._download(
                rid, manifest, dest, existing, providers, force, progress, t_start
            )
        finally:
            self._store.release_dest(dest)

    async def _download(
        self,
        rid: bytes,
        manifest: Manifest,
        dest: Path,
        existing: StoredResource | None,
        providers: list[ProviderRecord] | None,
        force: bool,
        progress: ProgressCallback | None,
        t_start: float,
    ) -> StoredResource:
        rid_text = resource_id_to_str(rid)
        self._check_space(dest, manifest, existing)
        resource = self._store.begin_download(manifest, dest)
        await self._recheck(resource)
        resource = self._store.get(rid) or resource
        verified = self._store.verified_pieces(rid)
        by_bytes = self._config.inflight_bytes_per_peer // manifest.piece_size
        picker = Picker(
            manifest.piece_count,
            done=verified,
            window=max(1, min(self._config.requests_per_peer, max(2, by_bytes))),
            timeout=self._config.piece_timeout,
            max_failures=self._config.max_failures,
            endgame_copies=self._config.endgame_copies,
        )
        done_bytes = sum(manifest.piece_length(i) for i in verified)
        writer = PieceWriter(
            manifest,
            resource.root,
            direct=self._config.direct_io,
            flush_every=FLUSH_EVERY if self._config.fsync else 0,
        )
        d = _Download(rid, manifest, resource, picker, writer, manifest.name, done_bytes)
        self._emit(d, progress, force=True)
        t_transfer = time.perf_counter()
        try:
            if not picker.done:
                if providers is None:
                    providers = await self._find_providers(rid)
                if not providers:
                    raise NotFoundError(
                        f"no providers found for {rid_text}; "
                        f"{len(verified)} of {manifest.piece_count} pieces kept for later"
                    )
                t_transfer = time.perf_counter()
                await self._run(d, providers, progress)
        finally:
            self._record(d)
            writer.close()
        t_sync = time.perf_counter()
        self._emit(d, progress, force=True, state="finishing")
        if self._config.fsync:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._executor, fsync_tree, resource.root, manifest)
            except OSError as exc:
                raise storage_error(exc, resource.root) from None
        self._store.finish_download(rid, force=force, fsync=False)
        final = self._store.get(rid)
        assert final is not None
        self._emit(d, progress, force=True, state="done")
        t_end = time.perf_counter()
        log.info(
            "got %s (%d bytes) to %s: lookup+manifest+recheck %.3fs, pieces %.3fs (%.1f MB/s), "
            "fsync+rename %.3fs, from %d peer(s)",
            rid_text,
            manifest.total_size,
            final.root,
            t_transfer - t_start,
            t_sync - t_transfer,
            (manifest.total_size - done_bytes) / max(t_sync - t_transfer, 1e-9) / 1e6,
            t_end - t_sync,
            len(d.peers),
        )
        return final

    # -- providers and manifest -------------------------------------------------------

    async def _find_providers(self, rid: bytes) -> list[ProviderRecord]:
        want = self._config.max_peers_per_download
        try:
            found = await self._discovery.find_providers(dht_key(rid), want=want)
        except P2PError as exc:
            log.warning("provider lookup failed: %s", exc)
            return []
        seen: set[bytes] = set()
        out = []
        for rec in found:
            if rec.node_id == self._own or rec.node_id in seen:
                continue
            seen.add(rec.node_id)
            out.append(rec)
        return out[:want]

    async def _fetch_manifest(self, rid: bytes, providers: Sequence[ProviderRecord]) -> Manifest:
        """Ask providers for the manifest of ``rid``, a few at a time (so one that
        never answers costs nothing), until one sends bytes that hash to ``rid``."""
        errors: list[str] = []
        queue = list(providers)
        running: dict[asyncio.Task[Message], ProviderRecord] = {}
        try:
            while queue or running:
                while queue and len(running) < MANIFEST_PARALLEL:
                    rec = queue.pop(0)
                    task = asyncio.create_task(
                        self._request(rec, GetManifest(rid), self._config.manifest_timeout)
                    )
                    running[task] = rec
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    rec = running.pop(task)
                    who = _who(rec)
                    failure = task.exception()
                    if failure is not None:
                        if not isinstance(failure, P2PError):
                            raise failure
                        errors.append(f"{who}: {failure}")
                        continue
                    reply = task.result()
                    if not isinstance(reply, ManifestData) or reply.resource_id != rid:
                        errors.append(f"{who}: answered with something else")
                        continue
                    try:
                        return Manifest.decode(reply.manifest, expected_id=rid)
                    except VerificationError as exc:
                        errors.append(f"{who}: {exc}")
                    except ProtocolError as exc:
                        # Bytes that hash to the id but are unsafe (a path escape...): the
                        # resource itself is bad, every provider would send the same.
                        raise ProtocolError(
                            f"the manifest of {resource_id_to_str(rid)} is rejected: {exc}"
                        ) from None
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        raise NotFoundError(
            f"no provider sent the manifest of {resource_id_to_str(rid)}: " + "; ".join(errors)
        )

    async def _copy_local(
        self, existing: StoredResource, dest: Path, *, force: bool
    ) -> StoredResource:
        """The resource is already here: copy it to ``dest`` (no network), through a
        partial name and an atomic rename like a download. The store keeps serving
        the original; the copy is the caller's."""
        if _same_place(dest, existing):
            return existing
        dest = self._resolve_dest(dest, existing.manifest, None, force=force)
        partial = partial_path(dest)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                self._executor, copy_into_place, existing.root, partial, dest, existing.manifest,
                force, self._config.fsync,
            )  # fmt: skip
        except OSError as exc:
            raise storage_error(exc, dest) from None
        log.info("%s was already here: copied to %s", existing.id_str, dest)
        return replace(existing, root=dest, dest=dest)

    def _resolve_dest(
        self, dest: Path, manifest: Manifest, existing: StoredResource | None, *, force: bool
    ) -> Path:
        dest = dest.expanduser().absolute()
        # An existing folder receives the resource under its own name, like `cp FILE DIR`.
        if (
            dest.is_dir()
            and not dest.is_symlink()
            and not (existing is not None and existing.dest == dest)
        ):
            dest = dest / manifest.name
        if (dest.exists() or dest.is_symlink()) and not force:
            raise UsageError(f"{str(dest)!r} already exists (use force to replace it)")
        if not dest.parent.exists():
            raise UsageError(f"no such folder: {str(dest.parent)!r}")
        return dest

    def _check_space(self, dest: Path, manifest: Manifest, existing: StoredResource | None) -> None:
        try:
            free = shutil.disk_usage(dest.parent).free
        except OSError:
            return
        have = 0
        if existing is not None and existing.root == partial_path(dest):
            have = sum(
                manifest.piece_length(i) for i in self._store.verified_pieces(existing.resource_id)
            )
        need = manifest.total_size - have
        if need > free:
            raise StorageError(
                f"not enough disk space for {manifest.name!r}: {need} bytes needed, "
                f"{free} free on {str(dest.parent)!r}"
            )

    async def _recheck(self, resource: StoredResource) -> None:
        """Re-verify recorded pieces of a resumed download (the disk may have lost them)."""
        rid = resource.resource_id
        recorded = sorted(self._store.verified_pieces(rid))
        if not recorded:
            return
        loop = asyncio.get_running_loop()
        bad = await loop.run_in_executor(
            self._executor, recheck_pieces, resource.manifest, resource.root, recorded
        )
        if bad:
            log.warning("%d recorded piece(s) no longer verify; fetching them again", len(bad))
            self._store.forget_pieces(rid, bad)

    # -- pieces --------------------------------------------------------------------

    async def _run(
        self,
        d: _Download,
        providers: list[ProviderRecord],
        progress: ProgressCallback | None,
    ) -> None:
        attempts = 0
        while True:
            for rec in providers:
                if rec.node_id not in d.picker.banned:
                    d.peers[rec.node_id] = _PeerInfo(rec)
            candidates = [r for r in providers if r.node_id not in d.picker.banned]
            if candidates:
                try:
                    async with asyncio.TaskGroup() as tg:
                        for rec in candidates:
                            tg.create_task(self._peer_worker(d, rec, progress))
                except BaseExceptionGroup as group:
                    raise _first_p2p_error(group) from None
            if d.picker.done:
                return
            if attempts >= self._config.rediscover_attempts:
                break
            attempts += 1
            await asyncio.sleep(self._config.rediscover_delay * attempts)
            providers = await self._find_providers(d.resource_id)
        missing = len(d.picker.missing)
        reasons = "; ".join(
            f"{_who(p.record)}: {p.last_error}" for p in d.peers.values() if p.last_error
        )
        raise DownloadError(
            f"all providers of {resource_id_to_str(d.resource_id)} failed or went away "
            f"with {missing} of {d.manifest.piece_count} pieces missing; the verified pieces "
            f"are kept, run the same get again to resume" + (f" ({reasons})" if reasons else "")
        )

    async def _peer_worker(
        self, d: _Download, rec: ProviderRecord, progress: ProgressCallback | None
    ) -> None:
        key = rec.node_id
        picker = d.picker
        usable, have = await self._ask_have(d, rec)
        if not usable or not picker.add_peer(key, have):
            return
        d.wake()
        inflight: dict[asyncio.Task[str], int] = {}
        info = d.peers[key]
        try:
            while not picker.done and key in picker.peers:
                pause = info.backoff_until - self._clock.now()
                if pause <= 0:
                    for index in picker.next_requests(key, self._clock.now()):
                        task = asyncio.create_task(self._fetch_piece(d, rec, index))
                        inflight[task] = index
                        d.tasks[(key, index)] = task
                if not inflight:
                    if pause > 0:
                        await asyncio.sleep(pause)  # the peer said busy: back off
                        continue
                    # Nothing this peer has is missing, and nothing may come back.
                    if not picker.can_finish() and not any(
                        picker.outstanding(p) for p in picker.peers
                    ):
                        break
                    await d.changed.wait()
                    continue
                done, _ = await asyncio.wait(
                    inflight,
                    timeout=pause if pause > 0 else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    index = inflight.pop(task)
                    if d.tasks.get((key, index)) is task:
                        del d.tasks[(key, index)]
                    self._on_outcome(d, rec, index, task, progress)
        finally:
            for task in inflight:
                task.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
            for index in inflight.values():
                d.tasks.pop((key, index), None)
            picker.drop_peer(key)
            d.wake()

    async def _ask_have(self, d: _Download, rec: ProviderRecord) -> tuple[bool, set[int] | None]:
        """Whether the peer can serve this download, and its pieces (None: all)."""
        info = d.peers[rec.node_id]
        try:
            reply = await self._request(rec, GetHave(d.resource_id), self._config.piece_timeout)
        except P2PError as exc:
            info.last_error = str(exc) or type(exc).__name__
            return False, None
        if isinstance(reply, ErrorReply):
            info.last_error = f"{reply.code}: {reply.message}"
            return False, None
        if not isinstance(reply, Have) or reply.resource_id != d.resource_id:
            info.last_error = "answered GetHave with something else"
            d.picker.ban_peer(rec.node_id)
            return False, None
        if reply.complete:
            return True, None
        held = bitfield_to_set(reply.bitfield, d.manifest.piece_count)
        if held is None:
            info.last_error = "sent a malformed bitfield"
            d.picker.ban_peer(rec.node_id)
            return False, None
        if not held:
            info.last_error = "has no pieces yet"
            return False, None
        return True, held

    async def _fetch_piece(self, d: _Download, rec: ProviderRecord, index: int) -> str:
        """Ask for a piece, verify it and write it. Returns "ok", "bad" (failed
        verification) or "dup" (no longer needed); raises on request errors."""
        reply = await self._request(rec, GetPiece(d.resource_id, index), self._config.piece_timeout)
        if not isinstance(reply, PieceData) or reply.resource_id != d.resource_id:
            raise _BadAnswer("answered GetPiece with something else")
        if reply.index != index:
            raise _BadAnswer(f"sent piece {reply.index} for {index}")
        if not d.picker.is_missing(index):
            return "dup"
        loop = asyncio.get_running_loop()
        try:
            ok = await loop.run_in_executor(
                self._executor, d.writer.verify_and_write, index, reply.data
            )
        except OSError as exc:
            raise storage_error(exc, d.resource.root) from None
        return "ok" if ok else "bad"

    def _on_outcome(
        self,
        d: _Download,
        rec: ProviderRecord,
        index: int,
        task: asyncio.Task[str],
        progress: ProgressCallback | None,
    ) -> None:
        key = rec.node_id
        picker = d.picker
        info = d.peers[key]
        if task.cancelled():
            return  # an endgame duplicate we no longer need
        failure = task.exception()
        if failure is not None:
            info.last_error = str(failure) or type(failure).__name__
            if isinstance(failure, StorageError):
                raise failure
            if isinstance(failure, RemoteError):
                if failure.code == ErrorCode.BUSY:
                    self._busy(d, info, key, index)
                elif failure.code == ErrorCode.NOT_FOUND:
                    picker.drop_peer(key)  # it no longer has the resource
                else:
                    picker.request_failed(key, index)  # internal, ...: strikes
            elif isinstance(failure, P2PTimeoutError):
                picker.request_failed(key, index)
            elif isinstance(failure, LimitExceeded):
                picker.drop_peer(key)
            elif isinstance(failure, ProtocolError | _BadAnswer):
                log.info("banning %s: %s", _who(rec), failure)
                picker.ban_peer(key)
            elif isinstance(failure, P2PError | OSError):
                picker.drop_peer(key)
            else:
                raise failure
            d.wake()
            return
        outcome = task.result()
        info.busy_since = None
        info.backoff_delay = 0.0
        if outcome == "bad":
            info.last_error = f"piece {index} failed verification"
            log.warning("banning %s: piece %d failed verification", _who(rec), index)
            picker.ban_peer(key)
            d.wake()
            return
        if outcome == "dup" or not picker.is_missing(index):
            picker.piece_done(key, index)  # a late endgame duplicate
            return
        for other in picker.piece_done(key, index):
            dup = d.tasks.pop((cast(bytes, other), index), None)
            if dup is not None:
                dup.cancel()
        d.done_bytes += d.manifest.piece_length(index)
        d.unrecorded.append(index)
        now = self._clock.now()
        if len(d.unrecorded) >= RECORD_BATCH or now - d.last_record >= RECORD_INTERVAL:
            self._record(d)
        if picker.done:
            d.wake()
        self._emit(d, progress)

    def _busy(self, d: _Download, info: _PeerInfo, key: bytes, index: int) -> None:
        """The peer is overloaded: put the piece back and pause asking it (doubling the
        pause each time); drop it only after busy_give_up seconds without a piece."""
        now = self._clock.now()
        if info.busy_since is None:
            info.busy_since = now
        if now - info.busy_since >= self._config.busy_give_up:
            d.picker.drop_peer(key)
            return
        d.picker.request_refused(key, index)
        if now >= info.backoff_until:
            info.backoff_delay = min(
                max(self._config.busy_backoff, info.backoff_delay * 2),
                self._config.busy_backoff_max,
            )
            info.backoff_until = now + info.backoff_delay

    def _record(self, d: _Download) -> None:
        """Commit the pieces verified and written since the last commit."""
        if d.unrecorded:
            self._store.record_pieces(d.resource_id, d.unrecorded)
            d.unrecorded = []
        d.last_record = self._clock.now()

    async def _request(self, rec: ProviderRecord, msg: Message, timeout: float) -> Message:
        return await self._host.request(PeerAddress(rec.node_id, rec.host, rec.port), msg, timeout)

    # -- progress ------------------------------------------------------------------

    def _emit(
        self,
        d: _Download,
        progress: ProgressCallback | None,
        *,
        force: bool = False,
        state: str = "downloading",
    ) -> None:
        now = self._clock.now()
        samples = d.samples
        if not samples or now - samples[-1][0] >= 0.1:
            samples.append((now, d.done_bytes))
        while len(samples) > 2 and now - samples[1][0] > RATE_WINDOW:
            samples.popleft()
        if progress is None:
            return
        if not force and now - d.last_progress < self._config.progress_interval:
            return
        d.last_progress = now
        t0, b0 = samples[0]
        rate = (d.done_bytes - b0) / (now - t0) if now > t0 else 0.0
        remaining = d.manifest.total_size - d.done_bytes
        eta = remaining / rate if rate > 0 else (0.0 if remaining == 0 else None)
        total = d.manifest.piece_count
        progress(
            Progress(
                resource_id=d.resource_id,
                name=d.name,
                done_bytes=d.done_bytes,
                total_bytes=d.manifest.total_size,
                pieces_done=total - len(d.picker.missing),
                pieces_total=total,
                rate=rate,
                peers=len(d.picker.peers),
                eta=eta,
                state=state,
            )
        )


def _same_place(dest: Path, existing: StoredResource) -> bool:
    """Whether ``dest`` names where the resource already is (itself, or the folder
    it would go into under its own name)."""
    dest = dest.expanduser().absolute()
    return existing.root in (dest, dest / existing.manifest.name)


def _intact(store: Store, rid: bytes) -> bool:
    """Whether a shared/complete resource's files are still as recorded."""
    src = store.source(rid)
    if src is None or src.stats is None:
        return False
    for path, want in zip(src.paths, src.stats, strict=True):
        try:
            st = os.stat(path)
        except OSError:
            return False
        if st.st_size != want.size or st.st_mtime_ns != want.mtime_ns:
            return False
    return True


def _first_p2p_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a failed task group: a P2PError if there is one."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(reversed(exc.exceptions))
        else:
            leaves.append(exc)
    for exc in leaves:
        if isinstance(exc, P2PError):
            return exc
    return group


def _who(rec: ProviderRecord) -> str:
    return f"{peer_id_to_str(rec.node_id)[:8]}@{rec.host}:{rec.port}"
