"""A node: builds the parts from a NodeConfig, starts and stops them in order,
and owns every background task.

    async with Node(NodeConfig(home=..., port=0)) as node:
        ...

Start order: home lock -> identity -> DHT (UDP P) -> peer host (TCP P) ->
exchange -> services -> control API -> join/maintenance tasks. Stop is the reverse, and
saves the routing table so a restart without --bootstrap rejoins.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import psutil

from p2pnode._version import __version__
from p2pnode.clock import MONOTONIC, Clock
from p2pnode.config import NodeConfig
from p2pnode.control.api import MetricsSnapshot
from p2pnode.control.server import ControlServer
from p2pnode.dht import Contact, Discovery
from p2pnode.dht.discovery import ProviderRecord
from p2pnode.errors import NodeNotRunning, UsageError
from p2pnode.exchange.service import Exchange
from p2pnode.home import (
    API_SOCKET,
    HomeLock,
    SavedContact,
    clear_control,
    load_contacts,
    save_contacts,
    write_control,
)
from p2pnode.identity import Identity, as_node_id, peer_id_to_str
from p2pnode.nat.autonat import AutoNat
from p2pnode.nat.holepunch import HolePuncher
from p2pnode.nat.observed import TCP, UDP
from p2pnode.nat.portmap import PortMapper
from p2pnode.nat.reachability import ReachabilityChanged, ReachabilityStatus
from p2pnode.nat.relay import Relay
from p2pnode.nat.types import Reachability, Via
from p2pnode.net.connection import PeerConnection
from p2pnode.net.host import PeerHost
from p2pnode.services import (
    NodeServiceLimits,
    ServiceLimits,
    Services,
    StreamHandler,
    UnaryHandler,
)
from p2pnode.tasks import TaskSet

log = logging.getLogger(__name__)

BIND_ATTEMPTS = 20

_Part = TypeVar("_Part")


class NodeState(StrEnum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    # start() failed; its parts are closed and the home released.
    FAILED = "failed"


class Node:
    """One p2pnode peer: the DHT, the peer host, the exchange and the control API
    over one identity and one home folder.

    It composes, in start order:

    - :class:`~p2pnode.home.HomeLock`: one running node per home;
    - :class:`~p2pnode.identity.Identity`: the Ed25519 key (peer id = node id);
    - :class:`~p2pnode.dht.Discovery`: the Kademlia DHT on UDP port P;
    - :class:`~p2pnode.net.host.PeerHost`: Noise-secured peer connections on TCP P;
    - :class:`~p2pnode.exchange.service.Exchange`: sharing and downloading resources;
    - :class:`~p2pnode.services.Services`: serving named services and calling other
      nodes' (``serve``, ``call``, ``call_stream``, ``find_service``, ...);
    - :class:`~p2pnode.control.server.ControlServer`: the local HTTP API (its URL and
      token are written to the home for the CLI); none with ``control_api=False``.

    Lifecycle (:attr:`state`): ``new`` -> ``starting`` -> ``running`` ->
    ``stopping`` -> ``stopped``; a failed :meth:`start` closes what it opened and
    ends ``failed``. A node is started once. :meth:`stop` ends every background
    task, saves the routing table and closes the parts in reverse order;
    :meth:`abort` ends it as a crash would. Use it as an async context manager::

        async with Node(NodeConfig(home=Path("/tmp/n1"), port=0)) as node:
            print(node.peer_id, node.port)

    The parts (:attr:`discovery`, :attr:`peer_host`, :attr:`exchange`, ...) raise
    :class:`~p2pnode.errors.NodeNotRunning` before the node has started.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        clock: Clock = MONOTONIC,
        service_limits: NodeServiceLimits | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        # Node-wide limits of the services served: config.services, unless the older
        # service_limits= keyword (hostile tests, benchmarks) overrides them.
        self._service_limits = service_limits or config.services
        self.home: Path = config.home
        self._lock = HomeLock(self.home)
        self._identity: Identity | None = None
        self._discovery: Discovery | None = None
        self._host: PeerHost | None = None
        self._exchange: Exchange | None = None
        self._services: Services | None = None
        self._relay: Relay | None = None
        self._holepunch: HolePuncher | None = None
        self._control: ControlServer | None = None
        self._autonat: AutoNat | None = None
        self._reachability_listeners: list[Callable[[ReachabilityChanged], None]] = []
        # Set (and replaced by a fresh one) whenever a verdict changes.
        self.reachability_changed = asyncio.Event()
        self._portmap: PortMapper | None = None
        self._tasks = TaskSet("node")
        self._stop_requested = asyncio.Event()
        self._joined = asyncio.Event()
        self._started_at = 0.0
        self._port = 0
        self._state = NodeState.NEW

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def state(self) -> NodeState:
        return self._state

    @property
    def running(self) -> bool:
        return self._state is NodeState.RUNNING

    async def start(self) -> None:
        if self._state is not NodeState.NEW:
            raise UsageError(f"a node is started once (this one is {self._state})")
        self._state = NodeState.STARTING
        try:
            self._lock.acquire()
        except BaseException:
            self._state = NodeState.FAILED
            raise
        try:
            await self._start_parts()
        except BaseException:
            await self._stop_parts()
            self._lock.release()
            self._state = NodeState.FAILED
            raise
        self._state = NodeState.RUNNING
        self._started_at = time.monotonic()
        self._tasks.spawn(self._join_and_maintain(), "join")
        log.info("node %s ready on port %d", self.peer_id, self._port)

    async def _start_parts(self) -> None:
        self._identity = Identity.load_or_create(self.home)
        self._discovery, self._host = await self._bind_dht_and_tcp()
        self._exchange = Exchange(
            self.home,
            self.config.exchange,
            self._discovery,
            self._host,
            self._port,
            clock=self.clock,
        )
        await self._exchange.start()
        self._services = Services(
            self._host, self._discovery, self._port, clock=self.clock, limits=self._service_limits
        )
        self._services.start()
        self._autonat = AutoNat(
            self._host, self._discovery, self._port, self.config.autonat, clock=self.clock
        )
        self._autonat.on_change(self._on_reachability)
        self._autonat.start()
        if self.port_mapping_wanted():
            self._portmap = PortMapper(self.config.portmap, self._port)
            self._portmap.start()  # in the background: never delays start
        if self._portmap is not None:
            self._portmap.on_change(self.mapping_changed)
        self._relay = Relay(
            self._host,
            self._discovery,
            self.config.relay,
            self._tcp_reachability,
            self.clock,
            port=self._port,
        )
        self._relay.start()
        if self.config.holepunch.enabled:
            self._holepunch = HolePuncher(
                self._host,
                listen_port=self._port,
                addresses=self._punch_addresses,
                reachability=self._tcp_reachability,
                config=self.config.holepunch,
                bind_host=self.config.host if self.config.host != "::" else "0.0.0.0",
            )
            self._holepunch.start()
            self._host.on_established(self._on_connection)
        if not self.config.control_api:
            clear_control(self.home)  # a stale file would point the CLI at nothing
            return
        token = secrets.token_urlsafe(32)
        self._control = ControlServer(self, token)
        url = await self._control.start(
            self.config.api_host, self.config.api_port or 0, self.home / API_SOCKET
        )
        write_control(self.home, url, token, self._control.socket_path)

    async def _bind_dht_and_tcp(self) -> tuple[Discovery, PeerHost]:
        """Bind UDP P for the DHT and TCP P for peers; with port 0, find a P free for both."""
        identity = self.identity
        attempts = BIND_ATTEMPTS if self.config.port == 0 else 1
        for attempt in range(attempts):
            discovery = Discovery(identity, self.config.dht, clock=self.clock)
            try:
                port = await discovery.listen(self.config.host, self.config.port)
            except OSError as exc:
                await discovery.close()
                raise UsageError(
                    f"cannot listen on UDP {self.config.host}:{self.config.port}: {exc.strerror}"
                ) from None
            host = PeerHost(identity, self.config.net, clock=self.clock)
            try:
                await host.listen(self.config.host, port)
            except OSError as exc:
                await host.close()
                await discovery.close()
                if exc.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                    continue
                raise UsageError(
                    f"cannot listen on TCP {self.config.host}:{port}: {exc.strerror}"
                ) from None
            self._port = port
            return discovery, host
        raise UsageError("no port free for both UDP and TCP")  # pragma: no cover

    async def stop(self) -> None:
        if self._state is not NodeState.RUNNING:
            return
        self._state = NodeState.STOPPING
        started = time.monotonic()
        await self._tasks.close()
        log.debug("ended background tasks in %.3f s", time.monotonic() - started)
        self._save_contacts()
        await self._stop_parts()
        clear_control(self.home)
        self._lock.release()
        self._state = NodeState.STOPPED
        log.info("node %s stopped", self.peer_id)

    async def abort(self) -> None:
        """End the node abruptly, as a crash would: no routing table saved, nothing
        said to peers. For churn tests and simulations; data on disk stays valid."""
        if self._state is not NodeState.RUNNING:
            return
        self._state = NodeState.STOPPING
        await self._tasks.close()
        await self._stop_parts()
        self._lock.release()
        self._state = NodeState.STOPPED

    def port_mapping_wanted(self) -> bool:
        """Port mapping is on, and the node listens where a router could forward
        to (not loopback)."""
        if not self.config.port_mapping:
            return False
        try:
            return not ipaddress.ip_address(self.config.host).is_loopback
        except ValueError:  # a host name
            return self.config.host != "localhost"

    async def _stop_parts(self) -> None:
        # The port mappings go first: removing them needs no other part.
        parts = (
            self._portmap,
            self._control,
            self._holepunch,
            self._relay,
            self._autonat,
            self._services,
            self._exchange,
            self._host,
            self._discovery,
        )
        for part in parts:
            if part is not None:
                started = time.monotonic()
                await part.close()
                log.debug("closed %s in %.3f s", type(part).__name__, time.monotonic() - started)

    def request_stop(self) -> None:
        """Ask the owner of this node (e.g. `p2pnode start`) to stop it."""
        self._stop_requested.set()

    async def wait_stop_requested(self) -> None:
        await self._stop_requested.wait()

    # -- joining -------------------------------------------------------------------

    async def _join_and_maintain(self) -> None:
        """Join through --bootstrap or saved contacts, retrying with backoff; then
        save the routing table periodically and rejoin if it ever empties."""
        delay = 1.0
        while True:
            if not self._joined.is_set() or not self.discovery.contacts():
                joined = await self.join_once()
                if joined is None:  # nobody to join through: first node of a network
                    self._joined.set()
                elif joined:
                    self._joined.set()
                    delay = 1.0
                    if self._autonat is not None:
                        self._autonat.wake()  # servers to ask are known now
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.config.bootstrap_max_backoff)
                    continue
            self._save_contacts()
            await asyncio.sleep(self.config.save_interval)

    async def join_once(self) -> bool | None:
        """One join attempt. None when there is nothing to join through."""
        named = list(self.config.bootstrap)
        saved = [(c.host, c.port) for c in load_contacts(self.home)]
        if not named and not saved:
            return None
        addrs = await self._resolve(named) + [a for a in saved if a not in named]
        contacts = await self.discovery.bootstrap(addrs) if addrs else []
        if contacts:
            log.info("joined the network through %d contact(s)", len(contacts))
            return True
        shown = ", ".join(f"{h}:{p}" for h, p in named) or f"{len(saved)} saved contact(s)"
        log.warning("no bootstrap address answered (%s); will retry", shown)
        return False

    async def _resolve(self, addrs: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        """Resolve host names without blocking the loop, to the family we listen on."""
        loop = asyncio.get_running_loop()
        v6 = ":" in self.config.host
        out: list[tuple[str, int]] = []
        for host, port in addrs:
            try:
                infos = await loop.getaddrinfo(
                    host,
                    port,
                    family=socket.AF_UNSPEC if v6 else socket.AF_INET,
                    type=socket.SOCK_DGRAM,
                )
            except OSError as exc:
                log.warning("cannot resolve bootstrap host %s: %s", host, exc)
                continue
            for family, _, _, _, sockaddr in infos:
                ip = str(sockaddr[0])
                if v6 and family == socket.AF_INET:
                    ip = f"::ffff:{ip}"
                if (ip, port) not in out:
                    out.append((ip, port))
                break
        return out

    async def wait_joined(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._joined.wait(), timeout)

    async def find_peer(self, peer_id: str | bytes) -> Contact | None:
        """A peer's DHT contact by its peer id (the text form or the 20 bytes)."""
        node_id = as_node_id(peer_id)
        if node_id == self.node_id:  # never in its own routing table
            host, _, port = self.listen_addresses()[0].rpartition(":")
            return Contact(node_id, host.strip("[]"), int(port), None)
        return await self.discovery.find_peer(node_id)

    def _save_contacts(self) -> None:
        if self._discovery is None:
            return
        contacts = [SavedContact(c.node_id, c.host, c.port) for c in self._discovery.contacts()]
        if contacts:
            try:
                save_contacts(self.home, contacts)
            except OSError as exc:
                log.warning("cannot save contacts: %s", exc)

    # -- reachability (p2pnode/nat) ------------------------------------------------

    @property
    def autonat(self) -> AutoNat:
        return self._part(self._autonat, "autonat")

    def on_reachability_change(self, listener: Callable[[ReachabilityChanged], None]) -> None:
        """Call ``listener`` with each verdict change (TCP or UDP), e.g. to reserve
        relay slots once private. (Or wait on :attr:`reachability_changed`.)"""
        self._reachability_listeners.append(listener)

    def mapping_changed(self, external: tuple[str, int] | None) -> None:
        """Port mapping's input: the router's external (ip, port), or None when
        the mapping is gone; a dial-back to it then decides."""
        self.autonat.mapping_changed(external)

    def _on_reachability(self, event: ReachabilityChanged) -> None:
        if event.transport == UDP and self._discovery is not None:
            # Not reachable over UDP: a DHT client (libp2p kad-dht's auto mode).
            self._discovery.set_client_mode(event.new is Reachability.PRIVATE)
        if event.transport == TCP and self._relay is not None:
            # private: reserve relay slots now; public: offer a relay
            self._relay.refresh()
        for listener in list(self._reachability_listeners):
            listener(event)
        self.reachability_changed.set()
        self.reachability_changed = asyncio.Event()

    @property
    def reachability(self) -> ReachabilityStatus:
        autonat = self.autonat
        now = self.clock.now()
        core = autonat.core
        observed = tuple(
            dict.fromkeys(  # the same IP seen over TCP and UDP is listed once
                f"{a.ip}:{a.port}" if a.port is not None else a.ip
                for a in autonat.observed.confirmed(now)
            )
        )
        return ReachabilityStatus(
            tcp=core.verdict(TCP),
            udp=core.verdict(UDP),
            observed=observed,
            addresses=tuple(self.reachable_addresses()),
            dht_mode="client" if self.discovery.client_mode else "server",
            time_to_verdict={t: core.time_to_verdict(t) for t in (TCP, UDP)},
        )

    def reachable_addresses(self) -> list[str]:
        """What another machine should dial (host:port), best first: when TCP is
        public, the confirmed observed IPs (with a mapping's port, else ours) and
        our own addresses; while unknown, our own addresses that are globally
        routable; none when private (relay addresses are another part's)."""
        autonat = self.autonat
        verdict = autonat.core.verdict(TCP)
        if verdict is Reachability.PRIVATE:
            return []
        own = self.join_candidates()
        if verdict is Reachability.UNKNOWN:
            ips = [ip for ip in own if _is_global(ip)]
        else:
            # Dialing in: the router forwards a mapping's port, so that is the port
            # of every observed IP too (ours when there is no mapping).
            port = autonat.core.probe_ports(self._port, self._port)[0]
            external = self._external_addresses(port)
            outside = {ip for ip, _ in external}
            shown = [_host_port(ip, p) for ip, p in external]
            return shown + [_host_port(ip, self._port) for ip in own if ip not in outside]
        return [_host_port(ip, self._port) for ip in ips]

    def join_candidates(self) -> list[str]:
        """Our own addresses another machine might join through (no port)."""
        host = self.config.host
        if host in ("0.0.0.0", "::"):
            return join_candidates(_local_addresses(v6=host == "::"))
        return [host]

    # -- views -----------------------------------------------------------------------

    def _part(self, part: _Part | None, name: str) -> _Part:
        if part is None:
            raise NodeNotRunning(f"node.{name}: the node has not started (it is {self._state})")
        return part

    @property
    def identity(self) -> Identity:
        return self._part(self._identity, "identity")

    @property
    def discovery(self) -> Discovery:
        return self._part(self._discovery, "discovery")

    @property
    def peer_host(self) -> PeerHost:
        return self._part(self._host, "peer_host")

    @property
    def exchange(self) -> Exchange:
        return self._part(self._exchange, "exchange")

    @property
    def services_part(self) -> Services:
        return self._part(self._services, "services")

    @property
    def port_mapper(self) -> PortMapper | None:
        """The port mapper (None: port mapping off, or bound to loopback)."""
        return self._portmap

    @property
    def relay(self) -> Relay:
        return self._part(self._relay, "relay")

    def _on_connection(self, conn: PeerConnection) -> None:
        # DCUtR: the side that dialed through a relay tries for a direct
        # connection at once; the relayed one stays if that fails.
        node_id = conn.remote_node_id
        punch = self._holepunch
        if conn.via == Via.RELAYED and conn.dialed is not None and node_id and punch:
            punch.upgrade_soon(node_id)

    def _punch_addresses(self) -> list[tuple[str, int]]:
        """Where a peer should open to us when punching: a mapping if we have one,
        and the IPs peers observed for us at our listening port, since we open from
        it and a port-keeping NAT maps it to itself (reachable_addresses, dialing
        in, pairs them with the mapping's port instead)."""
        return self._external_addresses(self._port)

    def _external_addresses(self, observed_port: int) -> list[tuple[str, int]]:
        """A port mapping's external (ip, port) first, then each confirmed observed
        IP at ``observed_port``: the one rule that differs between dialing in
        (reachable_addresses) and punching (_punch_addresses)."""
        autonat = self.autonat
        mapped = autonat.core.mapping
        out = [(mapped[0], mapped[1])] if mapped else []
        seen = dict.fromkeys(a.ip for a in autonat.observed.confirmed(self.clock.now()))
        return out + [(ip, observed_port) for ip in seen if (ip, observed_port) not in out]

    def _tcp_reachability(self) -> Reachability:
        """The verdict the relay and the hole puncher follow (unknown until AutoNAT
        runs): TCP's, since peers dial this node's TCP port (relays carry TCP)."""
        if self._autonat is None:
            return Reachability.UNKNOWN
        return self._autonat.core.verdict(TCP)

    @property
    def node_id(self) -> bytes:
        return self.identity.node_id

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id if self._identity else "?"

    @property
    def port(self) -> int:
        return self._port

    @property
    def api_url(self) -> str:
        if not self.config.control_api:
            raise UsageError("this node runs without a control API (control_api=False)")
        return self._part(self._control, "api_url").url

    def listen_addresses(self) -> list[str]:
        host = self.config.host
        if host in ("0.0.0.0", "::"):
            shown = ["127.0.0.1", *_local_addresses(v6=host == "::")]
        else:
            shown = [host]
        return [f"[{h}]:{self._port}" if ":" in h else f"{h}:{self._port}" for h in shown]

    def join_addresses(self) -> list[str]:
        """The addresses another machine would join through, best first: on a
        wildcard host, the interfaces' own (public before private, IPv4 first);
        loopback only when there is nothing else."""
        reachable = self.reachable_addresses() if self._autonat is not None else []
        own = [_host_port(h, self._port) for h in self.join_candidates() or ["127.0.0.1"]]
        return reachable + [a for a in own if a not in reachable]

    def bootstrap_arg(self) -> str:
        return f"--bootstrap {self.join_addresses()[0]}"

    def describe(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "node_id": self.node_id.hex(),
            "public_key": self.identity.public_key.hex(),
            "addresses": self.listen_addresses(),
            "port": self._port,
            "api": self.api_url if self.config.control_api else None,
            "bootstrap": self.bootstrap_arg(),
            "join_addresses": self.join_addresses(),
            **self._reachability_json(),
            "version": __version__,
        }

    def _reachability_json(self) -> dict[str, Any]:
        if self._autonat is None:
            return {"reachability": str(Reachability.UNKNOWN)}
        status = self.reachability.to_json()
        # "addresses" already names the listen addresses here
        status["reachable_addresses"] = status.pop("addresses")
        return status

    def peers(self) -> list[dict[str, Any]]:
        # Contact.last_seen is on the node's clock; the API shows wall time.
        offset = time.time() - self.clock.now()
        host = self.peer_host

        def via(node_id: bytes) -> str | None:  # how we are connected to it, if we are
            conn = host.connection_to(node_id)
            return None if conn is None else conn.via

        return [
            {
                "peer_id": peer_id_to_str(c.node_id),
                "address": f"[{c.host}]:{c.port}" if ":" in c.host else f"{c.host}:{c.port}",
                "last_seen": None if c.last_seen is None else c.last_seen + offset,
                "rtt_ms": None if c.rtt is None else round(c.rtt * 1000, 1),
                "via": via(c.node_id),
            }
            for c in self.discovery.contacts()
        ]

    def connections(self) -> list[dict[str, Any]]:
        return self.peer_host.connections()

    def status(self) -> dict[str, Any]:
        proc = psutil.Process()
        return {
            "peer_id": self.peer_id,
            "state": self._state,
            "uptime": round(time.monotonic() - self._started_at, 3),
            "joined": self._joined.is_set(),
            "routing_table_size": len(self.discovery.contacts()),
            "dht": self.discovery.stats(),
            "net": self.peer_host.stats(),
            "exchange": self.exchange.stats(),
            "resources": len(self.exchange.list()),
            **self._reachability_json(),
            "nat": self.autonat.snapshot(),
            "services": self.services(),
            "port_mapping": self._port_mapping_status(),
            "relay": self.relay.stats(),
            "holepunch": self._holepunch.stats() if self._holepunch is not None else {},
            "rss_bytes": proc.memory_info().rss,
            "version": __version__,
        }

    def _port_mapping_status(self) -> dict[str, Any]:
        if self._portmap is not None:
            return self._portmap.status()
        why = "loopback" if self.config.port_mapping else "turned off"
        return {"enabled": False, "reason": why, "mappings": []}

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Raw counters for the control API's ``GET /metrics``, read at scrape time
        only (nothing on the data path); the process figures come from elsewhere."""
        return {
            "node_id": self.node_id,
            "peer_id": self.peer_id,
            "version": __version__,
            "uptime": time.monotonic() - self._started_at,
            "joined": self._joined.is_set(),
            "dht": self.discovery.stats(),
            "dht_contact_ids": [c.node_id for c in self.discovery.contacts()],
            "net": self.peer_host.stats(),
            "exchange": self.exchange.stats(),
            "services": self.services_part.stats(),
            "services_served": self.services(),
            "nat": self.autonat.snapshot(),
            "portmap": self._portmap.stats() if self._portmap is not None else {},
            "relay": self.relay.flat_stats(),
        }

    # -- services (p2pnode/services) ------------------------------------------------

    def serve(
        self,
        name: str,
        handler: UnaryHandler,
        *,
        idempotent: bool = False,
        limits: ServiceLimits | None = None,
    ) -> None:
        """Serve ``name``: ``await handler(request, ctx)`` answers each call; announced
        in the DHT. ``idempotent``: callers may retry it on another provider."""
        self.services_part.serve(name, handler, idempotent=idempotent, limits=limits)

    def serve_stream(
        self,
        name: str,
        handler: StreamHandler,
        *,
        idempotent: bool = False,
        limits: ServiceLimits | None = None,
    ) -> None:
        """Serve a stream: ``handler(request, ctx)`` is an async iterator of items,
        advanced only as the caller grants credit."""
        self.services_part.serve_stream(name, handler, idempotent=idempotent, limits=limits)

    def unserve(self, name: str) -> None:
        """Stop serving ``name`` (ServiceNotFound if it is not served)."""
        self.services_part.unserve(name)

    def services(self) -> list[dict[str, Any]]:
        """What this node serves: name, kind, idempotent, calls, errors, p50_ms, in_flight."""
        return self.services_part.services()

    async def call(
        self, name: str, request: object, *, timeout: float = 10.0, peer: str | bytes | None = None
    ) -> object:
        """Call ``name`` on a provider found in the DHT (or on ``peer``); raises a
        ``ServiceError`` subclass (p2pnode.errors) when it fails."""
        return await self.services_part.call(name, request, timeout=timeout, peer=peer)

    def call_stream(
        self, name: str, request: object, *, timeout: float = 60.0, peer: str | bytes | None = None
    ) -> AsyncGenerator[object, None]:
        """The items of stream ``name``, pulled as they are consumed. Leaving early:
        ``aclose()`` it (or ``contextlib.aclosing``) to cancel it at the provider now."""
        return self.services_part.call_stream(name, request, timeout=timeout, peer=peer)

    async def find_service(self, name: str) -> list[ProviderRecord]:
        """Providers of ``name`` announced in the DHT."""
        return await self.services_part.find_service(name)


def _is_global(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_global
    except ValueError:  # a host name
        return False


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def join_candidates(addresses: Sequence[str]) -> list[str]:
    """Non-loopback, non-link-local addresses, public ones first, then IPv4 first."""
    ips = []
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
            ips.append(ip)
    ips.sort(key=lambda ip: (not ip.is_global, ip.version))
    return [str(ip) for ip in dict.fromkeys(ips)]


def _local_addresses(*, v6: bool) -> list[str]:
    """Non-loopback interface addresses, for the start-up banner."""
    out: list[str] = []
    with contextlib.suppress(OSError):
        for addrs in psutil.net_if_addrs().values():
            for addr in addrs:
                if addr.family == socket.AF_INET or (v6 and addr.family == socket.AF_INET6):
                    try:
                        ip = ipaddress.ip_address(addr.address.split("%")[0])
                    except ValueError:
                        continue
                    if not ip.is_loopback and not ip.is_link_local:
                        out.append(str(ip))
    return out
