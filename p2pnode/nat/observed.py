"""Our own address as other nodes see it, confirmed by votes. Pure: no I/O.

Peers tell us where our packets came from (the DHT's identify answer carries the
asker's IP as the answerer saw it; the AutoNAT answer does too). One peer can lie,
so an address counts as *confirmed* only when at least ``min_votes`` observers on
distinct IPs report it (their last report each). Memory is bounded: the last
``max_observers`` observers are kept, older ones are forgotten, and reports
expire after ``ttl`` seconds.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from p2pnode.errors import UsageError

TCP = "tcp"
UDP = "udp"
TRANSPORTS = (TCP, UDP)


@dataclass(frozen=True, slots=True)
class Observation:
    observer_id: bytes
    observer_ip: str
    observed_ip: str
    observed_port: int | None  # None: the observer reported no port
    transport: str  # "tcp" or "udp"
    at: float


@dataclass(frozen=True, slots=True)
class ObservedAddress:
    """A confirmed address: ``votes`` distinct observer IPs agree on it."""

    ip: str
    port: int | None
    transport: str
    votes: int


class ObservedAddresses:
    def __init__(self, *, min_votes: int = 2, max_observers: int = 64, ttl: float = 1800.0) -> None:
        if min_votes < 1 or max_observers < 1 or ttl <= 0:
            raise UsageError("min_votes, max_observers and ttl must be positive")
        self.min_votes = min_votes
        self.max_observers = max_observers
        self.ttl = ttl
        # (observer id, transport) -> its last report; oldest first.
        self._last: OrderedDict[tuple[bytes, str], Observation] = OrderedDict()
        self.stats: dict[str, int] = {"observations": 0, "observers_forgotten": 0}

    def observe(
        self,
        observer_id: bytes,
        observer_ip: str,
        observed_ip: str,
        now: float,
        *,
        port: int | None = None,
        transport: str = UDP,
    ) -> None:
        """``observer_id`` at ``observer_ip`` saw us come from ``observed_ip``[:port]."""
        if transport not in TRANSPORTS:
            raise UsageError(f"transport is tcp or udp, not {transport!r}")
        key = (observer_id, transport)
        self._last.pop(key, None)
        self._last[key] = Observation(observer_id, observer_ip, observed_ip, port, transport, now)
        self.stats["observations"] += 1
        while len(self._last) > self.max_observers:
            self._last.popitem(last=False)
            self.stats["observers_forgotten"] += 1

    def _fresh(self, now: float) -> list[Observation]:
        return [o for o in self._last.values() if now - o.at <= self.ttl]

    def confirmed(self, now: float, transport: str | None = None) -> list[ObservedAddress]:
        """Addresses reported by at least ``min_votes`` distinct observer IPs, most
        votes first. A port is kept only when enough observers agree on it too
        (else the address is listed without a port)."""
        ip_votes: dict[tuple[str, str], set[str]] = {}
        port_votes: dict[tuple[str, str, int], set[str]] = {}
        for obs in self._fresh(now):
            if transport is not None and obs.transport != transport:
                continue
            ip_votes.setdefault((obs.transport, obs.observed_ip), set()).add(obs.observer_ip)
            if obs.observed_port is not None:
                key = (obs.transport, obs.observed_ip, obs.observed_port)
                port_votes.setdefault(key, set()).add(obs.observer_ip)
        out: list[ObservedAddress] = []
        for (kind, ip), voters in ip_votes.items():
            if len(voters) < self.min_votes:
                continue
            ports = [
                (len(v), port)
                for (k, i, port), v in port_votes.items()
                if k == kind and i == ip and len(v) >= self.min_votes
            ]
            port = max(ports)[1] if ports else None
            out.append(ObservedAddress(ip, port, kind, len(voters)))
        out.sort(key=lambda a: (-a.votes, a.transport, a.ip))
        return out

    def best_ip(self, now: float) -> str | None:
        """The confirmed IP with the most votes (any transport), or None."""
        confirmed = self.confirmed(now)
        return confirmed[0].ip if confirmed else None

    def __len__(self) -> int:
        return len(self._last)
