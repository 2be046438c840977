"""What a download does after each request: pure, ``now`` passed in, no I/O.

The ``Fetcher`` (the asyncio shell) turns every piece request's end into a
``PieceOutcome`` (an answer arrived) or a ``FailureKind`` (it raised), asks the
``DownloadPolicy`` and carries out the ``Decision``. The policy updates the
``Picker`` itself, so after a decision the picker already reflects it.

Rules:

- ``OK``: the piece counts; the other peers racing for it (endgame) are returned
  in ``Decision.cancel``. ``DUPLICATE`` (or OK for a piece already done): ignored.
- ``BAD`` (failed verification) and ``PROTOCOL`` (an out-of-protocol answer): the
  peer is banned for the rest of the download.
- ``TIMEOUT`` and ``REMOTE`` (the peer answered with an error other than busy or
  not found): a strike; the piece goes back for any peer; after ``max_failures``
  strikes in a row the peer is dropped (``Picker.request_failed``).
- ``BUSY``: the piece goes back, no strike; the peer is paused for
  ``busy_backoff``, doubling on each busy answer after a pause ends, up to
  ``busy_backoff_max``. Once a peer has been busy for ``busy_give_up`` seconds
  without delivering anything it is dropped. Any answer that carries a piece
  (good, duplicate or bad) ends the busy spell (the next one starts again from
  ``busy_backoff``); a pause under way still runs out.
- ``NOT_FOUND`` (it no longer has the resource), ``LIMIT`` (our own limits) and
  ``CONNECTION`` (dial or connection failed): the peer is dropped.
- ``STORAGE`` (our disk refused): the download fails.
- When no peer is left and pieces are missing, the providers are looked up again
  after ``rediscover_delay * n`` seconds for the n-th time, at most
  ``rediscover_attempts`` times (fewer when the download's one lookup budget,
  shared by all its stages, is spent: see ``Relookup`` in ranking.py); then the
  download gives up.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.picker import PeerKey, Picker


class PieceOutcome(StrEnum):
    """A piece request that got a piece back."""

    OK = "ok"  # verified and written
    DUPLICATE = "duplicate"  # no longer needed when it arrived (endgame)
    BAD = "bad"  # failed verification


class FailureKind(StrEnum):
    """A piece request that raised, classified by the shell."""

    TIMEOUT = "timeout"
    BUSY = "busy"
    NOT_FOUND = "not_found"
    REMOTE = "remote"  # any other error answer
    LIMIT = "limit"
    PROTOCOL = "protocol"
    CONNECTION = "connection"
    STORAGE = "storage"


class Action(StrEnum):
    ACCEPT = "accept"  # count the piece; cancel the requests in Decision.cancel
    IGNORE = "ignore"
    STRIKE = "strike"  # piece back to the others, peer keeps its (halved) window
    PAUSE = "pause"  # piece back; ask the peer nothing before Decision.until
    DROP = "drop"
    BAN = "ban"
    FAIL = "fail"  # end the download with the error
    REDISCOVER = "rediscover"  # look providers up again after Decision.delay
    GIVE_UP = "give_up"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    cancel: tuple[PeerKey, ...] = ()
    until: float = 0.0
    delay: float = 0.0


# The decisions without parameters, built once: one per piece adds up.
ACCEPT = Decision(Action.ACCEPT)
IGNORE = Decision(Action.IGNORE)
STRIKE = Decision(Action.STRIKE)
DROP = Decision(Action.DROP)
BAN = Decision(Action.BAN)
FAIL = Decision(Action.FAIL)
GIVE_UP = Decision(Action.GIVE_UP)


@dataclass
class _Busy:
    since: float | None = None
    delay: float = 0.0
    until: float = 0.0


def rediscover_delay(config: ExchangeConfig, attempts: int) -> float | None:
    """Seconds to wait before lookup number ``attempts + 1`` after the first; None:
    give up (``attempts`` repeats were already made)."""
    if attempts >= config.rediscover_attempts:
        return None
    return config.rediscover_delay * (attempts + 1)


class DownloadPolicy:
    """One download's policy (module rules): it makes the picker's outcome calls
    and keeps each peer's busy spell."""

    def __init__(self, config: ExchangeConfig, picker: Picker) -> None:
        self.config = config
        self.picker = picker
        self._busy: dict[PeerKey, _Busy] = {}

    # -- peers ------------------------------------------------------------------

    def join(self, peer: PeerKey, have: set[int] | None) -> bool:
        """A peer answered GetHave (None: it has everything). False: not usable."""
        self._busy.pop(peer, None)
        return self.picker.add_peer(peer, have)

    def leave(self, peer: PeerKey) -> None:
        """The peer's worker ended: its pieces go back to the others."""
        self._busy.pop(peer, None)
        self.picker.drop_peer(peer)

    def ban(self, peer: PeerKey) -> Decision:
        self._busy.pop(peer, None)
        self.picker.ban_peer(peer)
        return BAN

    def pause_left(self, peer: PeerKey, now: float) -> float:
        """Seconds the peer stays paused after a busy answer (<= 0: not paused)."""
        state = self._busy.get(peer)
        return state.until - now if state is not None else 0.0

    def keep_waiting(self) -> bool:
        """An idle peer (nothing it has is missing or pending): wait for pieces to
        come back, or leave when none can (nobody else has any out and the peers
        known cannot finish)."""
        picker = self.picker
        return picker.can_finish() or any(picker.outstanding(p) for p in picker.peers)

    # -- outcomes ---------------------------------------------------------------

    def on_piece(self, peer: PeerKey, index: int, outcome: PieceOutcome) -> Decision:
        """A request for ``index`` got a piece back, verified as ``outcome``."""
        state = self._busy.get(peer)
        if state is not None:
            # The busy spell is over; a pause already under way still runs out.
            state.since = None
            state.delay = 0.0
        if outcome is PieceOutcome.BAD:
            return self.ban(peer)
        if outcome is PieceOutcome.DUPLICATE or not self.picker.is_missing(index):
            self.picker.piece_done(peer, index)  # releases the request only
            return IGNORE
        others = self.picker.piece_done(peer, index)
        return Decision(Action.ACCEPT, cancel=tuple(others)) if others else ACCEPT

    def on_failure(self, peer: PeerKey, index: int, kind: FailureKind, now: float) -> Decision:
        """A request for ``index`` raised an error classified as ``kind``."""
        picker = self.picker
        if kind is FailureKind.STORAGE:
            return FAIL
        if kind is FailureKind.BUSY:
            return self._on_busy(peer, index, now)
        if kind in (FailureKind.TIMEOUT, FailureKind.REMOTE):
            if picker.request_failed(peer, index):
                self._busy.pop(peer, None)
                return DROP
            return STRIKE
        if kind is FailureKind.PROTOCOL:
            return self.ban(peer)
        # NOT_FOUND, LIMIT, CONNECTION: this peer is no use for now.
        self._busy.pop(peer, None)
        picker.drop_peer(peer)
        return DROP

    def _on_busy(self, peer: PeerKey, index: int, now: float) -> Decision:
        config = self.config
        state = self._busy.setdefault(peer, _Busy())
        if state.since is None:
            state.since = now
        if now - state.since >= config.busy_give_up:
            del self._busy[peer]
            self.picker.drop_peer(peer)
            return DROP
        self.picker.request_refused(peer, index)
        # Answers to requests sent before the pause began do not lengthen it again.
        if now >= state.until:
            state.delay = min(max(config.busy_backoff, state.delay * 2), config.busy_backoff_max)
            state.until = now + state.delay
        return Decision(Action.PAUSE, until=state.until)

    def when_no_peers(self, attempts: int) -> Decision:
        """Every peer is gone and pieces are missing, after ``attempts`` lookups again."""
        delay = rediscover_delay(self.config, attempts)
        if delay is None:
            return GIVE_UP
        return Decision(Action.REDISCOVER, delay=delay)
