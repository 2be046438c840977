"""One download: providers from the DHT, manifest from any, pieces from all at once.

Rules:

- Providers (up to ``max_providers_considered`` from the DHT, which a flood can
  fill with fakes) are tried most promising first, as the node-wide
  ``ProviderRanking`` orders them (exchange/ranking.py: past success, round-trip
  time, back-off after failures); every outcome is fed back to it. At most
  ``max_peers_per_download`` attempts are open at once, at most ``dial_window``
  of them still waiting for a first answer (``DialSlots``): a refused dial frees
  its slot at once, a silent one after ``dial_timeout``. When all fail, the
  error says how many were tried and counts why.
- The manifest is asked that way and accepted only if it hashes to the resource
  id (a provider sending other bytes is skipped). When every attempt failed or
  hangs in its dial past ``dial_timeout`` with no candidate left, the providers
  are looked up again (``Relookup``, exchange/ranking.py: spaced by
  ``rediscover_delay``, within the download's lookup budget, below), and the
  records naming addresses not tried yet (a provider that came up a moment ago
  announces its relays a few seconds after its first record) are tried beside
  the hanging dials; the pieces then use the freshest record of each provider.
  Bytes that hash to the id but fail parsing (a path escape...) end the download
  with ProtocolError: the resource itself is unsafe.
- Every provider gets one worker, started the same way (workers still dialing
  when the last piece arrives are stopped). It asks GetHave once (complete, or
  which pieces), then keeps up to ``requests_per_peer`` GetPiece requests in
  flight (fewer for large pieces: ``inflight_bytes_per_peer``), as the ``Picker``
  hands out pieces (rarest first; endgame races the last ones).
- Each request task also checks the answer against the piece hash and writes it
  (``PieceWriter``: O_DIRECT where possible), both in a worker thread, so the
  network never waits on the disk; verified pieces are committed to the store in
  small batches.
- What follows each request is decided by the pure ``DownloadPolicy``
  (exchange/policy.py); this module only classifies how the request ended
  (``PieceOutcome`` for an answer, ``FailureKind`` for an exception) and carries
  the decision out. In short: a peer whose piece fails verification, or that
  answers out of protocol, is banned; a peer that times out gets strikes and is
  dropped after ``max_failures``; a peer that says busy is paused with a doubling
  backoff (no strike) and dropped only after ``busy_give_up`` seconds without a
  piece; a peer whose connection fails is dropped. Its pieces go back to the
  others.
- Endgame: when a piece arrives, the other peers still asked for it (the
  picker's losers) have their slots freed at once, and their requests still
  waiting for the answer are cancelled: the connection sends the peer the mux's
  cancel (net/core.py), which stops the peer's read and sends nothing; a piece
  already on its way is dropped by the connection without a strike. A request
  whose answer came (being verified or written) ends on its own. The same goes
  for requests still out when the download completes; it waits up to
  ``DRAIN_GRACE`` for those (during the final sync), so none ends after the get
  returns. Counted: ``pieces_cancelled`` (requests cancelled before their
  answer), ``endgame_duplicate_bytes`` (piece bytes received for a piece
  already done); the connection counts ``cancels_sent``.
- When the picker has no peers left, the providers are looked up again (waiting
  longer each time); then the download fails with ``DownloadError``, keeping what
  it verified. A first lookup that finds nobody is repeated the same way, then
  ends in ``NotFoundError``.
- One lookup budget per download: ``1 + rediscover_attempts`` DHT lookups in all,
  whatever the stage (finding providers, the manifest, the pieces) that makes them
  (``PhaseReporter.left``), so the phase events count them against one total.
- The network is reached only through two small protocols: ``PeerRequester``
  (``PeerHost.request``) and ``ProviderFinder`` (``Discovery.find_providers`` /
  ``remove_provider``).
- Disk errors (ENOSPC...) end the download with ``StorageError``; the partial
  file and its records are kept, so running the same get again resumes.
- Only when every piece is verified is the partial moved to its destination.
- The progress callback gets byte ``Progress``: ``peers_used`` counts the peers
  that sent a verified piece (what to show: it does not drop to 0 as the workers
  end), ``peers`` those taking part at that instant; the phase callback, when the phase
  changes, a ``PhaseEvent`` (exchange/phase.py): each lookup (the first, and each made again,
  with why), each lookup's answer, the first provider of a round that answers the
  dial for the manifest (the manifest request dials first when the requester can:
  ``PeerHost.connect``). Plain data; the caller renders it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from p2pnode.clock import Clock
from p2pnode.errors import (
    DownloadError,
    HandshakeError,
    LimitExceeded,
    NotFoundError,
    P2PError,
    P2PTimeoutError,
    PeerUnreachable,
    ProtocolError,
    RemoteError,
    UsageError,
    VerificationError,
)
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.durable import TreeSync
from p2pnode.exchange.manifest import (
    Manifest,
    dht_key,
    resource_id_to_str,
)
from p2pnode.exchange.messages import (
    GetHave,
    GetManifest,
    GetPiece,
    Have,
    ManifestData,
    PieceData,
    bitfield_to_set,
)
from p2pnode.exchange.phase import LookupReason, PhaseEvent, PhaseReporter
from p2pnode.exchange.picker import Picker
from p2pnode.exchange.policy import (
    Action,
    DownloadPolicy,
    FailureKind,
    PieceOutcome,
    rediscover_delay,
)
from p2pnode.exchange.ranking import DialSlots, Failure, ProviderRanking, Relookup
from p2pnode.exchange.store import (
    ResourceState,
    StorageError,
    Store,
    StoredResource,
    copy_into_place,
    lay_out_partial,
    partial_path,
    storage_error,
)
from p2pnode.exchange.writer import PieceWriter, recheck_pieces
from p2pnode.identity import peer_id_to_str
from p2pnode.net.host import PeerAddress
from p2pnode.wire.messages import ErrorCode, ErrorReply, Message

if TYPE_CHECKING:
    from p2pnode.dht.discovery import ProviderRecord

log = logging.getLogger(__name__)

ProgressCallback = Callable[["Progress"], None]
# What the download does before the bytes (and when providers are looked up again):
# plain data, the caller renders it. A callback of its own, so a progress callback
# keeps getting Progress only.
PhaseCallback = Callable[[PhaseEvent], None]
RATE_WINDOW = 5.0
# Verified pieces are committed to the store in batches: at most this many, or this
# old (seconds). A crash loses at most that much work, never correctness.
RECORD_BATCH = 32
RECORD_INTERVAL = 0.5
# Examples of failed attempts quoted in an error message (the rest are counted).
QUOTED_FAILURES = 3


class _BadAnswer(Exception):
    """A peer answered out of protocol (wrong type, resource or index)."""


class PeerRequester(Protocol):
    """Sends one request to a peer and returns its answer (``PeerHost``)."""

    async def request(
        self, peer: PeerAddress, msg: Message, timeout: float | None = None
    ) -> Message: ...


class ProviderFinder(Protocol):
    """Finds who provides a key (``Discovery``); ``remove_provider`` stops our own
    announcement of a copy we no longer have."""

    async def find_providers(self, key: bytes, want: int = 20) -> list[ProviderRecord]: ...

    def remove_provider(self, key: bytes) -> None: ...


class DownloadState(StrEnum):
    DOWNLOADING = "downloading"  # pieces are arriving
    FINISHING = "finishing"  # all verified: syncing and moving into place
    DONE = "done"


@dataclass(frozen=True)
class Progress:
    resource_id: bytes
    name: str
    done_bytes: int
    total_bytes: int
    pieces_done: int
    pieces_total: int
    rate: float  # bytes per second, over the last few seconds
    # Peers taking part at this instant (answered GetHave, not dropped); 0 before the
    # first answers and once every piece is in (finishing, done). Kept for API
    # consumers; peers_used is the figure to show.
    peers: int
    eta: float | None  # seconds
    state: DownloadState = DownloadState.DOWNLOADING
    # Peers that sent at least one verified piece of this download so far: never
    # decreases; at "done", how many peers the download came from.
    peers_used: int = 0

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
            "peers_used": self.peers_used,
            "eta": None if self.eta is None else round(self.eta, 1),
            "state": self.state,
        }


# A finished download waits at most this long (seconds) for its abandoned endgame
# duplicates to end (cancelled ones end at once; one being verified or written
# takes that long), so that none ends after the get returned; past it they
# still end on their own.
DRAIN_GRACE = 1.0

ENDGAME_COUNTERS = ("pieces_cancelled", "endgame_duplicate_bytes")

# With fsync on, writeback of page-cached bytes is started every this many bytes
# written, so it overlaps the transfer instead of following it.
FLUSH_EVERY = 64 * 1024 * 1024


# --- the download -----------------------------------------------------------------


@dataclass
class _PeerInfo:
    record: ProviderRecord
    last_error: str = ""
    why: str = ""  # last_error's label (_attempt_failure), counted in the final message
    gave_up: bool = False  # we stopped its dial to give the slot to another candidate


@dataclass
class _Download:
    resource_id: bytes
    manifest: Manifest
    resource: StoredResource
    picker: Picker
    policy: DownloadPolicy
    writer: PieceWriter
    name: str
    done_bytes: int
    peers: dict[bytes, _PeerInfo] = field(default_factory=dict)
    tasks: dict[tuple[bytes, int], asyncio.Task[PieceOutcome]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    last_progress: float = -1e18
    # Verified and written, not yet committed to the store (committed in batches).
    unrecorded: list[int] = field(default_factory=list)
    last_record: float = 0.0
    # Requests whose piece came from another peer: their outcome only counts, it
    # decides nothing.
    abandoned: set[asyncio.Task[PieceOutcome]] = field(default_factory=set)
    # Piece tasks still waiting for their answer (what a cancel can stop).
    asking: set[asyncio.Task[Any]] = field(default_factory=set)
    # Each worker's wake-up for an abandoned request (see _peer_worker).
    kicks: dict[bytes, asyncio.Future[None]] = field(default_factory=dict)
    # The download's phase events and lookup budget (lookups again while pieces are
    # missing): _transfer sets the fetch's own.
    phases: PhaseReporter = field(default_factory=lambda: PhaseReporter(b"", None))
    # Peers that sent at least one verified piece of this download (Progress.peers_used).
    used: set[bytes] = field(default_factory=set)

    def wake(self) -> None:
        """Wake idle workers: pieces came back, a peer joined, or we are done."""
        self.changed.set()
        self.changed = asyncio.Event()


class Fetcher:
    """The asyncio shell of downloads (see the module rules); one per ``get``."""

    def __init__(
        self,
        *,
        store: Store,
        requester: PeerRequester,
        providers: ProviderFinder,
        config: ExchangeConfig,
        clock: Clock,
        executor: Executor | None,
        own_node_id: bytes | None = None,
        counters: Counter[str] | None = None,
        ranking: ProviderRanking | None = None,
    ) -> None:
        # pieces_fetched, bytes_fetched, pieces_failed_verification (the node's metrics)
        self.counters: Counter[str] = Counter() if counters is None else counters
        for name in ENDGAME_COUNTERS:  # listed in the metrics even while zero
            self.counters.setdefault(name, 0)
        self._store = store
        self._requester = requester
        self._providers = providers
        self._config = config
        self._clock = clock
        self._executor = executor
        self._own = own_node_id
        # Node-wide: what past downloads learned of each provider.
        # The node's ranking (Exchange owns one), so a get learns from earlier ones.
        self._ranking = ProviderRanking() if ranking is None else ranking
        # Abandoned requests still ending: the download waits DRAIN_GRACE for them.
        self._draining: set[asyncio.Task[Any]] = set()

    # -- entry point ------------------------------------------------------------------

    async def fetch(
        self,
        resource_id: bytes,
        dest: Path,
        *,
        force: bool = False,
        progress: ProgressCallback | None = None,
        phase: PhaseCallback | None = None,
    ) -> StoredResource:
        rid = resource_id
        rid_text = resource_id_to_str(rid)
        t_start = time.perf_counter()
        existing = self._store.get(rid)
        if existing is not None and existing.state is not ResourceState.PARTIAL:
            if existing.served and existing.stale is None and _intact(self._store, rid):
                return await self._copy_local(existing, dest, force=force)
            # We had it, but it changed or went away: forget that copy, fetch anew.
            self._store.remove(rid)
            self._providers.remove_provider(dht_key(rid))
            existing = None
        providers: list[ProviderRecord] | None = None
        # One lookup budget for the whole download (exchange/phase.py): finding the
        # providers, asking for the manifest and the pieces all draw on it.
        phases = PhaseReporter(rid, phase, budget=1 + self._config.rediscover_attempts)
        if existing is not None:
            manifest = existing.manifest
        else:
            started = self._clock.now()
            phases.lookup()
            providers = await self._find_providers(rid)
            while not providers:
                # A lookup can miss under loss or churn: ask again before giving up.
                delay = rediscover_delay(self._config, phases.made - 1)
                if delay is None or not phases.left:
                    raise NotFoundError(
                        f"no providers found for {rid_text}: {phases.made} DHT lookups "
                        f"over {self._clock.now() - started:.1f}s found none "
                        f"(is a node that shares it running and joined to this network?)"
                    )
                phases.lookup(reason=LookupReason.NONE_FOUND)
                await asyncio.sleep(delay)
                providers = await self._find_providers(rid)
            phases.found(len(providers))
            manifest, providers = await self._fetch_manifest(rid, providers, phases)
        dest = self._resolve_dest(dest, manifest, existing, force=force)
        self._store.claim_dest(dest)
        try:
            return await self._download(
                rid, manifest, dest, existing, providers, force, progress, t_start, phases
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
        phases: PhaseReporter,
    ) -> StoredResource:
        self._check_space(dest, manifest, existing)
        resource = self._store.begin_download(manifest, dest, lay_out=False)
        # Creating thousands of files can take seconds on a slow disk: not on the loop.
        loop = asyncio.get_running_loop()
        lost = await loop.run_in_executor(self._executor, lay_out_partial, manifest, resource.root)
        if lost:
            self._store.forget_pieces(rid, self._store.verified_pieces(rid))
        await self._recheck(resource)
        resource = self._store.get(rid) or resource
        verified = self._store.verified_pieces(rid)
        by_bytes = self._config.inflight_bytes_per_peer // manifest.piece_size
        picker = Picker(
            manifest.piece_count,
            done=verified,
            window=max(1, min(self._config.requests_per_peer, max(2, by_bytes))),
            max_failures=self._config.max_failures,
            endgame_copies=self._config.endgame_copies,
        )
        done_bytes = sum(manifest.piece_length(i) for i in verified)
        # Opened before any piece is written, so the final sync reports any writeback
        # error of this download (exchange/durable.py).
        try:
            durable = TreeSync(resource.root)
        except OSError as exc:
            raise storage_error(exc, resource.root) from None
        try:
            return await self._transfer(
                rid, manifest, resource, verified, picker, done_bytes, durable,
                providers, force, progress, t_start, phases,
            )  # fmt: skip
        finally:
            durable.close()

    async def _transfer(
        self,
        rid: bytes,
        manifest: Manifest,
        resource: StoredResource,
        verified: set[int],
        picker: Picker,
        done_bytes: int,
        durable: TreeSync,
        providers: list[ProviderRecord] | None,
        force: bool,
        progress: ProgressCallback | None,
        t_start: float,
        phases: PhaseReporter,
    ) -> StoredResource:
        rid_text = resource_id_to_str(rid)
        writer = PieceWriter(
            manifest,
            resource.root,
            direct=self._config.direct_io,
            flush_every=FLUSH_EVERY if self._config.fsync else 0,
        )
        policy = DownloadPolicy(self._config, picker)
        d = _Download(rid, manifest, resource, picker, policy, writer, manifest.name, done_bytes)
        d.phases = phases
        self._emit(d, progress, force=True)
        t_transfer = time.perf_counter()
        try:
            if not picker.done:
                if providers is None:
                    phases.lookup()
                    providers = await self._find_providers(rid)
                    phases.found(len(providers))
                if not providers:
                    raise NotFoundError(
                        f"no providers found for {rid_text} ({phases.made} DHT lookup(s)); "
                        f"{len(verified)} of {manifest.piece_count} pieces kept for later"
                    )
                t_transfer = time.perf_counter()
                await self._run(d, providers, progress)
        finally:
            self._record(d)
            writer.close()
        t_sync = time.perf_counter()
        self._emit(d, progress, force=True, state=DownloadState.FINISHING)
        # The cancelled duplicates' answers, while the file is synced (see DRAIN_GRACE).
        settling = asyncio.ensure_future(self._settle())
        try:
            if self._config.fsync:
                loop = asyncio.get_running_loop()
                try:
                    await loop.run_in_executor(
                        self._executor, durable.sync, resource.root, manifest
                    )
                except OSError as exc:
                    raise storage_error(exc, resource.root) from None
        except BaseException:
            settling.cancel()  # failing or stopped: no reason to wait for them
            raise
        await settling
        self._store.finish_download(rid, force=force, fsync=False)
        final = self._store.get(rid)
        assert final is not None
        self._emit(d, progress, force=True, state=DownloadState.DONE)
        t_end = time.perf_counter()
        log.info(
            "got %s (%d bytes) to %s: lookup+manifest+recheck %.3fs, pieces %.3fs (%.1f MB/s), "
            "fsync+rename %.3fs, from %d peer(s) (%d tried)",
            rid_text,
            manifest.total_size,
            final.root,
            t_transfer - t_start,
            t_sync - t_transfer,
            (manifest.total_size - done_bytes) / max(t_sync - t_transfer, 1e-9) / 1e6,
            t_end - t_sync,
            len(d.used),
            len(d.peers),
        )
        return final

    # -- providers and manifest -------------------------------------------------------

    async def _find_providers(self, rid: bytes) -> list[ProviderRecord]:
        want = self._config.max_providers_considered
        try:
            found = await self._providers.find_providers(dht_key(rid), want=want)
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

    async def _fetch_manifest(
        self, rid: bytes, providers: Sequence[ProviderRecord], phases: PhaseReporter
    ) -> tuple[Manifest, list[ProviderRecord]]:
        """Ask providers for the manifest of ``rid``, most promising first and several
        at once (``DialSlots``: one that never answers holds a slot for
        ``dial_timeout`` only), until one sends bytes that hash to ``rid``. When
        every attempt failed or hangs in its dial, the providers are looked up again
        (``Relookup``: bounded) and the records that name new addresses are tried.
        Returns the manifest and the providers, the freshest record of each; reports
        the lookups, and the first provider of each round that answers the dial,
        to ``phases``."""
        config = self._config
        known = {rec.node_id: rec for rec in providers}
        queue = deque(self._rank(providers))
        slots = DialSlots(
            window=config.dial_window,
            dial_timeout=config.dial_timeout,
            limit=config.max_peers_per_download,
        )
        # Lookups again draw on the download's budget (what finding them left).
        relookup = Relookup(
            attempts=phases.left, delay=config.rediscover_delay, now=self._clock.now()
        )
        tally = _Tally()
        running: dict[asyncio.Task[Message], tuple[ProviderRecord, float]] = {}
        given_up: list[asyncio.Task[Message]] = []
        lookup: asyncio.Task[list[ProviderRecord]] | None = None
        winner: bytes | None = None
        try:
            while True:
                now = self._clock.now()
                if queue and slots.open >= slots.limit:
                    stale = slots.stale(now)
                    if stale is not None:
                        # Every slot is taken and a dial is past dial_timeout: let the
                        # next candidate have its slot.
                        task = cast(asyncio.Task[Message], stale)
                        rec, _ = running.pop(task)
                        slots.end(task)
                        task.cancel()
                        given_up.append(task)
                        self._note_failure(rec, _gave_up(config), tally)
                while queue and slots.may_start(now):
                    rec = queue.popleft()
                    relookup.tried(rec.node_id, _addresses(rec))
                    task = asyncio.create_task(self._ask_manifest(rid, rec, phases))
                    running[task] = (rec, now)
                    slots.start(task, now)
                stuck = not queue and all(slots.is_stale(task, now) for task in running)
                if lookup is None and relookup.due(now, stuck=stuck):
                    relookup.start()
                    log.info(
                        "%s: %s; looking its providers up again (%d of %d)",
                        resource_id_to_str(rid),
                        "no provider answered yet" if running else "every provider failed",
                        relookup.made,
                        relookup.attempts,
                    )
                    phases.lookup(reason=LookupReason.UNREACHABLE, failed=tally.total)
                    lookup = asyncio.create_task(self._find_providers(rid))
                waiting: list[asyncio.Future[Any]] = [*running]
                if lookup is not None:
                    waiting.append(lookup)
                # Wake when a dial turns stale: it frees a slot (candidates left) or
                # may make the download stuck (a lookup left); and when one is due.
                at = relookup.next_at()
                wake = [slots.next_change(now)] if queue or at is not None else []
                if stuck and at is not None:
                    wake.append(max(0.0, at - now))
                timeout = min((w for w in wake if w is not None), default=None)
                if not waiting:
                    if timeout is None:
                        break  # nothing running, nothing left to try or look up
                    await asyncio.sleep(timeout)
                    continue
                done, _ = await asyncio.wait(
                    waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for fut in done:
                    if fut is lookup:
                        lookup = None
                        relookup.end(self._clock.now())
                        fresh = cast("asyncio.Task[list[ProviderRecord]]", fut).result()
                        news = [r for r in fresh if relookup.is_news(r.node_id, _addresses(r))]
                        for rec in news:
                            known[rec.node_id] = rec
                        queue.extend(self._rank(news))
                        phases.found(len(fresh), new=len(news))
                        log.info(
                            "%s: the lookup found %d provider(s), %d with new addresses",
                            resource_id_to_str(rid),
                            len(fresh),
                            len(news),
                        )
                        continue
                    task = cast("asyncio.Task[Message]", fut)
                    rec, started = running.pop(task)
                    slots.end(task)
                    failure = task.exception()
                    if failure is not None:
                        if not isinstance(failure, P2PError):
                            raise failure
                        self._note_failure(rec, failure, tally)
                        continue
                    reply = task.result()
                    if not isinstance(reply, ManifestData) or reply.resource_id != rid:
                        self._note_failure(rec, _BadAnswer("answered with something else"), tally)
                        continue
                    try:
                        manifest = Manifest.decode(reply.manifest, expected_id=rid)
                    except VerificationError as exc:
                        self._note_failure(rec, exc, tally)
                        continue
                    except ProtocolError as exc:
                        # Bytes that hash to the id but are unsafe (a path escape...): the
                        # resource itself is bad, every provider would send the same.
                        raise ProtocolError(
                            f"the manifest of {resource_id_to_str(rid)} is rejected: {exc}"
                        ) from None
                    self._ranking.succeeded(rec.node_id, self._clock.now() - started)
                    winner = rec.node_id
                    return manifest, list(known.values())
        finally:
            now = self._clock.now()
            for task, (rec, started) in running.items():
                task.cancel()
                if now - started >= config.dial_timeout and rec.node_id != winner:
                    # Silent past the dial timeout: the next get tries it later.
                    self._ranking.failed(rec.node_id, Failure.TIMEOUT, now)
            if lookup is not None:
                lookup.cancel()
            if running or given_up or lookup is not None:
                await asyncio.gather(
                    *running, *given_up, *([lookup] if lookup else []), return_exceptions=True
                )
        raise NotFoundError(
            f"no provider sent the manifest of {resource_id_to_str(rid)}: "
            f"{len(known)} provider(s) found in {phases.made} DHT lookup(s); "
            f"tried {tally.total} provider(s): {tally.summary()}"
        )

    async def _ask_manifest(
        self, rid: bytes, rec: ProviderRecord, phases: PhaseReporter
    ) -> Message:
        """GetManifest to ``rec``, within ``manifest_timeout`` in all. When the
        requester can dial on its own (``PeerHost.connect``), the dial comes first,
        so the phase says when a provider answered it (a dial can take seconds
        behind NAT: relays, hole punching)."""
        timeout = self._config.manifest_timeout
        connect = getattr(self._requester, "connect", None)
        if connect is not None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                async with asyncio.timeout(timeout):
                    conn = await connect(_peer_address(rec))
            except TimeoutError:
                raise P2PTimeoutError(f"no connection to {_who(rec)} within {timeout:g}s") from None
            via = getattr(conn, "via", None)
            phases.connected(_who(rec), via if isinstance(via, str) else None)
            timeout = max(0.001, timeout - (loop.time() - started))
        return await self._request(rec, GetManifest(rid), timeout)

    def _rank(self, providers: Sequence[ProviderRecord]) -> list[ProviderRecord]:
        return self._ranking.order(providers, self._clock.now(), key=_node_id)

    def _note_failure(self, rec: ProviderRecord, failure: BaseException, tally: _Tally) -> str:
        """Count a failed attempt with ``rec`` (for the error message) and remember it
        in the ranking; returns its label."""
        label, kind = _attempt_failure(failure)
        if kind is not None:
            self._ranking.failed(rec.node_id, kind, self._clock.now())
        tally.add(label, f"{_who(rec)}: {str(failure) or type(failure).__name__}")
        return label

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
        phases = d.phases
        # Lookups while dials hang (see _work_through) and when every peer is gone
        # (below) draw on the download's one budget (``phases.left``).
        relookup = Relookup(
            attempts=phases.left, delay=self._config.rediscover_delay, now=self._clock.now()
        )
        while True:
            await self._work_through(d, providers, progress, relookup)
            if d.picker.done:
                return
            decision = d.policy.when_no_peers(attempts)
            if decision.action is Action.GIVE_UP or not phases.left:
                break
            attempts += 1
            phases.lookup(reason=LookupReason.UNREACHABLE, failed=_failed_peers(d))
            await asyncio.sleep(decision.delay)
            providers = await self._find_providers(d.resource_id)
            phases.found(len(providers))
        missing = len(d.picker.missing)
        tally = _Tally()
        for info in d.peers.values():
            if info.last_error:
                tally.add(info.why or "other", f"{_who(info.record)}: {info.last_error}")
        lookups = phases.made
        reasons = (
            f" (tried {tally.total} provider(s), {lookups} DHT lookup(s): {tally.summary()})"
            if tally.total
            else f" ({lookups} DHT lookup(s))"
        )
        raise DownloadError(
            f"all providers of {resource_id_to_str(d.resource_id)} failed or went away "
            f"with {missing} of {d.manifest.piece_count} pieces missing; the verified pieces "
            f"are kept, run the same get again to resume{reasons}"
        )

    async def _work_through(
        self,
        d: _Download,
        providers: list[ProviderRecord],
        progress: ProgressCallback | None,
        relookup: Relookup,
    ) -> None:
        """One worker per provider, most promising first: at most
        ``max_peers_per_download`` at once, at most ``dial_window`` of them waiting for
        their first answer (``DialSlots``); returns when the download is complete
        (workers still dialing are stopped) or every candidate was tried and ended.
        When no candidate is left and every worker still dials past ``dial_timeout``,
        the providers are looked up again (``relookup``); a record naming new
        addresses replaces the worker still dialing its peer's old ones."""
        config = self._config
        queue = deque(r for r in self._rank(providers) if r.node_id not in d.picker.banned)
        slots = DialSlots(
            window=config.dial_window,
            dial_timeout=config.dial_timeout,
            limit=config.max_peers_per_download,
        )
        workers: dict[asyncio.Task[None], bytes] = {}
        waiter: asyncio.Task[Any] | None = None
        lookup: asyncio.Task[list[ProviderRecord]] | None = None
        # Workers stopped for a fresher record of their peer, started again once gone.
        replacing: dict[bytes, ProviderRecord] = {}
        try:
            while True:
                now = self._clock.now()
                if d.picker.done:
                    # Complete: peers still dialing would only hold the end up (those
                    # silent past the dial timeout are remembered as such).
                    for task, key in workers.items():
                        if slots.is_dialing(key):
                            task.cancel()
                            if slots.is_stale(key, now):
                                self._ranking.failed(key, Failure.TIMEOUT, now)
                elif queue:
                    stale = slots.stale(now) if slots.open >= slots.limit else None
                    if stale is not None:
                        # Every slot is taken and a dial is past dial_timeout: let the
                        # next candidate have its slot.
                        slots.answered(stale)
                        d.peers[cast(bytes, stale)].gave_up = True
                        next(t for t, k in workers.items() if k == stale).cancel()
                    while queue and slots.may_start(now):
                        rec = queue.popleft()
                        key = rec.node_id
                        if key in d.picker.banned or key in workers.values():
                            continue
                        relookup.tried(key, _addresses(rec))
                        d.peers[key] = _PeerInfo(rec)
                        slots.start(key, now)
                        task = asyncio.create_task(
                            self._peer_worker(d, rec, progress, partial(slots.answered, key))
                        )
                        workers[task] = key
                if not workers and lookup is None:
                    return  # (a lookup under way may still bring a provider back)
                stuck = (
                    not d.picker.done
                    and not queue
                    and all(slots.is_stale(key, now) for key in workers.values())
                )
                # What the budget still allows (lookups when every peer was gone used
                # some of it).
                relookup.attempts = relookup.made + d.phases.left
                if lookup is None and relookup.due(now, stuck=stuck):
                    relookup.start()
                    log.info(
                        "%s: no provider answered yet; looking its providers up again (%d of %d)",
                        resource_id_to_str(d.resource_id),
                        relookup.made,
                        relookup.attempts,
                    )
                    d.phases.lookup(reason=LookupReason.UNREACHABLE, failed=_failed_peers(d))
                    lookup = asyncio.create_task(self._find_providers(d.resource_id))
                at = relookup.next_at()
                wake = [slots.next_change(now)] if queue or at is not None else []
                if stuck and at is not None:
                    wake.append(max(0.0, at - now))
                waiter = asyncio.create_task(d.changed.wait())
                done, _ = await asyncio.wait(
                    [*workers, waiter, *([lookup] if lookup is not None else [])],
                    timeout=min((w for w in wake if w is not None), default=None),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waiter.cancel()
                for task in done:
                    if task is waiter:
                        continue
                    if task is lookup:
                        lookup = None
                        relookup.end(self._clock.now())
                        fresh = cast("asyncio.Task[list[ProviderRecord]]", task).result()
                        self._take_news(d, fresh, relookup, queue, slots, workers, replacing)
                        continue
                    key = workers.pop(task)
                    slots.end(key)
                    fresher = replacing.pop(key, None)
                    if fresher is not None:
                        queue.appendleft(fresher)  # (even if the worker ended first)
                    if task.cancelled():
                        if fresher is not None:
                            continue
                        info = d.peers[key]
                        if info.gave_up:
                            self._note_peer_failure(d, info.record, _gave_up(config))
                        continue
                    failure = task.exception()
                    if failure is not None:
                        raise failure
        except BaseException as exc:
            for task in workers:
                task.cancel()
            results = await asyncio.gather(*workers, return_exceptions=True)
            workers.clear()
            errors = [r for r in results if isinstance(r, BaseException)]
            if not isinstance(exc, asyncio.CancelledError) and errors:
                group = BaseExceptionGroup("download workers failed", [exc, *errors])
                raise _first_p2p_error(group) from None
            raise
        finally:
            if waiter is not None:
                waiter.cancel()
            if lookup is not None:
                lookup.cancel()
                await asyncio.gather(lookup, return_exceptions=True)

    def _take_news(
        self,
        d: _Download,
        fresh: list[ProviderRecord],
        relookup: Relookup,
        queue: deque[ProviderRecord],
        slots: DialSlots,
        workers: dict[asyncio.Task[None], bytes],
        replacing: dict[bytes, ProviderRecord],
    ) -> None:
        """A lookup's answer: records naming new addresses are queued; one for a
        peer whose worker still waits for its first answer stops that worker (it is
        started again with the new record once gone)."""
        news = [
            r
            for r in self._rank(fresh)
            if r.node_id not in d.picker.banned and relookup.is_news(r.node_id, _addresses(r))
        ]
        by_key = {key: task for task, key in workers.items()}
        for rec in news:
            task = by_key.get(rec.node_id)
            if task is None:
                queue.append(rec)
            elif slots.is_dialing(rec.node_id):
                # No first answer yet: dial the new record instead.
                replacing[rec.node_id] = rec
                task.cancel()
        d.phases.found(len(fresh), new=len(news))
        log.info(
            "%s: the lookup found %d provider(s), %d with new addresses",
            resource_id_to_str(d.resource_id),
            len(fresh),
            len(news),
        )

    async def _peer_worker(
        self,
        d: _Download,
        rec: ProviderRecord,
        progress: ProgressCallback | None,
        answered: Callable[[], None],
    ) -> None:
        key = rec.node_id
        picker = d.picker
        policy = d.policy
        usable, have = await self._ask_have(d, rec)
        answered()
        if not usable or not policy.join(key, have):
            d.wake()
            return
        d.wake()
        inflight: dict[asyncio.Task[PieceOutcome], int] = {}
        # Set when one of our requests is abandoned (its piece came from another
        # peer), so we stop waiting for it at once.
        loop = asyncio.get_running_loop()
        kick = d.kicks[key] = loop.create_future()
        try:
            while not picker.done and key in picker.peers:
                pause = policy.pause_left(key, self._clock.now())
                if pause <= 0:
                    for index in picker.next_requests(key):
                        task = asyncio.create_task(self._fetch_piece(d, rec, index))
                        inflight[task] = index
                        d.tasks[(key, index)] = task
                if not inflight:
                    if pause > 0:
                        await asyncio.sleep(pause)  # the peer said busy: back off
                        continue
                    if not policy.keep_waiting():
                        break  # nothing this peer has is missing, and none may come back
                    await d.changed.wait()
                    continue
                done, _ = await asyncio.wait(
                    [*inflight, kick],
                    timeout=pause if pause > 0 else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for fut in done:
                    if fut is kick:
                        continue
                    task = cast("asyncio.Task[PieceOutcome]", fut)
                    index = inflight.pop(task)
                    if d.tasks.get((key, index)) is task:
                        del d.tasks[(key, index)]
                    self._on_outcome(d, rec, index, task, progress)
                if kick.done():
                    kick = d.kicks[key] = loop.create_future()
                    for task in [t for t in inflight if t in d.abandoned]:
                        self._drain(d, inflight.pop(task), task)
        finally:
            d.kicks.pop(key, None)
            # Done: what is still out is a duplicate; let it end on its own (see
            # the module rules). Otherwise (the peer failed, we stop): cancel it.
            finishing = picker.done and not _being_cancelled()
            stopped = []
            for task, index in inflight.items():
                if finishing:
                    if task not in d.abandoned:
                        self._abandon(d, rec, index, task)
                    self._drain(d, index, task)
                else:
                    task.cancel()
                    stopped.append(task)
            if stopped:
                await asyncio.gather(*stopped, return_exceptions=True)
            for task in stopped:
                d.abandoned.discard(task)
            for index in inflight.values():
                d.tasks.pop((key, index), None)
            policy.leave(key)
            d.wake()

    async def _ask_have(self, d: _Download, rec: ProviderRecord) -> tuple[bool, set[int] | None]:
        """Whether the peer can serve this download, and its pieces (None: all)."""
        started = self._clock.now()
        try:
            reply = await self._request(rec, GetHave(d.resource_id), self._config.piece_timeout)
        except P2PError as exc:
            self._note_peer_failure(d, rec, exc)
            return False, None
        if isinstance(reply, ErrorReply):
            self._note_peer_failure(d, rec, RemoteError(reply.code, reply.message))
            return False, None
        if not isinstance(reply, Have) or reply.resource_id != d.resource_id:
            self._note_peer_failure(d, rec, _BadAnswer("answered GetHave with something else"))
            d.policy.ban(rec.node_id)
            return False, None
        self._ranking.succeeded(rec.node_id, self._clock.now() - started)
        if reply.complete:
            return True, None
        held = bitfield_to_set(reply.bitfield, d.manifest.piece_count)
        if held is None:
            self._note_peer_failure(d, rec, _BadAnswer("sent a malformed bitfield"))
            d.policy.ban(rec.node_id)
            return False, None
        if not held:
            d.peers[rec.node_id].last_error = "has no pieces yet"
            d.peers[rec.node_id].why = "has no pieces yet"
            return False, None
        return True, held

    def _note_peer_failure(self, d: _Download, rec: ProviderRecord, failure: BaseException) -> None:
        """A download's peer failed: its last error (for the final message), the ranking."""
        info = d.peers[rec.node_id]
        info.last_error = str(failure) or type(failure).__name__
        label, kind = _attempt_failure(failure)
        info.why = label
        if kind is not None:
            self._ranking.failed(rec.node_id, kind, self._clock.now())

    async def _fetch_piece(self, d: _Download, rec: ProviderRecord, index: int) -> PieceOutcome:
        """Ask for a piece, verify it and write it; raises on request errors."""
        task = asyncio.current_task()
        assert task is not None
        d.asking.add(task)
        try:
            reply = await self._request(
                rec, GetPiece(d.resource_id, index), self._config.piece_timeout
            )
        finally:
            d.asking.discard(task)
        if not isinstance(reply, PieceData) or reply.resource_id != d.resource_id:
            raise _BadAnswer("answered GetPiece with something else")
        if reply.index != index:
            raise _BadAnswer(f"sent piece {reply.index} for {index}")
        if not d.picker.is_missing(index):
            return PieceOutcome.DUPLICATE
        loop = asyncio.get_running_loop()
        try:
            ok = await loop.run_in_executor(
                self._executor, d.writer.verify_and_write, index, reply.data
            )
        except OSError as exc:
            raise storage_error(exc, d.resource.root) from None
        return PieceOutcome.OK if ok else PieceOutcome.BAD

    def _on_outcome(
        self,
        d: _Download,
        rec: ProviderRecord,
        index: int,
        task: asyncio.Task[PieceOutcome],
        progress: ProgressCallback | None,
    ) -> None:
        key = rec.node_id
        info = d.peers[key]
        if task in d.abandoned:
            d.abandoned.discard(task)
            self._count_abandoned(d, index, task)
            return
        if task.cancelled():
            return  # stopped with its peer
        failure = task.exception()
        if failure is not None:
            info.last_error = str(failure) or type(failure).__name__
            kind = _classify(failure)
            if kind is None:
                raise failure  # a bug, not a peer's doing
            decision = d.policy.on_failure(key, index, kind, self._clock.now())
            if decision.action is Action.FAIL:
                raise failure
            if decision.action in (Action.DROP, Action.BAN):
                self._note_peer_failure(d, rec, failure)
            if decision.action is Action.BAN:
                log.info("banning %s: %s", _who(rec), failure)
            d.wake()
            return
        outcome = task.result()
        decision = d.policy.on_piece(key, index, outcome)
        if outcome is PieceOutcome.BAD:
            self.counters["pieces_failed_verification"] += 1
        if decision.action is Action.BAN:
            self._note_peer_failure(d, rec, _BadAnswer(f"piece {index} failed verification"))
            log.warning("banning %s: piece %d failed verification", _who(rec), index)
            d.wake()
            return
        if decision.action is not Action.ACCEPT:
            if outcome is PieceOutcome.DUPLICATE:  # a late endgame duplicate
                self.counters["endgame_duplicate_bytes"] += d.manifest.piece_length(index)
            return
        for other in decision.cancel:
            other_key = cast(bytes, other)
            dup = d.tasks.pop((other_key, index), None)
            if dup is not None:
                self._abandon(d, d.peers[other_key].record, index, dup)
        d.done_bytes += d.manifest.piece_length(index)
        d.used.add(key)
        self.counters["pieces_fetched"] += 1
        self.counters["bytes_fetched"] += d.manifest.piece_length(index)
        d.unrecorded.append(index)
        now = self._clock.now()
        if len(d.unrecorded) >= RECORD_BATCH or now - d.last_record >= RECORD_INTERVAL:
            self._record(d)
        if d.picker.done:
            d.wake()
        self._emit(d, progress)

    # -- endgame cancels ------------------------------------------------------------

    def _abandon(
        self, d: _Download, rec: ProviderRecord, index: int, task: asyncio.Task[PieceOutcome]
    ) -> None:
        """``index`` came from elsewhere (its slot in the picker is already free):
        a request still waiting for ``rec``'s answer is cancelled (the peer is
        told and stops); one already answered ends on its own."""
        d.abandoned.add(task)
        kick = d.kicks.get(rec.node_id)
        if kick is not None and not kick.done():
            kick.set_result(None)
        if task in d.asking:
            task.cancel()

    async def _settle(self) -> None:
        """Wait a little for the abandoned requests still ending."""
        if self._draining:
            await asyncio.wait(set(self._draining), timeout=DRAIN_GRACE)

    def _drain(self, d: _Download, index: int, task: asyncio.Task[PieceOutcome]) -> None:
        """Leave an abandoned request to end after its worker; count how it ended."""
        if task.done():
            d.abandoned.discard(task)
            self._count_abandoned(d, index, task)
            return
        self._draining.add(task)

        def ended(task: asyncio.Task[PieceOutcome]) -> None:
            self._draining.discard(task)
            d.abandoned.discard(task)
            self._count_abandoned(d, index, task)

        task.add_done_callback(ended)

    def _count_abandoned(self, d: _Download, index: int, task: asyncio.Task[PieceOutcome]) -> None:
        if task.cancelled():
            self.counters["pieces_cancelled"] += 1
        elif task.exception() is None:
            # The piece came before it was abandoned: the bytes were spent all the same.
            self.counters["endgame_duplicate_bytes"] += d.manifest.piece_length(index)

    def _record(self, d: _Download) -> None:
        """Commit the pieces verified and written since the last commit."""
        if d.unrecorded:
            self._store.record_pieces(d.resource_id, d.unrecorded)
            d.unrecorded = []
        d.last_record = self._clock.now()

    async def _request(self, rec: ProviderRecord, msg: Message, timeout: float) -> Message:
        return await self._requester.request(_peer_address(rec), msg, timeout)

    # -- progress ------------------------------------------------------------------

    def _emit(
        self,
        d: _Download,
        progress: ProgressCallback | None,
        *,
        force: bool = False,
        state: DownloadState = DownloadState.DOWNLOADING,
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
                peers_used=len(d.used),
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


def _classify(failure: BaseException) -> FailureKind | None:
    """How a piece request failed, for the policy; None: not a peer's or disk's doing."""
    if isinstance(failure, StorageError):
        return FailureKind.STORAGE
    if isinstance(failure, RemoteError):
        if failure.code == ErrorCode.BUSY:
            return FailureKind.BUSY
        if failure.code == ErrorCode.NOT_FOUND:
            return FailureKind.NOT_FOUND
        return FailureKind.REMOTE
    if isinstance(failure, P2PTimeoutError):
        return FailureKind.TIMEOUT
    if isinstance(failure, LimitExceeded):  # a ProtocolError, but ours: checked first
        return FailureKind.LIMIT
    if isinstance(failure, ProtocolError | _BadAnswer):
        return FailureKind.PROTOCOL
    if isinstance(failure, P2PError | OSError):
        return FailureKind.CONNECTION
    return None


def _being_cancelled() -> bool:
    """Whether the current task is being cancelled (the download is stopping)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _who(rec: ProviderRecord) -> str:
    return f"{peer_id_to_str(rec.node_id)[:8]}@{rec.host}:{rec.port}"


def _failed_peers(d: _Download) -> int:
    return sum(1 for info in d.peers.values() if info.last_error)


def _peer_address(rec: ProviderRecord) -> PeerAddress:
    return PeerAddress(rec.node_id, rec.host, rec.port, rec.relays)


def _node_id(rec: ProviderRecord) -> bytes:
    return rec.node_id


def _addresses(rec: ProviderRecord) -> tuple[tuple[str, int] | tuple[str, int, bytes], ...]:
    """Where a record sends a dialer: its direct address, then its relays."""
    return ((rec.host, rec.port), *rec.relays)


def _gave_up(config: ExchangeConfig) -> P2PTimeoutError:
    return P2PTimeoutError(
        f"no answer within dial_timeout ({config.dial_timeout:g}s) while others waited"
    )


def _attempt_failure(failure: BaseException) -> tuple[str, Failure | None]:
    """A failed attempt's label (counted in error messages) and what the ranking
    remembers of it (None: nothing, it was not the peer's doing)."""
    if isinstance(failure, PeerUnreachable):
        return "cannot connect", Failure.UNREACHABLE
    if isinstance(failure, HandshakeError):
        return "handshake failed", Failure.UNREACHABLE
    if isinstance(failure, P2PTimeoutError):
        return "timed out", Failure.TIMEOUT
    if isinstance(failure, RemoteError):
        if failure.code == ErrorCode.NOT_FOUND:
            return "does not have it", Failure.UNAVAILABLE
        if failure.code == ErrorCode.BUSY:
            return "busy", None
        return "error answer", Failure.UNAVAILABLE
    if isinstance(failure, LimitExceeded):
        return "our limits", None
    if isinstance(failure, VerificationError | ProtocolError | _BadAnswer):
        return "bad answer", Failure.BAD
    if isinstance(failure, StorageError):
        return "our disk", None
    return "connection lost", Failure.UNREACHABLE


class _Tally:
    """Failed attempts counted by label, with the first few quoted."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.quoted: list[str] = []

    @property
    def total(self) -> int:
        return self.counts.total()

    def add(self, label: str, detail: str) -> None:
        self.counts[label] += 1
        if len(self.quoted) < QUOTED_FAILURES:
            self.quoted.append(detail)

    def summary(self) -> str:
        counts = ", ".join(f"{n} {label}" for label, n in self.counts.most_common())
        return f"{counts}; first: " + "; ".join(self.quoted) if self.quoted else counts
