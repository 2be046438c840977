"""A node-wide memory budget with per-peer shares. Pure, no I/O, O(1) per call.

Two scopes, after libp2p's resource manager (system > peer; its protocol and
stream scopes have no counterpart here: one request mux per connection):

- the system scope: every byte the node holds for its peers, ``total``;
- a peer scope: what one peer's work holds, ``per_peer``.

What is counted (by the connection shells and the piece server):

- pieces read for a peer and not yet handed to its connection (reserved with
  :meth:`MemoryBudget.try_reserve` before the read: refused work costs nothing);
- a connection's write side: its transport's buffer and the answers held for
  it while the transport is paused (:meth:`MemoryBudget.track`, accounting only:
  it was already admitted);
- a connection's receive buffers (the frame being received, which grows only
  with the bytes that arrive, and the read buffer), tracked the same way;
  pooled bodies are not (our own downloads keep them for speed; a quiet
  connection gives them back).

New work that would take the system or its peer over budget is refused:
``GetPiece`` is answered ``busy`` (counted ``rejected_memory``), so the asker
backs off or goes to another provider. A frame being received that grows past
a fair share (``total / max_connections``) while the system is over budget is
shed: its connection is closed (``closed_memory``). Otherwise nothing in flight
is dropped, so the overshoot is bounded by what was already admitted: one piece
per request in flight, each connection's transport buffer (``write_buffer_high +
max_frame``), and a receive body's last growth step.

The numbers (:class:`~p2pnode.net.config.NetLimits` ``memory_budget``,
``memory_per_peer``): libp2p's defaults give the system scope 128 MiB plus
1/8 of the memory above 1 GiB, and a peer 32 MiB (kubo caps the whole at half
the RAM). We keep one static pair, independent of the machine, so a node behaves
the same everywhere and the tests can reason about it: 256 MiB in all (a
machine that runs a node has that to spare; it is 5 peers downloading at full
speed, or 64 at 4 MiB in flight each) and 48 MiB per peer (an honest fetcher
keeps ``requests_per_peer`` = 8 pieces of at most 4 MiB in flight, 32 MiB,
plus one transport buffer, ``write_buffer_high + max_frame`` = 8 MiB, and is
never slowed by it; a peer pipelining 64 x 2 MiB gets about 20 at a time).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable

__all__ = ["MemoryBudget"]


class MemoryBudget:
    """Bytes held for peers, in all and per peer (see the module rules)."""

    def __init__(self, total: int, per_peer: int, counters: Counter[str] | None = None) -> None:
        self.total = total
        self.per_peer = per_peer
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.used = 0
        self.peak = 0
        self._peers: dict[Hashable, int] = {}

    def peer_used(self, peer: Hashable) -> int:
        return self._peers.get(peer, 0)

    def try_reserve(self, peer: Hashable, n: int) -> bool:
        """Hold ``n`` bytes for new work of ``peer``; False (counted) over budget."""
        held = self._peers.get(peer, 0)
        if self.used + n > self.total or held + n > self.per_peer:
            self.counters["rejected_memory"] += 1
            return False
        self._add(peer, held, n)
        return True

    @property
    def over(self) -> bool:
        """Whether the system scope holds more than its budget."""
        return self.used > self.total

    def track(self, peer: Hashable, n: int) -> None:
        """Count ``n`` more (or, negative, fewer) bytes held for ``peer``, no check."""
        if n:
            self._add(peer, self._peers.get(peer, 0), n)

    def release(self, peer: Hashable, n: int) -> None:
        self.track(peer, -n)

    def _add(self, peer: Hashable, held: int, n: int) -> None:
        held += n
        if held > 0:
            self._peers[peer] = held
        else:
            self._peers.pop(peer, None)
        self.used += n
        if self.used > self.peak:
            self.peak = self.used
