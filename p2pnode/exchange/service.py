"""The exchange facade that node.py and the control API call.

Rules:

- ``start`` opens the store, installs the piece server as the PeerHost handler and
  starts one owned background task that announces every served resource (again
  whenever the DHT may have lost track, see ``announce_interval``) and checks
  shared files for changes. ``close`` ends it, waits for downloads to stop and
  closes the store. Interrupted downloads resume on the next ``get`` of the
  same id.
- Hashing (``share``), piece reads and writes run in threads; the event loop only
  coordinates.
- Downloads of one id are exclusive: a second ``get`` of an id being fetched is a
  UsageError.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pnode.clock import MONOTONIC, Clock
from p2pnode.errors import NotFoundError, P2PError, UsageError
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.fetcher import (
    DownloadError,
    Fetcher,
    PhaseCallback,
    Progress,
    ProgressCallback,
)
from p2pnode.exchange.manifest import build_manifest, dht_key, resource_id_to_str
from p2pnode.exchange.messages import GetHave, GetManifest, GetPiece
from p2pnode.exchange.messages import register as register_messages
from p2pnode.exchange.ranking import ProviderRanking
from p2pnode.exchange.server import PieceServer
from p2pnode.exchange.store import ResourceState, StaleError, StorageError, Store, StoredResource
from p2pnode.net.dispatch import routes_of
from p2pnode.tasks import TaskSet
from p2pnode.wire.messages import Message

if TYPE_CHECKING:
    from p2pnode.dht.discovery import Discovery, ProviderRecord
    from p2pnode.net.host import PeerHost

__all__ = [
    "DownloadError",
    "Exchange",
    "Progress",
    "ResourceInfo",
    "StaleError",
    "StorageError",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResourceInfo:
    resource_id: bytes
    name: str
    kind: str  # "file" or "dir"
    size: int
    state: ResourceState
    served: bool
    path: str  # where it is (shared path or destination; for partial: the destination)
    pieces_done: int
    pieces_total: int
    piece_size: int
    files: int
    stale: str | None = None
    empty_folders: int = 0
    # Set by ``share`` for a folder: how its symbolic links were handled.
    links: str | None = None

    @property
    def id(self) -> str:
        return resource_id_to_str(self.resource_id)

    @classmethod
    def from_stored(cls, res: StoredResource) -> ResourceInfo:
        m = res.manifest
        where = (
            res.dest if res.state is ResourceState.PARTIAL and res.dest is not None else res.root
        )
        return cls(
            resource_id=res.resource_id,
            name=m.name,
            kind=m.kind,
            size=m.total_size,
            state=res.state,
            served=res.served,
            path=str(where),
            pieces_done=res.pieces_done,
            pieces_total=m.piece_count,
            piece_size=m.piece_size,
            files=len(m.entries),
            stale=res.stale,
            empty_folders=len(m.empty_dirs),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "state": self.state,
            "served": self.served,
            "path": self.path,
            "pieces_done": self.pieces_done,
            "pieces_total": self.pieces_total,
            "piece_size": self.piece_size,
            "files": self.files,
            "empty_folders": self.empty_folders,
            "stale": self.stale,
        }
        if self.links is not None:
            out["links"] = self.links
        return out


class Exchange:
    """Content-addressed resources for one node: share, serve, find and download.

    It owns the store (``home``), the I/O thread pool, the piece server and the
    background task that announces what is served; a download runs as a
    ``Fetcher`` per ``get``. It reaches the network only through the ``host``
    (peer requests; it installs itself as the host's request handler and
    registers the exchange messages in the host's registry) and ``discovery``
    (provider records).

    Rules:

    - Nothing works before ``start`` or after ``close``: ``store`` (and so every
      call that needs it) raises ``P2PError`` then. ``close`` cancels the
      downloads (their verified pieces are kept), ends the background task,
      waits for disk work and closes the store.
    - A resource is served while it is shared or complete and unchanged on disk
      (a download in progress serves its verified pieces); a change noticed (by a
      read or ``check_stale``) stops serving and announcing it. ``unshare`` stops
      serving without forgetting it.
    - One download per resource id at a time; sharing an id being downloaded is
      refused (``UsageError``). A finished download is served and announced.
    - A ``get`` whose caller is cancelled stops its download; a download stopped
      because the exchange closes raises ``P2PError`` (run the same get again to
      resume).
    """

    def __init__(
        self,
        home: Path,
        config: ExchangeConfig,
        discovery: Discovery,
        host: PeerHost,
        tcp_port: int,
        clock: Clock = MONOTONIC,
    ) -> None:
        self._home = home
        self._config = config
        self._discovery = discovery
        self._host = host
        register_messages(host.registry)
        self._port = tcp_port
        self._clock = clock
        self._store: Store | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._server: PieceServer | None = None
        self._tasks = TaskSet("exchange")
        # Summed over every download; named from the start, so metrics always list them.
        self._ranking = ProviderRanking()  # node-wide: past success and RTT of providers
        self._fetch_counters: Counter[str] = Counter(
            pieces_fetched=0,
            bytes_fetched=0,
            pieces_failed_verification=0,
            pieces_cancelled=0,
            endgame_duplicate_bytes=0,
        )
        self._downloads: dict[bytes, asyncio.Task[StoredResource]] = {}
        self._announce_now = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._store = Store(self._home)
        self._executor = ThreadPoolExecutor(
            max(1, self._config.io_threads), thread_name_prefix="p2pnode-io"
        )
        self._server = PieceServer(
            self._store,
            self._executor,
            on_stale=self._stale,
            max_reads=self._config.serve_max_reads,
            max_queued=self._config.serve_max_queued,
            min_per_peer=self._config.serve_min_per_peer,
            cached_reads=self._config.serve_cached_reads,
            memory=self._host.memory,
        )
        # exchange requests reach handle(); other types go to their own owners
        routes_of(self._host).route((GetManifest, GetPiece, GetHave), self.handle)
        self._tasks.spawn(self._announce_loop(), "announce")
        if self._config.stale_check_interval > 0:
            self._tasks.spawn(self._watch_stale(), "stale-check")

    async def close(self) -> None:
        downloads = list(self._downloads.values())
        for task in downloads:
            task.cancel()
        await asyncio.gather(*downloads, self._tasks.close(), return_exceptions=True)
        self._downloads.clear()
        if self._executor is not None:
            # Waiting for in-flight disk work must not block the event loop.
            await asyncio.to_thread(self._executor.shutdown, True)
            self._executor = None
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def store(self) -> Store:
        if self._store is None:
            raise P2PError("the exchange is not started")
        return self._store

    async def handle(self, remote_node_id: bytes, msg: Message) -> Message:
        """The PeerHost request handler (GetManifest, GetPiece, GetHave)."""
        assert self._server is not None
        return await self._server.handle(remote_node_id, msg)

    def stats(self) -> dict[str, int]:
        """Counters for node.status(): pieces/bytes served, busy rejections, ..."""
        out = self._server.stats() if self._server is not None else {}
        out.update(self._fetch_counters)
        out["downloads_active"] = len(self._downloads)
        if self._store is not None:
            out["resources"] = len(self._store.resources())
        return out

    # -- sharing ------------------------------------------------------------------

    async def share(self, path: Path, *, follow_links: bool = False) -> ResourceInfo:
        """Hash and serve a file or folder. Symbolic links inside a folder are
        refused (UsageError naming the first one) unless ``follow_links``: then what
        a link inside the folder points to is shared as regular files and folders."""
        self.store  # noqa: B018 - fail early if not started
        workers = self._config.hash_workers or None
        manifest, listing = await asyncio.to_thread(
            partial(build_manifest, Path(path), workers=workers, follow_links=follow_links)
        )
        store = self.store  # the exchange may have closed while we hashed
        rid = manifest.resource_id
        if rid in self._downloads:
            raise UsageError(f"{resource_id_to_str(rid)} is being downloaded right now")
        store.add_shared(manifest, listing.root, listing.stats)
        await self._announce(rid)
        res = self.store.get(rid)  # the exchange may have closed while we announced
        assert res is not None
        log.info("sharing %s as %s", listing.root, resource_id_to_str(rid))
        info = ResourceInfo.from_stored(res)
        if manifest.kind == "dir":
            links = (
                f"followed: {listing.links_followed} link(s) inside the folder, shared as "
                "regular files and folders"
                if follow_links
                else "refused (none here); --follow-links shares what links inside the "
                "folder point to"
            )
            info = replace(info, links=links)
        return info

    async def unshare(self, resource_id: bytes) -> None:
        store = self.store
        res = store.get(resource_id)
        if res is None:
            raise NotFoundError(f"{resource_id_to_str(resource_id)} is not here")
        store.set_served(resource_id, False)
        self._discovery.remove_provider(dht_key(resource_id))

    def list(self) -> list[ResourceInfo]:
        return [ResourceInfo.from_stored(r) for r in self.store.resources()]

    async def providers(self, resource_id: bytes) -> builtins.list[ProviderRecord]:
        return list(await self._discovery.find_providers(dht_key(resource_id)))

    # -- downloading ----------------------------------------------------------------

    async def get(
        self,
        resource_id: bytes,
        dest: Path,
        *,
        force: bool = False,
        progress: ProgressCallback | None = None,
        phase: PhaseCallback | None = None,
    ) -> ResourceInfo:
        store = self.store
        if resource_id in self._downloads:
            raise UsageError(f"{resource_id_to_str(resource_id)} is already being downloaded")
        fetcher = Fetcher(
            store=store,
            requester=self._host,
            providers=self._discovery,
            config=self._config,
            clock=self._clock,
            executor=self._executor,
            own_node_id=self._host.node_id,
            counters=self._fetch_counters,
            ranking=self._ranking,
        )
        task = asyncio.create_task(
            fetcher.fetch(resource_id, Path(dest), force=force, progress=progress, phase=phase),
            name=f"exchange-get-{resource_id_to_str(resource_id)[:12]}",
        )
        self._downloads[resource_id] = task
        try:
            res = await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # Our caller went away: stop the download (verified pieces are kept).
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise
            # The download itself was stopped (the exchange is closing).
            raise P2PError(
                "the download was stopped because the node is stopping; "
                "run the same get again to resume"
            ) from None
        finally:
            if task.done():
                self._downloads.pop(resource_id, None)
        # The file is complete: announcing (a DHT lookup plus stores, slow under
        # churn) goes on in the background rather than delay the caller.
        self._tasks.spawn(
            self._announce(resource_id), f"announce-{resource_id_to_str(resource_id)[:12]}"
        )
        return ResourceInfo.from_stored(res)

    # -- announcing and staleness -------------------------------------------------

    async def _announce_loop(self) -> None:
        """Announce every served resource now (at least locally), again as soon as the
        DHT has contacts (the node joins after start), and every announce_interval."""
        last: float | None = None
        had_contacts = False
        while True:
            has_contacts = bool(self._discovery.contacts())
            now = self._clock.now()
            due = last is None or now - last >= self._config.announce_interval
            if due or (has_contacts and not had_contacts):
                for res in self.store.served():
                    await self._announce(res.resource_id)
                last = now
            had_contacts = has_contacts
            await asyncio.sleep(self._config.contact_poll_interval)

    async def _announce(self, resource_id: bytes) -> None:
        try:
            await self._discovery.add_provider(dht_key(resource_id), self._port)
        except P2PError as exc:
            log.warning("announcing %s failed: %s", resource_id_to_str(resource_id), exc)

    def _stale(self, resource_id: bytes, reason: str) -> None:
        if self._store is None:
            return
        log.warning(
            "%s is no longer served: %s (share it again to serve the new content)",
            resource_id_to_str(resource_id),
            reason,
        )
        self._store.mark_stale(resource_id, reason)
        self._discovery.remove_provider(dht_key(resource_id))

    async def check_stale(self) -> builtins.list[bytes]:
        """Stat every served shared/complete resource; stop serving the changed ones."""
        store = self.store
        changed: builtins.list[bytes] = []
        for res in store.served():
            src = store.source(res.resource_id)
            if src is None or src.partial:
                continue
            reason = await asyncio.to_thread(_first_change, src.paths, src.stats or ())
            if reason is not None and self._store is not None:
                self._stale(res.resource_id, reason)
                changed.append(res.resource_id)
        return changed

    async def _watch_stale(self) -> None:
        while True:
            await asyncio.sleep(self._config.stale_check_interval)
            await self.check_stale()


def _first_change(paths: Any, stats: Any) -> str | None:
    for path, want in zip(paths, stats, strict=True):
        try:
            st = os.stat(path)
        except OSError as exc:
            return f"{str(path)!r} is gone: {exc.strerror}"
        if st.st_size != want.size or st.st_mtime_ns != want.mtime_ns:
            return f"{str(path)!r} changed on disk since it was shared"
    return None
