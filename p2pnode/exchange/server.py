"""The piece server: answers GetManifest / GetPiece / GetHave from the store.

Rules:

- A resource is answered for when the store serves it (shared or complete and
  not stale) or when it is a download in progress (only its verified pieces).
- A piece all in the page cache is read on the event loop (``read_cached``: a
  copy, no disk wait); others are read off disk in worker threads
  (``PieceSource.read``), at most ``max_reads`` at once (FIFO). Past ``max_queued``
  requests queued in all, a request is answered ``busy`` (so the asker backs off or
  tries elsewhere) unless its peer has fewer than ``min_per_peer`` queued: one peer
  (or a few) flooding the queue cannot starve the others. The queue is therefore
  bounded by ``max_queued + min_per_peer * connected peers``.
- With a ``memory`` budget (the PeerHost's, see ``p2pnode/net/memory.py``) a piece
  is read only once its size is reserved there for its peer; over the budget,
  in all or for that peer, the request is answered ``busy`` at once
  (``rejected_memory``): peers that read their answers slowly cannot make the
  node hold pieces without end. The reservation ends when the answer is handed
  to the connection, which counts it from then on (its write buffer).
- Before a shared file's piece is read its size and mtime are checked; if they
  changed the resource stops being served (``on_stale``) and the asker gets
  ``not_found``: a stale piece is never sent.
- A GetPiece its peer cancels (the request mux's cancel: the connection cancels
  its handler task) while it waits for a disk read (queued or reading in a
  thread: the thread's bytes are dropped) stops there, is not answered, and frees
  its queue slot and memory reservation at once (``reads_cancelled``). Reads
  from the page cache are answered on the spot, so there is nothing to stop and
  they cost no bookkeeping (the piece path stays as fast).
- Anything else gets an ``ErrorReply``: ``not_found`` for unknown ids or pieces we
  lack, ``bad_request`` for an index out of range, ``unsupported`` for message
  types this handler does not know.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor

from p2pnode.exchange.manifest import resource_id_to_str
from p2pnode.exchange.messages import (
    GetHave,
    GetManifest,
    GetPiece,
    Have,
    ManifestData,
    PieceData,
    bitfield_from,
)
from p2pnode.exchange.store import PieceSource, StaleError, Store
from p2pnode.net.memory import MemoryBudget
from p2pnode.wire.messages import ErrorCode, ErrorReply, Message

log = logging.getLogger(__name__)


class PieceServer:
    def __init__(
        self,
        store: Store,
        executor: Executor | None,
        *,
        on_stale: Callable[[bytes, str], None],
        max_reads: int = 4,
        max_queued: int = 256,
        min_per_peer: int = 2,
        cached_reads: bool = True,
        memory: MemoryBudget | None = None,
    ) -> None:
        self._memory = memory
        self._store = store
        self._executor = executor
        self._on_stale = on_stale
        self._reads = asyncio.Semaphore(max_reads)
        self._cached_reads = cached_reads
        self._max_queued = max_queued
        self._min_per_peer = min_per_peer
        self._pending = 0
        self._queued: Counter[bytes] = Counter()
        self.counters: Counter[str] = Counter()

    async def handle(self, remote: bytes, msg: Message) -> Message:
        if isinstance(msg, GetPiece):
            return await self._get_piece(remote, msg)
        if isinstance(msg, GetManifest):
            return self._get_manifest(msg)
        if isinstance(msg, GetHave):
            return self._get_have(msg)
        return ErrorReply(ErrorCode.UNSUPPORTED, f"{type(msg).__name__} is not handled here")

    def _get_manifest(self, msg: GetManifest) -> Message:
        if self._store.source(msg.resource_id) is None:
            return _not_found(msg.resource_id)
        data = self._store.manifest_bytes(msg.resource_id)
        if data is None:
            return _not_found(msg.resource_id)
        return ManifestData(msg.resource_id, data)

    def _get_have(self, msg: GetHave) -> Message:
        src = self._store.source(msg.resource_id)
        if src is None:
            return _not_found(msg.resource_id)
        if not src.partial:
            return Have(msg.resource_id, True, b"")
        held = self._store.verified_pieces(msg.resource_id)
        count = src.manifest.piece_count
        return Have(msg.resource_id, False, bitfield_from(held, count))

    def stats(self) -> dict[str, int]:
        out = {"pieces_served": 0, "bytes_served": 0, "rejected_busy": 0, "stale": 0}
        out.update(reads_cancelled=0)
        out.update(self.counters)
        out["piece_requests_queued"] = self._pending
        return out

    async def _get_piece(self, remote: bytes, msg: GetPiece) -> Message:
        rid = msg.resource_id
        src = self._store.source(rid)
        if src is None:
            return _not_found(rid)
        if not 0 <= msg.index < src.manifest.piece_count:
            return ErrorReply(
                ErrorCode.BAD_REQUEST,
                f"piece {msg.index} out of range (0..{src.manifest.piece_count - 1})",
            )
        if src.partial and msg.index not in self._store.verified_pieces(rid):
            return ErrorReply(ErrorCode.NOT_FOUND, f"piece {msg.index} not here yet")
        if self._pending >= self._max_queued and self._queued[remote] >= self._min_per_peer:
            self.counters["rejected_busy"] += 1
            return ErrorReply(ErrorCode.BUSY, "too many piece requests queued")
        memory = self._memory
        size = src.manifest.piece_size  # the last piece is smaller: an upper bound
        if memory is not None and not memory.try_reserve(remote, size):
            self.counters["rejected_memory"] += 1
            return ErrorReply(ErrorCode.BUSY, "node memory budget for peers is full")
        self._pending += 1
        self._queued[remote] += 1
        try:
            data = src.read_cached(msg.index) if self._cached_reads else None
            if data is None:
                data = await self._read_from_disk(msg, src)
        except asyncio.CancelledError:
            self.counters["reads_cancelled"] += 1  # the peer cancelled it (or left)
            raise
        except StaleError as exc:
            self.counters["stale"] += 1
            self._on_stale(rid, str(exc))
            return ErrorReply(ErrorCode.NOT_FOUND, "resource changed on disk; no longer served")
        except OSError as exc:
            log.warning("cannot read piece %d of %s: %s", msg.index, resource_id_to_str(rid), exc)
            return ErrorReply(ErrorCode.INTERNAL, "cannot read the piece")
        finally:
            if memory is not None:
                memory.release(remote, size)
            self._pending -= 1
            self._queued[remote] -= 1
            if self._queued[remote] <= 0:
                del self._queued[remote]
        self.counters["pieces_served"] += 1
        self.counters["bytes_served"] += len(data)
        return PieceData(rid, msg.index, data)

    async def _read_from_disk(self, msg: GetPiece, src: PieceSource) -> memoryview:
        """The piece, read in a worker thread (cancelling stops the wait; a read
        already running in its thread finishes there and its bytes are dropped)."""
        async with self._reads:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, src.read, msg.index)


def _not_found(rid: bytes) -> ErrorReply:
    return ErrorReply(ErrorCode.NOT_FOUND, f"{resource_id_to_str(rid)} is not served here")
