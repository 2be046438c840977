"""Which providers a download tries first: pure, ``now`` passed in, no I/O.

A key can list many providers, most of them fake (issue 10, attack 2: random ids
at closed or silent ports). The ``ProviderRanking`` remembers, node-wide, how each
peer id did in past downloads, so the next download tries the promising ones
first and leaves the ones that just failed for last.

Rules:

- Per peer id it keeps: successes, consecutive failures, a back-off deadline and
  a smoothed round-trip time (``srtt``: the time a first request took, dial
  included; exponentially weighted like TCP's, weight ``RTT_WEIGHT``).
- Order of ``order(candidates, now)``, each tier stable:

  1. *good*: succeeded before, not backing off, ``srtt <= slow_rtt``; fastest first;
  2. *untried*: never seen, in the order given (the DHT's), then peers whose
     failures' back-off is over (fewest consecutive failures first);
  3. *slow*: succeeded before, ``srtt > slow_rtt``; fastest first;
  4. *backing off*: failed recently; the back-off ending soonest first.

- A failure starts a back-off of ``backoff * 2**(failures - 1)`` (capped at
  ``backoff_max``), longer for a peer that lied (``BAD``: a wrong manifest or
  piece, an answer out of protocol). A success clears failures and back-off.
- Memory is bounded: at most ``capacity`` peers, the least recently updated
  forgotten first (a forgotten peer is simply untried again).

Also here, per download: ``DialSlots`` (how many dials at once) and
``Relookup`` (when to ask the DHT for the providers again, and which fresh
records are worth a new attempt).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import TypeVar

PeerId = Hashable
T = TypeVar("T")

CAPACITY = 4096
BACKOFF = 30.0
BACKOFF_MAX = 3600.0
# A lie costs this many ordinary failures' worth of back-off.
BAD_FACTOR = 8
SLOW_RTT = 1.0
RTT_WEIGHT = 0.25


class Failure(StrEnum):
    """How an attempt with a provider went wrong."""

    UNREACHABLE = "unreachable"  # the dial failed (refused, no route, wrong id)
    TIMEOUT = "timeout"  # no answer in time (dial or request)
    UNAVAILABLE = "unavailable"  # answered, but it has no copy, or is busy/limited
    BAD = "bad"  # answered with a wrong manifest or piece, or out of protocol


class Tier(IntEnum):
    GOOD = 0
    UNTRIED = 1
    SLOW = 2
    BACKING_OFF = 3


@dataclass(slots=True)
class _Seen:
    successes: int = 0
    failures: int = 0  # consecutive
    backoff_until: float = 0.0
    srtt: float | None = None


class ProviderRanking:
    """Node-wide memory of provider outcomes (module rules)."""

    def __init__(
        self,
        *,
        capacity: int = CAPACITY,
        backoff: float = BACKOFF,
        backoff_max: float = BACKOFF_MAX,
        slow_rtt: float = SLOW_RTT,
    ) -> None:
        if capacity < 1 or backoff <= 0 or backoff_max < backoff or slow_rtt <= 0:
            raise ValueError("capacity >= 1, 0 < backoff <= backoff_max and slow_rtt > 0")
        self.capacity = capacity
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.slow_rtt = slow_rtt
        self._peers: OrderedDict[PeerId, _Seen] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    # -- outcomes ----------------------------------------------------------------

    def succeeded(self, peer: PeerId, rtt: float | None = None) -> None:
        """The peer answered usefully; ``rtt``: how long that first answer took."""
        seen = self._touch(peer)
        seen.successes += 1
        seen.failures = 0
        seen.backoff_until = 0.0
        if rtt is not None and rtt >= 0:
            seen.srtt = rtt if seen.srtt is None else seen.srtt + RTT_WEIGHT * (rtt - seen.srtt)

    def failed(self, peer: PeerId, failure: Failure, now: float) -> None:
        seen = self._touch(peer)
        seen.failures += 1
        factor = BAD_FACTOR if failure is Failure.BAD else 1
        delay = self.backoff * factor * 2.0 ** min(seen.failures - 1, 30)
        seen.backoff_until = now + min(delay, self.backoff_max)

    def _touch(self, peer: PeerId) -> _Seen:
        seen = self._peers.get(peer)
        if seen is None:
            seen = self._peers[peer] = _Seen()
            if len(self._peers) > self.capacity:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(peer)
        return seen

    # -- queries -----------------------------------------------------------------

    def tier(self, peer: PeerId, now: float) -> Tier:
        seen = self._peers.get(peer)
        if seen is None:
            return Tier.UNTRIED
        if seen.backoff_until > now:
            return Tier.BACKING_OFF
        if seen.successes and seen.failures == 0:
            return Tier.GOOD if (seen.srtt or 0.0) <= self.slow_rtt else Tier.SLOW
        return Tier.UNTRIED

    def srtt(self, peer: PeerId) -> float | None:
        seen = self._peers.get(peer)
        return None if seen is None else seen.srtt

    def order(self, candidates: Sequence[T], now: float, key: Callable[[T], PeerId]) -> list[T]:
        """``candidates`` (in the DHT's order), most promising first (module rules);
        ``key`` gives each one's peer id."""

        def rank(item: tuple[int, T]) -> tuple[int, float, int]:
            position, candidate = item
            peer = key(candidate)
            tier = self.tier(peer, now)
            seen = self._peers.get(peer)
            if seen is None:
                return (tier, 0.0, position)
            if tier is Tier.BACKING_OFF:
                return (tier, seen.backoff_until, position)
            if tier is Tier.UNTRIED:
                return (tier, float(seen.failures), position)
            return (tier, seen.srtt or 0.0, position)

        return [c for _, c in sorted(enumerate(candidates), key=rank)]


class DialSlots:
    """Which candidates a download may dial now: pure, ``now`` passed in.

    At most ``window`` attempts are *dialing* (started, no first answer yet, and
    younger than ``dial_timeout``), and at most ``limit`` are open in all. A dial
    older than ``dial_timeout`` stops holding a window slot: an address that
    never answers costs one dial timeout per slot, not one each in a row, while
    a slow honest peer keeps its full request timeout. When ``limit`` is reached
    with candidates left, ``stale(now)`` names the oldest such dial to give up.
    """

    def __init__(self, *, window: int, dial_timeout: float, limit: int) -> None:
        if window < 1 or limit < 1 or dial_timeout <= 0:
            raise ValueError("window and limit >= 1, dial_timeout > 0")
        self.window = window
        self.dial_timeout = dial_timeout
        self.limit = limit
        self._dialing: dict[Hashable, float] = {}  # started at; insertion order = age
        self._open: set[Hashable] = set()

    @property
    def open(self) -> int:
        return len(self._open)

    def start(self, key: Hashable, now: float) -> None:
        self._open.add(key)
        self._dialing[key] = now

    def answered(self, key: Hashable) -> None:
        """The attempt got its first answer: no longer dialing (still open)."""
        self._dialing.pop(key, None)

    def is_dialing(self, key: Hashable) -> bool:
        return key in self._dialing

    def is_stale(self, key: Hashable, now: float) -> bool:
        """Still dialing, past ``dial_timeout``."""
        started = self._dialing.get(key)
        return started is not None and now - started >= self.dial_timeout

    def end(self, key: Hashable) -> None:
        self._open.discard(key)
        self._dialing.pop(key, None)

    def fresh_dials(self, now: float) -> int:
        return sum(1 for t in self._dialing.values() if now - t < self.dial_timeout)

    def may_start(self, now: float) -> bool:
        return len(self._open) < self.limit and self.fresh_dials(now) < self.window

    def stale(self, now: float) -> Hashable | None:
        """The oldest dial past ``dial_timeout``, if any."""
        for key, started in self._dialing.items():
            if now - started >= self.dial_timeout:
                return key
        return None

    def next_change(self, now: float) -> float | None:
        """Seconds until a dial turns stale (a slot frees up); None: no dial."""
        ahead = [t + self.dial_timeout - now for t in self._dialing.values()]
        ahead = [a for a in ahead if a > 0]
        return min(ahead) if ahead else None


class Relookup:
    """When a download asks the DHT for its providers again, and which of the
    answers deserve a new attempt: pure, ``now`` passed in.

    A record looked up a moment ago can be stale: a NATed provider announces its
    relay addresses only once dial-backs found it private (seconds after it
    started), and holders keep them only once they have checked the relay. Its
    first record then names only the NAT's address, where a dial may hang until
    the handshake timeout. So:

    - A download is *stuck* when no candidate is left to try and every attempt
      still open is a dial past ``dial_timeout`` (or none is open). Then the
      providers are looked up again: at most ``attempts`` times in all, the n-th
      no sooner than ``delay * n`` after the previous lookup ended (the first
      lookup ended when the object was made), one at a time.
    - Of a lookup's answer, a record is tried only if it is *news*: a peer not
      tried yet, or one whose record now names an address (direct, or a relay)
      that no record tried for it named. The same record again is not news, so
      a lookup never makes us dial the same addresses twice, and attempts stay
      bounded by ``(attempts + 1)`` times the candidates one lookup may return.
      (Relay addresses come only from holders that proved the relay: see
      dht/core.py.)
    """

    def __init__(self, *, attempts: int, delay: float, now: float) -> None:
        if attempts < 0 or delay < 0:
            raise ValueError("attempts >= 0 and delay >= 0")
        self.attempts = attempts
        self.delay = delay
        self.made = 0  # lookups started
        self.running = False
        self._ended = now
        self._tried: dict[PeerId, set[Hashable]] = {}

    def tried(self, peer: PeerId, addresses: Iterable[Hashable]) -> None:
        """An attempt with ``peer`` at ``addresses`` started."""
        self._tried.setdefault(peer, set()).update(addresses)

    def is_news(self, peer: PeerId, addresses: Iterable[Hashable]) -> bool:
        seen = self._tried.get(peer)
        return seen is None or not seen.issuperset(addresses)

    def next_at(self) -> float | None:
        """When the next lookup may start; None: none may (all made, or one running)."""
        if self.running or self.made >= self.attempts:
            return None
        return self._ended + self.delay * (self.made + 1)

    def due(self, now: float, *, stuck: bool) -> bool:
        at = self.next_at()
        return stuck and at is not None and now >= at

    def start(self) -> None:
        if self.next_at() is None:
            raise RuntimeError("no lookup may start now")
        self.made += 1
        self.running = True

    def end(self, now: float) -> None:
        self.running = False
        self._ended = now
