"""Port mapping's pure core: what is mapped, when to try, renew and give up.

No sockets, no asyncio: time comes in as ``now``. The shell
(:mod:`p2pnode.nat.portmap`) asks :meth:`PortMapCore.due` what to do, does it
(discovery, a mapping request, a renewal) and reports back; it sleeps until
:meth:`PortMapCore.next_deadline`.

Rules:

- one *attempt* = discover a gateway (UPnP-IGD or NAT-PMP) and map TCP and UDP
  on the node's port. It succeeds when at least one protocol is mapped. A failed
  attempt (no gateway is the normal case) is retried after a backoff that doubles
  from ``retry_initial`` up to ``retry_max``;
- a lease is renewed at half its lifetime (RFC 6886 section 3.3); a failed
  renewal is retried every ``renew_retry`` seconds while the lease lasts; a lease
  that expires is dropped and, when none is left, a new attempt is scheduled now;
- a lifetime of 0 is a permanent mapping (IGDv1 routers that only offer those):
  never renewed, still removed at stop;
- :meth:`PortMapCore.stop` hands back every live lease for removal.
"""

from __future__ import annotations

import ipaddress
import math
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from p2pnode import confcheck


class Method(StrEnum):
    """How a mapping was made."""

    UPNP = "upnp"
    PCP = "pcp"
    NATPMP = "natpmp"


class Proto(StrEnum):
    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True)
class PortMapConfig:
    """Port mapping settings (``NodeConfig.portmap``)."""

    # UPnP-IGD and PCP/NAT-PMP are tried concurrently; the first gateway to
    # answer maps. PCP and NAT-PMP share port 5351: PCP first, NAT-PMP when the
    # router answers that it only speaks NAT-PMP.
    methods: tuple[Method, ...] = (Method.UPNP, Method.PCP, Method.NATPMP)
    # Lifetime asked for, seconds. Routers may grant less (or, IGDv1, only 0).
    lease: int = 3600
    # How long discovery may take (SSDP answers, NAT-PMP retransmissions).
    discovery_timeout: float = 3.0
    # One mapping request (a SOAP call, a NAT-PMP exchange with retransmissions).
    request_timeout: float = 3.0
    # After a failed attempt: wait this long, doubling up to retry_max.
    retry_initial: float = 60.0
    retry_max: float = 3600.0
    # A failed renewal is tried again after this, while the lease lasts.
    renew_retry: float = 10.0
    # Removing the mappings at stop waits at most this long in all.
    remove_timeout: float = 3.0

    def __post_init__(self) -> None:
        confcheck.check_types(self)
        if not self.methods or any(m not in tuple(Method) for m in self.methods):
            confcheck.fail(self, "methods", f"must be some of {[m.value for m in Method]}")
        # Strings from a config file become the enum.
        object.__setattr__(self, "methods", tuple(dict.fromkeys(Method(m) for m in self.methods)))
        confcheck.at_least(self, 1, "lease")
        confcheck.positive(
            self,
            "discovery_timeout",
            "request_timeout",
            "retry_initial",
            "retry_max",
            "renew_retry",
            "remove_timeout",
        )


@dataclass(frozen=True)
class Lease:
    """One mapping granted by the router."""

    proto: Proto
    method: Method
    internal_port: int
    external_ip: str
    external_port: int
    lifetime: int  # seconds granted; 0 = permanent
    granted_at: float

    @property
    def expires_at(self) -> float:
        return math.inf if self.lifetime == 0 else self.granted_at + self.lifetime

    @property
    def renew_at(self) -> float:
        return math.inf if self.lifetime == 0 else self.granted_at + self.lifetime / 2


# A router whose own external address is in these ranges sits behind another
# NAT (a carrier's, or a second home router): its mappings do not reach the
# internet. Documentation ranges are not here: the lab uses them as "public".
_INNER = tuple(
    ipaddress.IPv4Network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)


def behind_another_nat(external_ip: str) -> bool:
    """The router's external address is private or carrier-grade NAT space."""
    try:
        ip = ipaddress.IPv4Address(external_ip)
    except ValueError:
        return False
    return any(ip in net for net in _INNER)


class ActionKind(StrEnum):
    ATTEMPT = "attempt"
    RENEW = "renew"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    lease: Lease | None = None  # RENEW: the lease to renew


@dataclass
class PortMapCore:
    config: PortMapConfig
    internal_port: int
    leases: dict[Proto, Lease] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    _next_attempt: float | None = None
    _attempting: bool = False
    _renew_due: dict[Proto, float] = field(default_factory=dict)
    _renewing: set[Proto] = field(default_factory=set)
    _failures: int = 0
    _started: bool = False
    _stopped: bool = False

    # -- schedule -----------------------------------------------------------------

    def start(self, now: float) -> None:
        self._started = True
        self._next_attempt = now

    def next_deadline(self) -> float | None:
        """When :meth:`due` next has something to do (None: nothing planned)."""
        if self._stopped:
            return None
        times = [t for p, t in self._renew_due.items() if p not in self._renewing]
        times += [lease.expires_at for lease in self.leases.values()]
        if self._next_attempt is not None and not self._attempting:
            times.append(self._next_attempt)
        finite = [t for t in times if t != math.inf]
        return min(finite) if finite else None

    def due(self, now: float) -> list[Action]:
        """What the shell should start now; each action is reported back through
        the matching ``*_done`` / ``*_failed`` method."""
        if self._stopped or not self._started:
            return []
        self._expire(now)
        actions: list[Action] = []
        if self._next_attempt is not None and not self._attempting and now >= self._next_attempt:
            self._attempting = True
            self._next_attempt = None
            self.counters["attempts"] += 1
            actions.append(Action(ActionKind.ATTEMPT))
        for proto, when in sorted(self._renew_due.items()):
            if proto not in self._renewing and now >= when:
                self._renewing.add(proto)
                self.counters["renewals"] += 1
                actions.append(Action(ActionKind.RENEW, self.leases[proto]))
        return actions

    def _expire(self, now: float) -> None:
        for proto, lease in list(self.leases.items()):
            if now >= lease.expires_at and proto not in self._renewing:
                del self.leases[proto]
                self._renew_due.pop(proto, None)
                self.counters["leases_expired"] += 1
        if not self.leases and not self._attempting and self._next_attempt is None:
            self._next_attempt = now

    # -- outcomes -----------------------------------------------------------------

    def attempt_done(self, now: float, leases: list[Lease]) -> None:
        """An attempt ended with these leases (empty: it failed)."""
        self._attempting = False
        if self._stopped:
            return
        if not leases:
            self.attempt_failed(now)
            return
        self._failures = 0
        self.counters["attempts_mapped"] += 1
        for lease in leases:
            self._grant(lease)

    def attempt_failed(self, now: float) -> None:
        self._attempting = False
        if self._stopped:
            return
        self.counters["attempts_failed"] += 1
        delay = min(self.config.retry_initial * 2**self._failures, self.config.retry_max)
        self._failures += 1
        self._next_attempt = now + delay

    def renew_done(self, now: float, lease: Lease) -> None:
        self._renewing.discard(lease.proto)
        if self._stopped:
            return
        self.counters["renewals_ok"] += 1
        self._grant(lease)

    def renew_failed(self, now: float, proto: Proto) -> None:
        self._renewing.discard(proto)
        self.counters["renewals_failed"] += 1
        lease = self.leases.get(proto)
        if self._stopped or lease is None:
            return
        # Retry while the lease lasts; at expiry _expire drops it.
        self._renew_due[proto] = min(now + self.config.renew_retry, lease.expires_at)
        self._expire(now)

    def _grant(self, lease: Lease) -> None:
        self.leases[lease.proto] = lease
        if lease.lifetime == 0:
            self._renew_due.pop(lease.proto, None)
        else:
            self._renew_due[lease.proto] = lease.renew_at

    def stop(self) -> list[Lease]:
        """Stop planning; the leases to remove from the router."""
        self._stopped = True
        leases = list(self.leases.values())
        self.leases.clear()
        self._renew_due.clear()
        self._next_attempt = None
        return leases

    # -- views --------------------------------------------------------------------

    def external_address(self) -> tuple[str, int] | None:
        """Where other machines reach this node's TCP port (None: not mapped)."""
        lease = self.leases.get(Proto.TCP)
        return None if lease is None else (lease.external_ip, lease.external_port)

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        return [
            {
                "protocol": lease.proto.value,
                "method": lease.method.value,
                "internal_port": lease.internal_port,
                "external": f"{lease.external_ip}:{lease.external_port}",
                "lease_remaining": (
                    None if lease.lifetime == 0 else round(max(0.0, lease.expires_at - now), 1)
                ),
            }
            for lease in sorted(self.leases.values(), key=lambda x: x.proto)
        ]

    def next_attempt_in(self, now: float) -> float | None:
        return None if self._next_attempt is None else max(0.0, self._next_attempt - now)
