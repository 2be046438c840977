"""Whether other machines can reach this node, per transport: the AutoNAT verdict.
Pure: no I/O, no asyncio; time comes in as ``now``.

Evidence comes from dial-back probes (:mod:`.autonat`): we ask a server to dial us
back on a fresh connection (TCP) or datagram (UDP) carrying a nonce of ours.

- A **success** is counted only when our own listener or DHT socket received the
  right nonce (a server cannot claim it), so one success makes the transport
  ``public``.
- A **failure** is only a server's word (it says it could not reach us, or the
  nonce never came), so failures are weighed less: ``private`` needs failures from
  ``failures_for_private`` distinct server IPs since the last success, and a
  ``public`` verdict first loses its confidence (one per failure; each success
  adds one, up to ``max_confidence``), as libp2p's AutoNAT does.
- ``unknown`` until then. A server that refused, timed out or broke gives no
  evidence either way.

Re-probing: a round is due at once at start, then every ``refresh`` seconds once
both transports have a verdict; while one is unknown, after ``retry_unknown``
seconds, doubling up to ``retry_unknown_max`` (not doubling while a round finds
fewer than ``probe_servers`` servers: the node is still joining). :meth:`wake` makes a round due now
(we joined, a port mapping appeared). A port mapping (:meth:`mapping_changed`)
changes which port the servers are asked to dial (its external port) and starts
over from ``unknown``: a working mapping plus a successful dial-back to it makes
the node public.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from p2pnode.errors import UsageError
from p2pnode.nat.observed import TCP, TRANSPORTS, UDP
from p2pnode.nat.types import Reachability

SUCCESS = "success"
FAILURE = "failure"
NO_EVIDENCE = "no_evidence"  # refused, timed out, broken: counted, not weighed
OUTCOMES = (SUCCESS, FAILURE, NO_EVIDENCE)


@dataclass(frozen=True)
class ReachabilityConfig:
    # Servers asked per probe round (each checks TCP and UDP).
    probe_servers: int = 3
    # Distinct server IPs that must report failure (no success since) for "private".
    failures_for_private: int = 3
    # ... or, in a network that knows fewer servers than that (a small one, or a
    # lab), every server it knows, if they are at least this many.
    min_failures_for_private: int = 2
    max_confidence: int = 3
    retry_unknown: float = 2.0
    retry_unknown_max: float = 60.0
    refresh: float = 600.0
    # A server is not asked again sooner than this.
    server_cooldown: float = 30.0
    # Failure reports older than this no longer count.
    evidence_ttl: float = 1800.0

    def __post_init__(self) -> None:
        if self.min_failures_for_private < 1:
            raise UsageError("min_failures_for_private must be >= 1")
        if self.probe_servers < 1 or self.failures_for_private < 1 or self.max_confidence < 1:
            raise UsageError("probe_servers, failures_for_private, max_confidence must be >= 1")
        for name in ("retry_unknown", "retry_unknown_max", "refresh", "evidence_ttl"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be positive")
        if self.server_cooldown < 0:
            raise UsageError("server_cooldown must be >= 0")


@dataclass(frozen=True)
class AutoNatConfig:
    enabled: bool = True
    # Server side.
    serve: bool = True
    max_per_ip: int = 4  # dial-backs per requester IP per minute
    max_concurrent: int = 8
    dial_timeout: float = 3.0
    # Client side: how long the nonce may trail the server's "sent" datagram.
    udp_wait: float = 1.0
    min_observers: int = 2  # distinct observer IPs that confirm an observed address
    verdict: ReachabilityConfig = field(default_factory=ReachabilityConfig)

    def __post_init__(self) -> None:
        if self.max_per_ip < 1 or self.max_concurrent < 1 or self.min_observers < 1:
            raise UsageError("max_per_ip, max_concurrent, min_observers must be >= 1")
        if self.dial_timeout <= 0 or self.udp_wait <= 0:
            raise UsageError("dial_timeout and udp_wait must be positive")


@dataclass(frozen=True)
class ReachabilityStatus:
    """What a node knows of its reachability (``Node.reachability``)."""

    tcp: Reachability
    udp: Reachability
    observed: tuple[str, ...]  # confirmed observed IPs (and ip:port when known)
    addresses: tuple[str, ...]  # what another machine should use (host:port)
    dht_mode: str  # "server" or "client"
    time_to_verdict: dict[str, float | None]  # seconds after start, per transport

    @property
    def overall(self) -> Reachability:
        """public when both transports are; private when either is; else unknown."""
        if Reachability.PRIVATE in (self.tcp, self.udp):
            return Reachability.PRIVATE
        if self.tcp is self.udp is Reachability.PUBLIC:
            return Reachability.PUBLIC
        return Reachability.UNKNOWN

    def to_json(self) -> dict[str, object]:
        return {
            "reachability": str(self.overall),
            "tcp": str(self.tcp),
            "udp": str(self.udp),
            "observed": list(self.observed),
            "addresses": list(self.addresses),
            "dht_mode": self.dht_mode,
            "time_to_verdict": self.time_to_verdict,
        }


@dataclass(frozen=True, slots=True)
class ReachabilityChanged:
    transport: str
    old: Reachability
    new: Reachability
    at: float


@dataclass
class _State:
    verdict: Reachability = Reachability.UNKNOWN
    confidence: int = 0
    # server IP -> when it reported failure, since the last success
    failures: OrderedDict[str, float] = field(default_factory=OrderedDict)
    changed_at: float | None = None
    first_verdict_at: float | None = None


MAX_SERVERS_REMEMBERED = 256


class ReachabilityCore:
    def __init__(self, config: ReachabilityConfig, now: float) -> None:
        self.config = config
        self.started_at = now
        self._states = {t: _State() for t in TRANSPORTS}
        self._events: list[ReachabilityChanged] = []
        self._next_probe = now  # a round at once
        self._retry = config.retry_unknown
        self._short = False  # the last round found fewer servers than wanted
        self._asked: OrderedDict[str, float] = OrderedDict()  # server IP -> when asked
        # server IPs among the last round's candidates (a small network's all;
        # None: no round yet), and those that gave no evidence (unreachable)
        self._candidate_ips: set[str] | None = None
        self._silent: OrderedDict[str, float] = OrderedDict()
        self.mapping: tuple[str, int] | None = None
        self.stats: dict[str, int] = {
            "probe_rounds": 0,
            "probes_started": 0,
            "verdict_changes": 0,
            "mapping_changes": 0,
        }
        for t in TRANSPORTS:
            for outcome in OUTCOMES:
                self.stats[f"probe_{t}_{outcome}"] = 0

    # -- outputs -----------------------------------------------------------

    def verdict(self, transport: str) -> Reachability:
        return self._states[transport].verdict

    def confidence(self, transport: str) -> int:
        return self._states[transport].confidence

    def time_to_verdict(self, transport: str) -> float | None:
        """Seconds from start to the first public/private verdict, or None."""
        at = self._states[transport].first_verdict_at
        return None if at is None else at - self.started_at

    def events(self) -> list[ReachabilityChanged]:
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float:
        return self._next_probe

    def probe_ports(self, tcp_port: int, udp_port: int) -> tuple[int, int]:
        """The ports servers should dial: a mapping's external port, else ours."""
        if self.mapping is not None:
            return self.mapping[1], self.mapping[1]
        return tcp_port, udp_port

    # -- scheduling --------------------------------------------------------

    def probe_due(self, now: float) -> bool:
        return now >= self._next_probe

    def wake(self, now: float) -> None:
        """Probe now (we joined; a mapping appeared)."""
        self._next_probe = min(self._next_probe, now)

    @property
    def short_of_servers(self) -> bool:
        """The last round found fewer servers than wanted, and a verdict is still
        unknown (the node is joining: look for servers often)."""
        return self._short and any(s.verdict is Reachability.UNKNOWN for s in self._states.values())

    def needs_servers(self, candidates: list[tuple[bytes, str, int]], now: float) -> bool:
        """:attr:`short_of_servers`, and a server we may ask has appeared (then
        probe at once instead of waiting for the next round)."""
        if not self.short_of_servers:
            return False
        cooldown = self.config.server_cooldown
        for _, ip, _ in candidates:
            asked = self._asked.get(ip)
            if asked is None or now - asked >= cooldown:
                return True
        return False

    def pick_servers(self, candidates: list[tuple[bytes, str, int]], now: float) -> list[int]:
        """Indexes into ``candidates`` ((id, ip, port), in the caller's preferred
        order) to probe in this round: distinct IPs, none asked within
        server_cooldown, at most probe_servers. Schedules the next round."""
        chosen: list[int] = []
        ips: set[str] = set()
        cooldown = self.config.server_cooldown
        self._candidate_ips = {ip for _, ip, _ in candidates}
        for index, (_, ip, _) in enumerate(candidates):
            if len(chosen) >= self.config.probe_servers:
                break
            asked = self._asked.get(ip)
            if ip in ips or (asked is not None and now - asked < cooldown):
                continue
            ips.add(ip)
            chosen.append(index)
        for ip in ips:
            self._asked.pop(ip, None)
            self._asked[ip] = now
        while len(self._asked) > MAX_SERVERS_REMEMBERED:
            self._asked.popitem(last=False)
        self.stats["probe_rounds"] += 1
        self.stats["probes_started"] += len(chosen)
        self._short = len(chosen) < self.config.probe_servers
        self._schedule(now, short=self._short)
        return chosen

    def _schedule(self, now: float, *, short: bool) -> None:
        unknown = any(s.verdict is Reachability.UNKNOWN for s in self._states.values())
        if unknown and short:  # too few servers yet (joining): soon, no backoff
            self._next_probe = now + self.config.retry_unknown
        elif unknown:
            self._next_probe = now + self._retry
            self._retry = min(self._retry * 2, self.config.retry_unknown_max)
        else:
            self._next_probe = now + self.config.refresh
            self._retry = self.config.retry_unknown

    # -- inputs ------------------------------------------------------------

    def result(self, transport: str, server_ip: str, outcome: str, now: float) -> None:
        """One probe's outcome for ``transport`` from the server at ``server_ip``."""
        if transport not in TRANSPORTS or outcome not in OUTCOMES:
            raise UsageError(f"bad probe result {transport!r} {outcome!r}")
        self.stats[f"probe_{transport}_{outcome}"] += 1
        state = self._states[transport]
        if outcome == NO_EVIDENCE:
            # a server we cannot reach (behind a NAT itself) is no server to
            # wait for: the failures we have may now be every server's
            self._silent[server_ip] = now
            while len(self._silent) > MAX_SERVERS_REMEMBERED:
                self._silent.popitem(last=False)
            if state.verdict is Reachability.UNKNOWN and state.failures and self._enough(state):
                state.confidence = 1
                self._set(transport, Reachability.PRIVATE, now)
            return
        self._silent.pop(server_ip, None)
        cap = self.config.max_confidence
        if outcome == SUCCESS:
            state.failures.clear()
            if state.verdict is Reachability.PUBLIC:
                state.confidence = min(cap, state.confidence + 1)
            else:
                state.confidence = 1
                self._set(transport, Reachability.PUBLIC, now)
            return
        ttl = self.config.evidence_ttl
        for ip, at in list(state.failures.items()):
            if now - at > ttl:
                del state.failures[ip]
        state.failures.pop(server_ip, None)
        state.failures[server_ip] = now
        while len(state.failures) > MAX_SERVERS_REMEMBERED:
            state.failures.popitem(last=False)
        enough = self._enough(state)
        if state.verdict is Reachability.PRIVATE:
            state.confidence = min(cap, state.confidence + 1)
        elif state.verdict is Reachability.PUBLIC and state.confidence > 0:
            state.confidence -= 1
        elif enough:
            state.confidence = 1
            self._set(transport, Reachability.PRIVATE, now)

    def _enough(self, state: _State) -> bool:
        """Failures from failures_for_private server IPs, or, in a network that
        knows fewer servers that answer, from all of them (at least
        min_failures_for_private)."""
        needed = self.config.failures_for_private
        if self._candidate_ips is not None:
            answering = len(self._candidate_ips - self._silent.keys())
            needed = min(needed, max(self.config.min_failures_for_private, answering))
        return len(state.failures) >= needed

    def mapping_changed(self, external: tuple[str, int] | None, now: float) -> None:
        """A port mapping on the router appeared (its external ip, port), changed
        or went away (None): the evidence so far was about other ports."""
        if external == self.mapping:
            return
        self.mapping = external
        self.stats["mapping_changes"] += 1
        for transport, state in self._states.items():
            state.failures.clear()
            state.confidence = 0
            self._set(transport, Reachability.UNKNOWN, now)
        self._asked.clear()
        self._retry = self.config.retry_unknown
        self.wake(now)

    def _set(self, transport: str, verdict: Reachability, now: float) -> None:
        state = self._states[transport]
        if state.verdict is verdict:
            return
        old, state.verdict, state.changed_at = state.verdict, verdict, now
        if verdict is not Reachability.UNKNOWN and state.first_verdict_at is None:
            state.first_verdict_at = now
        self.stats["verdict_changes"] += 1
        self._events.append(ReachabilityChanged(transport, old, verdict, now))
        if verdict is Reachability.UNKNOWN:
            self._retry = self.config.retry_unknown

    def snapshot(self) -> dict[str, int]:
        out = dict(self.stats)
        code = {Reachability.PUBLIC: 1, Reachability.PRIVATE: 0, Reachability.UNKNOWN: -1}
        for t in (TCP, UDP):
            out[f"reachability_{t}"] = code[self._states[t].verdict]
        return out
