"""AutoNAT dial-back probes (modelled on libp2p AutoNAT v2): the asyncio shell
around :class:`~p2pnode.nat.reachability.ReachabilityCore`.

Messages (peer-connection mux, type codes 64-67):

- ``DialBackRequest(nonce, tcp_port, udp_port)`` -> ``DialBackResponse(tcp,
  udp, observed_ip)``: the client asks a connected peer (the server) to dial it
  back. There is no address in the request: the server dials **only the IP the
  request came from** (no amplification: nobody can aim our dials at a third
  party), on a **new** TCP connection (:meth:`PeerHost.dial_fresh`, not the
  pooled one) to ``tcp_port``, and sends ``DialBack(nonce)`` over it; and it
  sends one ``dial_back`` datagram carrying the nonce from a fresh ephemeral UDP
  socket to ``udp_port`` (the DHT's probe RPC). A port of 0 skips that
  transport. ``tcp``: "ok" | "failed" | "refused" | "skipped"; ``udp``: "sent" |
  "refused" | "skipped"; ``observed_ip``: the requester's IP as the server saw it.
- ``DialBack(nonce)`` -> ``DialBackAck()``: over the fresh connection.

The client counts a TCP success only when ``DialBack`` with its nonce arrived on
an inbound, direct connection that did not exist when it asked (so a server can
neither claim a success nor reuse the connection we opened), and a UDP success
only when its own DHT socket received the nonce. A server's "failed" (or a
"sent" datagram that never came) is a failure, which the core weighs less.

Server limits: ``max_per_ip`` dial-backs per requester IP per minute,
``max_concurrent`` at once, requests over relayed or punched connections
refused; every refusal is counted (``refused_*``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pnode.clock import MONOTONIC, Clock
from p2pnode.dht import Discovery
from p2pnode.dht.core import AddressObserved, DialBackReceived, Event, dial_back_datagram
from p2pnode.dht.rpc_schema import normalize_host
from p2pnode.errors import ConnectionClosed, LimitExceeded, P2PError, ProtocolError, UsageError
from p2pnode.nat.observed import TCP, UDP, ObservedAddresses
from p2pnode.nat.reachability import (
    FAILURE,
    NO_EVIDENCE,
    SUCCESS,
    AutoNatConfig,
    ReachabilityChanged,
    ReachabilityCore,
)
from p2pnode.nat.types import Reachability, Via
from p2pnode.net.connection import PeerConnection, serving
from p2pnode.net.dispatch import routes_of
from p2pnode.net.host import PeerAddress, PeerHost
from p2pnode.ratelimit import RateLimiter
from p2pnode.tasks import TaskSet
from p2pnode.wire.messages import DEFAULT_REGISTRY, Message, MessageRegistry, message, wire

log = logging.getLogger(__name__)

NONCE_LEN = 16
MAX_STATUS = 16
MAX_PENDING = 64  # our probes in flight
SHORT_POLL = 0.25  # seconds: how often a joining node looks for more servers

# Server answers.
OK, FAILED, REFUSED, SKIPPED, SENT = "ok", "failed", "refused", "skipped", "sent"


@message(65, registry=None)
@dataclass(frozen=True, slots=True)
class DialBackResponse(Message):
    tcp: str = wire(min_len=1, max_len=MAX_STATUS)
    udp: str = wire(min_len=1, max_len=MAX_STATUS)
    observed_ip: str = wire(max_len=64)


@message(64, response=DialBackResponse, registry=None)
@dataclass(frozen=True, slots=True)
class DialBackRequest(Message):
    nonce: bytes = wire(exact_len=NONCE_LEN)
    tcp_port: int = wire(min_value=0, max_value=65535)
    udp_port: int = wire(min_value=0, max_value=65535)


@message(67, registry=None)
@dataclass(frozen=True, slots=True)
class DialBackAck(Message):
    pass


@message(66, response=DialBackAck, registry=None)
@dataclass(frozen=True, slots=True)
class DialBack(Message):
    nonce: bytes = wire(exact_len=NONCE_LEN)


AUTONAT_MESSAGES: tuple[type[Message], ...] = (
    DialBackRequest,
    DialBackResponse,
    DialBack,
    DialBackAck,
)


def register(registry: MessageRegistry) -> MessageRegistry:
    for cls in AUTONAT_MESSAGES:
        registry.register(cls)
    return registry


register(DEFAULT_REGISTRY)


@dataclass
class _Probe:
    server: bytes
    before: set[int]  # ids of the connections with the server when we asked
    tcp: asyncio.Event = field(default_factory=asyncio.Event)
    udp: asyncio.Event = field(default_factory=asyncio.Event)


def _ip_of(conn: PeerConnection) -> str | None:
    return normalize_host(conn.peername[0])


class AutoNat:
    """Both roles: answers others' dial-back requests, and probes our own
    reachability through a few DHT contacts. ``start()`` / ``close()``."""

    def __init__(
        self,
        host: PeerHost,
        discovery: Discovery,
        port: int,
        config: AutoNatConfig | None = None,
        *,
        clock: Clock = MONOTONIC,
        rng: random.Random | None = None,
    ) -> None:
        self.host = host
        self.discovery = discovery
        self.port = port
        self.config = config or AutoNatConfig()
        self.clock = clock
        self.rng = rng or random.Random()
        self.core = ReachabilityCore(self.config.verdict, clock.now())
        self.observed = ObservedAddresses(min_votes=self.config.min_observers)
        self.stats: dict[str, int] = {
            name: 0
            for name in (
                "dial_backs_served",
                "dial_backs_tcp_ok",
                "dial_backs_tcp_failed",
                "dial_backs_udp_sent",
                "refused_rate",
                "refused_concurrency",
                "refused_not_direct",
                "refused_no_address",
                "refused_own_limits",
                "nonce_unknown",
                "nonce_wrong_connection",
                "claimed_unverified",
                "probe_errors",
            )
        }
        per_ip = self.config.max_per_ip
        self._limiter = RateLimiter(clock, rate=per_ip / 60.0, burst=per_ip, max_keys=4096)
        self._serving = 0
        self._probes: dict[bytes, _Probe] = {}
        self._listeners: list[Callable[[ReachabilityChanged], None]] = []
        self._wake = asyncio.Event()
        self._tasks = TaskSet("autonat")

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        routes = routes_of(self.host)
        routes.route([DialBack], self._on_dial_back)
        if self.config.serve:
            routes.route([DialBackRequest], self._on_request)
        self.discovery.add_listener(self._on_dht_event)
        if self.config.enabled:
            self._tasks.spawn(self._run(), "probe")

    async def close(self) -> None:
        await self._tasks.close()

    def on_change(self, listener: Callable[[ReachabilityChanged], None]) -> None:
        self._listeners.append(listener)

    def wake(self) -> None:
        """Probe now (we joined; a port mapping appeared)."""
        self.core.wake(self.clock.now())
        self._wake.set()

    def mapping_changed(self, external: tuple[str, int] | None) -> None:
        """Port mapping's hook: the router's external (ip, port), or None."""
        self.core.mapping_changed(external, self.clock.now())
        self._emit()
        self._wake.set()

    def verdict(self, transport: str) -> Reachability:
        return self.core.verdict(transport)

    def snapshot(self) -> dict[str, int]:
        out = {**self.core.snapshot(), **self.stats}
        out.update({f"observed.{k}": v for k, v in self.observed.stats.items()})
        out["probes_in_flight"] = len(self._probes)
        out["dial_backs_in_flight"] = self._serving
        return out

    # -- observed addresses -------------------------------------------------

    def _on_dht_event(self, event: Event) -> None:
        if isinstance(event, DialBackReceived):
            probe = self._probes.get(event.nonce)
            if probe is None:
                self.stats["nonce_unknown"] += 1
            else:
                probe.udp.set()
            return
        if isinstance(event, AddressObserved):  # a proven node saw our datagrams
            self.observed.observe(
                event.observer,
                event.observer_host,
                event.observed_host,
                self.clock.now(),
                transport=UDP,
            )

    # -- server ------------------------------------------------------------

    async def _on_request(self, remote: bytes, msg: Message) -> Message:
        if not isinstance(msg, DialBackRequest):
            raise ProtocolError("expected DialBackRequest")
        conn = serving.get()
        ip = _ip_of(conn) if conn is not None else None
        if conn is None or ip is None:
            self.stats["refused_no_address"] += 1
            return DialBackResponse(REFUSED, REFUSED, "")
        if conn.via != Via.DIRECT:  # the IP would be the relay's
            self.stats["refused_not_direct"] += 1
            return DialBackResponse(REFUSED, REFUSED, "")
        if self._serving >= self.config.max_concurrent:
            self.stats["refused_concurrency"] += 1
            return DialBackResponse(REFUSED, REFUSED, ip)
        if not self._limiter.allow(ip):
            self.stats["refused_rate"] += 1
            return DialBackResponse(REFUSED, REFUSED, ip)
        self._serving += 1
        self.stats["dial_backs_served"] += 1
        try:
            udp = SKIPPED
            if msg.udp_port:
                udp = await self._send_datagram(ip, msg.udp_port, msg.nonce)
            tcp = SKIPPED
            if msg.tcp_port:
                tcp = await self._dial_back(remote, ip, msg.tcp_port, msg.nonce)
        finally:
            self._serving -= 1
        return DialBackResponse(tcp, udp, ip)

    async def _dial_back(self, remote: bytes, ip: str, port: int, nonce: bytes) -> str:
        conn: PeerConnection | None = None
        try:
            async with asyncio.timeout(self.config.dial_timeout):
                conn = await self.host.dial_fresh(PeerAddress(remote, ip, port))
                answer = await conn.request(DialBack(nonce))
        except (LimitExceeded, UsageError) as exc:
            # Our own limits (outbound connections full) or closing: no word on
            # the requester's reachability.
            log.debug("no dial-back to %s:%d: %s", ip, port, exc)
            self.stats["refused_own_limits"] += 1
            return REFUSED
        except (P2PError, TimeoutError, OSError) as exc:
            log.debug("dial-back to %s:%d failed: %s", ip, port, exc)
            self.stats["dial_backs_tcp_failed"] += 1
            return FAILED
        finally:
            # ours alone (dial_fresh); the peer may have requests of its own on
            # it: those keep it until its idle timeout
            if conn is not None and not conn.busy:
                conn.close(ConnectionClosed("dial-back done"))
        if not isinstance(answer, DialBackAck):
            self.stats["dial_backs_tcp_failed"] += 1
            return FAILED
        self.stats["dial_backs_tcp_ok"] += 1
        return OK

    async def _send_datagram(self, ip: str, port: int, nonce: bytes) -> str:
        bind = "::" if ":" in ip else "0.0.0.0"
        try:
            transport, _ = await self.host.endpoints.datagram_endpoint(
                asyncio.DatagramProtocol, bind, 0
            )
        except OSError as exc:
            log.debug("no socket for a UDP dial-back: %s", exc)
            return FAILED
        try:
            transport.sendto(dial_back_datagram(secrets.token_bytes(20), nonce), (ip, port))
        finally:
            transport.close()
        self.stats["dial_backs_udp_sent"] += 1
        return SENT

    # -- client ------------------------------------------------------------

    async def _on_dial_back(self, remote: bytes, msg: Message) -> Message:
        if not isinstance(msg, DialBack):
            raise ProtocolError("expected DialBack")
        probe = self._probes.get(msg.nonce)
        if probe is None or probe.server != remote:
            self.stats["nonce_unknown"] += 1
            return DialBackAck()
        conn = serving.get()
        fresh_inbound = (
            conn is not None
            and conn.dialed is None
            and conn.via == Via.DIRECT
            and id(conn) not in probe.before
        )
        if not fresh_inbound:
            self.stats["nonce_wrong_connection"] += 1
            return DialBackAck()
        probe.tcp.set()
        return DialBackAck()

    async def _run(self) -> None:
        while True:
            now = self.clock.now()
            if self.core.probe_due(now) or self.core.needs_servers(self._candidates(), now):
                await self._round()
            delay = max(0.05, self.core.next_deadline() - self.clock.now())
            if self.core.short_of_servers:
                delay = min(delay, SHORT_POLL)  # joining: look for servers again soon
            self._wake.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _candidates(self) -> list[tuple[bytes, str, int]]:
        core = self.discovery.core
        nodes = [n for n in core.table.all_nodes() if core.table.is_proven(n.id)]
        self.rng.shuffle(nodes)
        return [(n.id, n.ip, n.port) for n in nodes]

    async def _round(self) -> None:
        # Probes run on their own: a server that takes its dial_timeout does not
        # hold up asking the next one found.
        candidates = self._candidates()
        for i in self.core.pick_servers(candidates, self.clock.now()):
            self._tasks.spawn(self._probe(*candidates[i]), "probe-one")

    async def _probe(self, server: bytes, ip: str, port: int) -> None:
        if len(self._probes) >= MAX_PENDING:
            return
        nonce = secrets.token_bytes(NONCE_LEN)
        before = {id(c) for c in self.host.connections_to(server)}
        probe = _Probe(server, before)
        self._probes[nonce] = probe
        tcp_port, udp_port = self.core.probe_ports(self.port, self.port)
        request = DialBackRequest(nonce, tcp_port, udp_port)
        timeout = 2 * self.config.dial_timeout + self.config.udp_wait
        asked_at = self.clock.now()
        try:
            try:
                answer = await self.host.request(PeerAddress(server, ip, port), request, timeout)
            except P2PError as exc:
                log.debug("AutoNAT probe via %s:%d failed: %s", ip, port, exc)
                self.stats["probe_errors"] += 1
                self._result(TCP, ip, NO_EVIDENCE)
                self._result(UDP, ip, NO_EVIDENCE)
                return
            if not isinstance(answer, DialBackResponse):
                self.stats["probe_errors"] += 1
                return
            observed = normalize_host(answer.observed_ip)
            if observed is not None:
                self.observed.observe(server, ip, observed, self.clock.now(), transport=TCP)
            self._result(TCP, ip, self._tcp_outcome(probe, answer.tcp))
            self._result(UDP, ip, await self._udp_outcome(probe, answer.udp, asked_at))
        finally:
            self._probes.pop(nonce, None)

    def _tcp_outcome(self, probe: _Probe, said: str) -> str:
        # Our handler acknowledged before the server answered: no waiting needed.
        if probe.tcp.is_set():
            return SUCCESS
        if said == OK:  # it says it reached us; we never saw it
            self.stats["claimed_unverified"] += 1
            return NO_EVIDENCE
        return FAILURE if said == FAILED else NO_EVIDENCE

    async def _udp_outcome(self, probe: _Probe, said: str, asked_at: float) -> str:
        if probe.udp.is_set():
            return SUCCESS
        if said != SENT:
            return NO_EVIDENCE
        # The datagram left before the server's TCP dial: it had that long already.
        wait = max(0.2, self.config.udp_wait - (self.clock.now() - asked_at))
        try:
            async with asyncio.timeout(wait):
                await probe.udp.wait()
        except TimeoutError:
            return FAILURE
        return SUCCESS

    def _result(self, transport: str, ip: str, outcome: str) -> None:
        self.core.result(transport, ip, outcome, self.clock.now())
        self._emit()

    def _emit(self) -> None:
        for event in self.core.events():
            log.info("reachability %s: %s -> %s", event.transport, event.old, event.new)
            for listener in list(self._listeners):
                listener(event)
