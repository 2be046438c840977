"""Admission, limits and stream credit for served services: pure (time is an input).

``ServicesCore`` decides, call by call, whether a provider takes it:

- unknown name -> ``not_found``; wrong kind (a unary call to a stream service or
  the reverse) -> ``bad_request``; request larger than the service's
  ``max_request`` -> ``too_large``; a call id already in flight from that peer
  -> ``bad_request``;
- over the peer's calls per second for that service (a token bucket per peer),
  the service's ``concurrency``, the node's ``max_concurrent`` or the peer's
  ``max_concurrent_per_peer``, or with the node's memory budget spent ->
  ``overloaded``.

An admitted call is in flight until ``finish`` (whatever its outcome); every
refusal and every failed outcome is counted by code, per service and node-wide.

``StreamCredit`` is one stream's flow control and ending: the consumer grants
credit, the producer may produce only while ``produced < granted``, and at most
``max_credit`` items are granted ahead of what was delivered, so a slow
consumer bounds what the producer holds. A pull collects what is ready; the
stream ends cleanly (``end``) or with an error (``fail``, the first one wins),
and the error reaches the consumer alone, after every item produced before it.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum

from p2pnode import confcheck
from p2pnode.ratelimit import TokenBucket
from p2pnode.services.messages import MAX_CREDIT_PER_PULL, ServiceErrorCode

__all__ = [
    "Kind",
    "NodeServiceLimits",
    "Refusal",
    "ServiceLimits",
    "ServicesCore",
    "StreamCredit",
]

LATENCY_SAMPLES = 512


class Kind(StrEnum):
    UNARY = "unary"
    STREAM = "stream"


@dataclass(frozen=True)
class ServiceLimits:
    """What one served service accepts (defaults suit small RPCs)."""

    concurrency: int = 32  # calls (and open streams) running at once
    max_request: int = 1024 * 1024  # encoded request bytes
    max_reply: int = 1024 * 1024  # encoded reply (or stream item) bytes
    calls_per_second_per_peer: float = 200.0  # 0: no rate limit
    burst_per_peer: float = 200.0
    max_deadline: float = 300.0  # a longer deadline asked by a caller is cut to this
    max_credit: int = 64  # stream items granted ahead of delivery, at most

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_request < 1 or self.max_reply < 1:
            raise ValueError("concurrency, max_request and max_reply must be positive")
        if self.calls_per_second_per_peer < 0 or self.burst_per_peer < 1:
            raise ValueError("calls_per_second_per_peer >= 0 and burst_per_peer >= 1")
        if self.max_deadline <= 0 or not 1 <= self.max_credit <= MAX_CREDIT_PER_PULL:
            raise ValueError(f"max_deadline > 0 and max_credit in 1..{MAX_CREDIT_PER_PULL}")


@dataclass(frozen=True)
class NodeServiceLimits:
    """Limits across every service of a node."""

    max_concurrent: int = 256  # calls and open streams, all services
    max_concurrent_per_peer: int = 64  # one peer cannot take every slot
    stream_idle_timeout: float = 30.0  # a stream nobody pulls is ended
    max_rate_peers: int = 4096  # token buckets kept per service

    def __post_init__(self) -> None:
        # Part of NodeConfig (NodeConfig.services): a bad value names its field.
        confcheck.check_types(self)
        confcheck.at_least(self, 1, "max_concurrent", "max_concurrent_per_peer", "max_rate_peers")
        confcheck.positive(self, "stream_idle_timeout")


@dataclass(frozen=True, slots=True)
class Refusal:
    code: ServiceErrorCode
    message: str


@dataclass
class ServiceState:
    name: str
    kind: Kind
    idempotent: bool
    limits: ServiceLimits
    in_flight: int = 0
    calls: int = 0  # admitted
    ok: int = 0  # ended without an error (the others: errors, by code)
    announced_to: int = 0  # remote DHT nodes that took the last announcement
    errors: Counter[str] = field(default_factory=Counter)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    buckets: OrderedDict[bytes, TokenBucket] = field(default_factory=OrderedDict)

    def p50_ms(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return round(ordered[len(ordered) // 2] * 1000, 3)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": str(self.kind),
            "idempotent": self.idempotent,
            "calls": self.calls,
            "ok": self.ok,
            "errors": dict(self.errors),
            "p50_ms": self.p50_ms(),
            "in_flight": self.in_flight,
            "announced_to": self.announced_to,
        }


@dataclass(frozen=True, slots=True)
class _InFlight:
    service: str
    started: float


class ServicesCore:
    """The services a node serves and the calls in flight (module rules)."""

    def __init__(self, limits: NodeServiceLimits | None = None) -> None:
        self.limits = limits or NodeServiceLimits()
        self.services: dict[str, ServiceState] = {}
        self.in_flight = 0
        self.refused: Counter[str] = Counter()  # node-wide, by code
        self._per_peer: Counter[bytes] = Counter()
        self._calls: dict[tuple[bytes, int], _InFlight] = {}

    # -- what is served -------------------------------------------------------

    def add(self, name: str, kind: Kind, idempotent: bool, limits: ServiceLimits) -> None:
        """Serve ``name`` (replacing an earlier definition; its counters restart)."""
        self.services[name] = ServiceState(name, kind, idempotent, limits)

    def remove(self, name: str) -> bool:
        return self.services.pop(name, None) is not None

    # -- calls ----------------------------------------------------------------

    def admit(
        self,
        peer: bytes,
        call_id: int,
        name: str,
        kind: Kind,
        request_size: int,
        now: float,
        *,
        memory_full: bool = False,
    ) -> Refusal | ServiceState:
        """Take the call (it is then in flight until ``finish``) or say why not;
        ``memory_full``: the node's memory budget is spent (no new work)."""
        refusal = self._check(peer, call_id, name, kind, request_size, now)
        if refusal is None and memory_full:
            refusal = Refusal(ServiceErrorCode.OVERLOADED, "this node's memory budget is full")
        if refusal is not None:
            self.refused[refusal.code] += 1
            state = self.services.get(name)
            if state is not None:
                state.errors[refusal.code] += 1
            return refusal
        state = self.services[name]
        state.in_flight += 1
        state.calls += 1
        self.in_flight += 1
        self._per_peer[peer] += 1
        self._calls[(peer, call_id)] = _InFlight(name, now)
        return state

    def _check(
        self, peer: bytes, call_id: int, name: str, kind: Kind, request_size: int, now: float
    ) -> Refusal | None:
        state = self.services.get(name)
        if state is None:
            return Refusal(ServiceErrorCode.NOT_FOUND, f"no service {name!r} here")
        if state.kind is not kind:
            return Refusal(
                ServiceErrorCode.BAD_REQUEST, f"{name!r} is a {state.kind} service, not {kind}"
            )
        lim = state.limits
        if request_size > lim.max_request:
            return Refusal(
                ServiceErrorCode.TOO_LARGE,
                f"request of {request_size} bytes, {name!r} takes at most {lim.max_request}",
            )
        if (peer, call_id) in self._calls:
            return Refusal(ServiceErrorCode.BAD_REQUEST, f"call id {call_id} already in flight")
        if lim.calls_per_second_per_peer > 0 and not self._bucket(state, peer, now).take(now):
            return Refusal(
                ServiceErrorCode.OVERLOADED,
                f"{name!r} takes at most {lim.calls_per_second_per_peer:g} calls/s per peer",
            )
        if state.in_flight >= lim.concurrency:
            return Refusal(
                ServiceErrorCode.OVERLOADED, f"{name!r} is running {lim.concurrency} calls"
            )
        if self.in_flight >= self.limits.max_concurrent:
            return Refusal(
                ServiceErrorCode.OVERLOADED,
                f"this node is running {self.limits.max_concurrent} calls",
            )
        if self._per_peer[peer] >= self.limits.max_concurrent_per_peer:
            return Refusal(
                ServiceErrorCode.OVERLOADED,
                f"{self.limits.max_concurrent_per_peer} calls from you are running",
            )
        return None

    def _bucket(self, state: ServiceState, peer: bytes, now: float) -> TokenBucket:
        buckets = state.buckets
        bucket = buckets.get(peer)
        if bucket is None:
            lim = state.limits
            bucket = buckets[peer] = TokenBucket(
                lim.calls_per_second_per_peer, lim.burst_per_peer, now
            )
            while len(buckets) > self.limits.max_rate_peers:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(peer)
        return bucket

    def is_running(self, peer: bytes, call_id: int) -> bool:
        return (peer, call_id) in self._calls

    def finish(self, peer: bytes, call_id: int, error: str | None, now: float) -> None:
        """The call ended: ``error`` None (it succeeded) or its code. Unknown ids are
        ignored (finished twice, or admitted before the service was replaced)."""
        call = self._calls.pop((peer, call_id), None)
        if call is None:
            return
        self.in_flight -= 1
        left = self._per_peer[peer] - 1
        if left > 0:
            self._per_peer[peer] = left
        else:
            del self._per_peer[peer]
        state = self.services.get(call.service)
        if state is None:
            return
        state.in_flight = max(0, state.in_flight - 1)
        if error is None:
            state.ok += 1
            state.latencies.append(max(0.0, now - call.started))
        else:
            state.errors[error] += 1

    def peer_in_flight(self, peer: bytes) -> int:
        return self._per_peer.get(peer, 0)

    def stats(self) -> dict[str, int]:
        out = {f"refused_{code}": n for code, n in self.refused.items()}
        out["in_flight"] = self.in_flight
        out["services"] = len(self.services)
        return out


class StreamCredit:
    """One stream's flow control and the items produced but not yet delivered."""

    def __init__(self, max_credit: int) -> None:
        if max_credit < 1:
            raise ValueError("max_credit must be positive")
        self.max_credit = max_credit
        self.granted = 0
        self.produced = 0
        self.delivered = 0
        self.ended = False
        self.error: Refusal | None = None  # how the stream failed, if it did
        self.closed = False  # the end (or the error) was handed to the consumer
        self._ready: deque[bytes] = deque()

    @property
    def outstanding(self) -> int:
        """Items granted and not yet delivered (what the producer may hold, at most)."""
        return self.granted - self.delivered

    @property
    def buffered(self) -> int:
        return len(self._ready)

    def grant(self, n: int) -> int:
        """The consumer asks for ``n`` more; returns how many were granted (never past
        ``max_credit`` ahead of delivery)."""
        if n < 0:
            raise ValueError("credit cannot be negative")
        room = max(0, self.max_credit - self.outstanding)
        given = min(n, room)
        self.granted += given
        return given

    def may_produce(self) -> bool:
        return not self.ended and self.produced < self.granted

    def push(self, item: bytes) -> None:
        """The producer made an item; only allowed while ``may_produce``."""
        if not self.may_produce():
            raise ValueError("no credit for another item")
        self.produced += 1
        self._ready.append(item)

    def end(self) -> None:
        self.ended = True

    def fail(self, error: Refusal) -> None:
        """The stream ends with ``error`` (the first failure wins); what was produced
        is still delivered, the error after it."""
        if self.error is None and not self.closed:
            self.error = error
        self.ended = True

    def collect(self, n: int, max_bytes: int | None = None) -> tuple[list[bytes], bool]:
        """What one pull answers: up to ``n`` items and whether the stream is over
        with them (then ``error`` says if it failed). Items first, the error alone
        after the last of them; once over, the stream is closed."""
        if self.closed:
            return [], True
        items = self.take(n, max_bytes)
        if not self.finished or (items and self.error is not None):
            return items, False
        self.closed = True
        return items, True

    def take(self, n: int, max_bytes: int | None = None) -> list[bytes]:
        """Up to ``n`` items in the order produced, at most ``max_bytes`` in all
        (but always one item, if there is one and ``n`` >= 1)."""
        out: list[bytes] = []
        ready = self._ready
        size = 0
        while ready and len(out) < n:
            item = ready[0]
            if out and max_bytes is not None and size + len(item) > max_bytes:
                break
            size += len(item)
            out.append(ready.popleft())
        self.delivered += len(out)
        return out

    @property
    def finished(self) -> bool:
        """Ended and everything delivered: the consumer has seen the end."""
        return self.ended and not self._ready
