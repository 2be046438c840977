"""Piece picking for one download: pure, no clock, no I/O.

State rules:

- A piece is *missing* until ``piece_done``; a missing piece is *pending* when no
  peer has a request out for it, *in flight* otherwise.
- ``next_requests(peer)`` hands a peer pending pieces it has, rarest first
  (fewest peers known to have it, then lowest index, for disk locality), until it
  has ``window`` requests out. In normal mode a piece is out to one peer at a time.
- Endgame: once no piece is pending, a peer with spare slots is also given pieces
  already in flight elsewhere (at most ``endgame_copies`` requests per piece), so a
  slow peer cannot hold up the end. The first copy to arrive wins; ``piece_done``
  returns the other peers still asked for that piece so the caller can cancel or
  ignore their answers.
- A failed or timed-out request (the caller's request carries the timeout) puts
  the piece back (pending unless still in flight elsewhere) and counts a strike
  on the peer: its window halves; after ``max_failures`` strikes in a row the
  peer is dropped. A refused one ("busy")
  puts the piece back and halves the window without a strike. A success resets
  strikes and regrows the window by one.
- A peer that sent a piece failing verification is banned: dropped, its requests
  returned, and never given anything again (``add_peer`` refuses it).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

PeerKey = Hashable


@dataclass
class _Peer:
    have: set[int] | None  # None: has every piece
    window: int
    outstanding: set[int] = field(default_factory=set)
    strikes: int = 0


class Picker:
    def __init__(
        self,
        piece_count: int,
        *,
        done: Iterable[int] = (),
        window: int = 8,
        max_failures: int = 3,
        endgame_copies: int = 2,
    ) -> None:
        if window < 1 or endgame_copies < 1 or max_failures < 1:
            raise ValueError("window, endgame_copies and max_failures must be >= 1")
        self.piece_count = piece_count
        self.window = window
        self.max_failures = max_failures
        self.endgame_copies = endgame_copies
        self._missing: set[int] = set(range(piece_count)) - set(done)
        self._inflight: dict[int, set[PeerKey]] = {}
        self._peers: dict[PeerKey, _Peer] = {}
        self._banned: set[PeerKey] = set()
        # Rarest-first order over missing pieces; rebuilt when availability changes.
        self._complete_peers = 0
        self._partial_count: dict[int, int] = {}
        self._order: list[int] = []
        self._pos: dict[int, int] = {}
        self._scan_from = 0
        self._dirty = True

    # -- queries -----------------------------------------------------------------

    @property
    def done(self) -> bool:
        return not self._missing

    @property
    def missing(self) -> frozenset[int]:
        return frozenset(self._missing)

    @property
    def peers(self) -> list[PeerKey]:
        return list(self._peers)

    def is_missing(self, index: int) -> bool:
        return index in self._missing

    @property
    def banned(self) -> frozenset[PeerKey]:
        return frozenset(self._banned)

    @property
    def endgame(self) -> bool:
        return bool(self._missing) and len(self._inflight) == len(self._missing)

    def outstanding(self, peer: PeerKey) -> frozenset[int]:
        state = self._peers.get(peer)
        return frozenset(state.outstanding) if state else frozenset()

    def requesters(self, index: int) -> frozenset[PeerKey]:
        return frozenset(self._inflight.get(index, ()))

    def window_of(self, peer: PeerKey) -> int:
        return self._peers[peer].window

    def can_finish(self) -> bool:
        """Whether the peers known now have every missing piece between them."""
        if self._complete_peers:
            return True
        have: set[int] = set()
        for state in self._peers.values():
            if state.have is not None:
                have |= state.have
        return self._missing <= have

    # -- peers ------------------------------------------------------------------

    def add_peer(self, peer: PeerKey, have: Iterable[int] | None = None) -> bool:
        """Add a peer (``have=None``: it has everything). False if banned or known."""
        if peer in self._banned or peer in self._peers:
            return False
        self._peers[peer] = _Peer(None if have is None else set(have), self.window)
        self._count_have(self._peers[peer].have, +1)
        return True

    def drop_peer(self, peer: PeerKey) -> list[int]:
        """Forget a peer (gone, or too many failures); returns the pieces it had out."""
        state = self._peers.pop(peer, None)
        if state is None:
            return []
        self._count_have(state.have, -1)
        returned = list(state.outstanding)
        for index in returned:
            self._release(peer, index)
        return returned

    def ban_peer(self, peer: PeerKey) -> list[int]:
        """A peer sent bad data: drop it and never use it again."""
        self._banned.add(peer)
        return self.drop_peer(peer)

    # -- picking ----------------------------------------------------------------

    def next_requests(self, peer: PeerKey) -> list[int]:
        """Pieces to ask ``peer`` for now (already counted as requested)."""
        state = self._peers.get(peer)
        if state is None:
            return []
        room = state.window - len(state.outstanding)
        if room <= 0 or not self._missing:
            return []
        picked = self._pick_pending(state, room)
        if len(picked) < room and len(self._inflight) == len(self._missing):
            picked += self._pick_endgame(peer, state, room - len(picked), set(picked))
        for index in picked:
            state.outstanding.add(index)
            self._inflight.setdefault(index, set()).add(peer)
        return picked

    def _pick_pending(self, state: _Peer, room: int) -> list[int]:
        if self._dirty:
            self._rebuild_order()
        picked: list[int] = []
        order = self._order
        i = self._scan_from
        # Skip the leading run of pieces no longer pending (amortised O(1)).
        while i < len(order) and not self._is_pending(order[i]):
            i += 1
        self._scan_from = i
        while i < len(order) and len(picked) < room:
            index = order[i]
            if self._is_pending(index) and (state.have is None or index in state.have):
                picked.append(index)
                # Mark it taken right away so later checks in this loop skip it.
                self._inflight[index] = set()
            i += 1
        return picked

    def _pick_endgame(self, peer: PeerKey, state: _Peer, room: int, exclude: set[int]) -> list[int]:
        candidates = [
            (len(requesters), index)
            for index, requesters in self._inflight.items()
            if index not in exclude
            and index in self._missing
            and peer not in requesters
            and len(requesters) < self.endgame_copies
            and (state.have is None or index in state.have)
        ]
        candidates.sort()
        return [index for _, index in candidates[:room]]

    def _is_pending(self, index: int) -> bool:
        return index in self._missing and index not in self._inflight

    # -- outcomes ---------------------------------------------------------------

    def piece_done(self, peer: PeerKey | None, index: int) -> list[PeerKey]:
        """A verified copy of ``index`` arrived (from ``peer``; None: from elsewhere).

        Returns the other peers that still have a request out for it (endgame
        duplicates to cancel). A duplicate arrival (already done) returns [].
        """
        if peer is not None and peer in self._peers:
            state = self._peers[peer]
            if index in state.outstanding:
                state.strikes = 0
                state.window = min(self.window, state.window + 1)
        if index not in self._missing:
            if peer is not None:
                self._release(peer, index)
            return []
        self._missing.discard(index)
        others = [p for p in self._inflight.get(index, ()) if p != peer]
        for p in [*others, peer]:
            if p is not None:
                self._release(p, index)
        self._inflight.pop(index, None)
        return others

    def request_failed(self, peer: PeerKey, index: int) -> bool:
        """A request got an error or no answer. Returns True if the peer was dropped."""
        state = self._peers.get(peer)
        if state is None:
            return False
        if index not in state.outstanding:
            return False
        self._release(peer, index)
        state.strikes += 1
        state.window = max(1, state.window // 2)
        if state.strikes >= self.max_failures:
            self.drop_peer(peer)
            return True
        return False

    def request_refused(self, peer: PeerKey, index: int) -> None:
        """The peer said busy: the piece goes back and the peer's window halves, but it
        is not a strike (an overloaded peer is not a broken one)."""
        state = self._peers.get(peer)
        if state is None or index not in state.outstanding:
            return
        self._release(peer, index)
        state.window = max(1, state.window // 2)

    # -- internals --------------------------------------------------------------

    def _release(self, peer: PeerKey, index: int) -> None:
        state = self._peers.get(peer)
        if state is not None:
            state.outstanding.discard(index)
        requesters = self._inflight.get(index)
        if requesters is not None:
            requesters.discard(peer)
            if not requesters:
                del self._inflight[index]
                pos = self._pos.get(index)
                if pos is not None and pos < self._scan_from:
                    self._scan_from = pos

    def _count_have(self, have: set[int] | None, delta: int) -> None:
        if have is None:
            self._complete_peers += delta
        else:
            for index in have:
                self._partial_count[index] = self._partial_count.get(index, 0) + delta
        self._dirty = True

    def _rebuild_order(self) -> None:
        counts = self._partial_count
        base = self._complete_peers

        def key(index: int) -> tuple[bool, int, int]:
            available = base + counts.get(index, 0)
            # Pieces nobody has go last: scanning them is wasted work.
            return (available == 0, available, index)

        self._order = sorted(self._missing, key=key)
        self._pos = {index: pos for pos, index in enumerate(self._order)}
        self._scan_from = 0
        self._dirty = False
