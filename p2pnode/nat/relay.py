"""The circuit relay, both sides: the service a public node offers
(:class:`RelayService`) and the reservations a private node keeps
(:class:`RelayClient`). The decisions are :class:`~p2pnode.nat.relay_core.RelayCore`'s;
the words are ``relay_wire``'s; this module moves sockets.

How a dialer D reaches a private node C through a relay R:

1. C holds an ordinary peer connection to R and a reservation on it (``Reserve``),
   renewed at half its lifetime, and announces ``[R host, R port, R id]`` in its
   signed records.
2. D opens a new TCP connection to R and sends a connect hello naming C. R's
   listener tells it from a Noise handshake by its first two bytes
   (``p2pnode/net/firstbytes.py``).
3. R checks C's reservation and its limits, and sends C ``Incoming(circuit id,
   secret)`` over the reservation connection. C opens a new TCP connection to R
   with an accept hello naming both. R answers both sides ``ok`` and splices the
   two sockets: a byte copy with backpressure (a side whose peer does not read is
   not read either), counted, ended at the circuit's limits.
4. D and C run the ordinary Noise handshake over the spliced sockets
   (``PeerHost.adopt``, ``via="relayed"``): it is end to end, the relay sees only
   ciphertext, and a relay that alters a byte breaks the connection (a chunk
   fails authentication) instead of the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from p2pnode.clock import MONOTONIC, Clock
from p2pnode.dht.discovery import Contact, Discovery
from p2pnode.errors import P2PError, ProtocolError
from p2pnode.identity import peer_id_to_str
from p2pnode.nat.relay_core import Circuit, RelayConfig, RelayCore, RelayLimits, RelayStatus
from p2pnode.nat.relay_wire import (
    Accept,
    Connect,
    Hello,
    Incoming,
    IncomingReply,
    Reserve,
    ReserveReply,
    Status,
    encode_hello,
    register,
)
from p2pnode.net.dispatch import routes_of
from p2pnode.net.host import PeerAddress, PeerHost, RelayHop, read_hello
from p2pnode.tasks import TaskSet
from p2pnode.wire.messages import Message, Ping

log = logging.getLogger(__name__)

__all__ = ["Relay", "RelayClient", "RelayConfig", "RelayService"]

# A relay's write buffer per spliced socket: above it, the other side is not read.
SPLICE_HIGH = 1024 * 1024
# Each spliced socket is read into a buffer of its own, reused while the other
# socket takes every byte at once (no allocation per read).
SPLICE_READ = 256 * 1024
# At most this many circuits being accepted at once by a private node.
MAX_ACCEPTING = 16


# -- the service (public nodes) -------------------------------------------------------------


class _Half(asyncio.BufferedProtocol):
    """One spliced socket: what it reads is written to the other one."""

    def __init__(self, splice: _Splice, side: int) -> None:
        self.splice = splice
        self.side = side
        self._view = memoryview(bytearray(SPLICE_READ))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        if self.splice.forward(self.side, self._view[:nbytes]):
            # The other socket kept some of it (a transport may keep a view of
            # it rather than a copy): read into a new buffer from now on.
            self._view = memoryview(bytearray(SPLICE_READ))

    def pause_writing(self) -> None:  # our socket is full: stop reading the other
        self.splice.transports[1 - self.side].pause_reading()

    def resume_writing(self) -> None:
        other = self.splice.transports[1 - self.side]
        if not other.is_closing():
            other.resume_reading()

    def eof_received(self) -> bool:
        self.splice.eof(self.side)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.splice.lost(self.side)


class _Splice:
    """A live circuit: transports[0] the dialer's socket, [1] the target's."""

    def __init__(
        self, service: RelayService, circuit: Circuit, transports: list[asyncio.Transport]
    ) -> None:
        self.service = service
        self.circuit = circuit
        self.transports = transports
        self._eof = [False, False]
        self.done = False
        for side, transport in enumerate(transports):
            transport.set_write_buffer_limits(high=SPLICE_HIGH, low=SPLICE_HIGH // 4)
            transport.set_protocol(_Half(self, side))

    def forward(self, side: int, data: memoryview) -> bool:
        """Write ``data`` to the other socket; whether it kept some of it buffered."""
        service = self.service
        out = service.pass_bytes(self.circuit, side, data)
        other = self.transports[1 - side]
        other.write(out)
        if not service.core.carried(self.circuit, len(out), service.clock.now()):
            self.close(abort=True)  # past the circuit's byte limit (counted by the core)
        return other.get_write_buffer_size() > 0

    def eof(self, side: int) -> None:
        self._eof[side] = True
        other = self.transports[1 - side]
        if other.can_write_eof() and not other.is_closing():
            other.write_eof()
        if all(self._eof):
            self.close()

    def lost(self, side: int) -> None:
        self.service.core.end(self.circuit.circuit_id, "closed")
        self.close()

    def close(self, *, abort: bool = False) -> None:
        if self.done:
            return
        self.done = True
        self.service.splices.pop(self.circuit.circuit_id, None)
        self.service.core.end(self.circuit.circuit_id, "closed")
        for transport in self.transports:
            if abort:
                transport.abort()
            else:
                transport.close()  # after what is buffered for it


class _Waiting(asyncio.Protocol):
    """A dialer's socket while its circuit waits for the target's accept."""

    def __init__(self, service: RelayService, circuit_id: int) -> None:
        self.service = service
        self.circuit_id = circuit_id

    def data_received(self, data: bytes) -> None:  # paused; a hostile dialer gets dropped
        self.service.drop_pending(self.circuit_id, "dialer_early_bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self.service.drop_pending(self.circuit_id, "dialer_gone")


class RelayService:
    """A limited circuit relay on this node's TCP port. Reservations come as
    ``Reserve`` requests on peer connections; circuits as hellos on new
    connections (the host hands them over). Stats: :meth:`stats`."""

    def __init__(self, host: PeerHost, limits: RelayLimits, clock: Clock = MONOTONIC) -> None:
        self.host = host
        self.limits = limits
        self.clock = clock
        self.core = RelayCore(limits)
        self.counters = self.core.counters
        self.hello_timeout = limits.hello_timeout
        self.max_undecided = limits.max_undecided
        self.enabled = False
        self.pending: dict[int, asyncio.Transport] = {}
        self.splices: dict[int, _Splice] = {}
        self._tasks = TaskSet("relay")
        self._timer: asyncio.TimerHandle | None = None
        register(host.registry)

    def start(self) -> None:
        routes_of(self.host).route((Reserve,), self._on_reserve)

    def set_enabled(self, enabled: bool) -> None:
        """Offer the relay (or stop offering it: live circuits run to their end)."""
        if enabled == self.enabled:
            return
        self.enabled = enabled
        self.host.set_circuit_acceptor(self if enabled else None)
        if not enabled:
            for peer in list(self.core.reservations):
                self.core.unreserve(peer)

    async def close(self) -> None:
        self.set_enabled(False)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for splice in list(self.splices.values()):
            splice.close(abort=True)
        for circuit_id in list(self.pending):
            self.drop_pending(circuit_id, "relay_closing")
        await self._tasks.close()

    def stats(self) -> dict[str, int]:
        out = self.core.stats()
        out["enabled"] = int(self.enabled)
        return out

    def pass_bytes(
        self, circuit: Circuit, side: int, data: memoryview
    ) -> bytes | bytearray | memoryview:
        """What crosses a circuit, as it crosses it (a hook for tests: a relay
        that looks at or alters the bytes)."""
        return data

    # -- reservations ------------------------------------------------------------------

    async def _on_reserve(self, remote: bytes, msg: Message) -> Message:
        limits = self.limits
        if not self.enabled:
            self.counters[f"refused.{RelayStatus.DISABLED}"] += 1
            return ReserveReply(RelayStatus.DISABLED, 0, 0, 0)
        ip = self.host.peer_ip(remote) or "?"
        status = self.core.reserve(remote, ip, self.clock.now())
        self._arm()
        if status is not RelayStatus.OK:
            return ReserveReply(status, 0, 0, 0)
        return ReserveReply(
            RelayStatus.OK,
            int(limits.reservation_ttl),
            int(limits.circuit_duration),
            limits.circuit_bytes,
        )

    # -- circuits (CircuitAcceptor) -----------------------------------------------------

    def circuit_hello(self, transport: asyncio.Transport, hello: Hello, ip: str) -> None:
        if isinstance(hello, Connect):
            self._connect(transport, hello, ip)
        elif isinstance(hello, Accept):
            self._accept(transport, hello)
        else:
            self.counters["hello_unexpected"] += 1
            transport.abort()

    def _connect(self, transport: asyncio.Transport, hello: Connect, ip: str) -> None:
        transport.pause_reading()
        now = self.clock.now()
        if self.host.connection_to(hello.target) is None:
            # The reservation's connection is gone: so is the reservation.
            self.core.unreserve(hello.target)
        result = self.core.open_circuit(hello.target, ip, now)
        if isinstance(result, RelayStatus):
            _refuse(transport, result)
            return
        circuit_id = result.circuit_id
        self.pending[circuit_id] = transport
        transport.set_protocol(_Waiting(self, circuit_id))
        self._arm()
        self._tasks.spawn(self._ask_target(result, ip), "relay-incoming")

    async def _ask_target(self, circuit: Circuit, dialer_ip: str) -> None:
        conn = self.host.connection_to(circuit.target)
        accepted = False
        if conn is not None:
            try:
                async with asyncio.timeout(self.limits.accept_timeout):
                    answer = await conn.request(
                        Incoming(circuit.circuit_id, circuit.secret, dialer_ip[:64])
                    )
                accepted = isinstance(answer, IncomingReply) and answer.accepted
            except (TimeoutError, P2PError) as exc:
                log.debug("relay: target did not take circuit %d: %s", circuit.circuit_id, exc)
        if not accepted and circuit.circuit_id in self.pending:
            self.core.end(circuit.circuit_id, "not_accepted")
            self.drop_pending(circuit.circuit_id, "", status=RelayStatus.NOT_ACCEPTED)

    def _accept(self, transport: asyncio.Transport, hello: Accept) -> None:
        result = self.core.accept(hello.circuit_id, hello.secret, self.clock.now())
        if isinstance(result, RelayStatus):  # a wrong guess leaves the circuit waiting
            _refuse(transport, result)
            return
        dialer = self.pending.pop(hello.circuit_id, None)
        if dialer is None or dialer.is_closing():
            self.core.end(hello.circuit_id, "dialer_gone")
            _refuse(transport, RelayStatus.NOT_ACCEPTED)
            return
        ok = encode_hello(Status(RelayStatus.OK))
        dialer.write(ok)
        transport.write(ok)
        splice = _Splice(self, result, [dialer, transport])
        self.splices[result.circuit_id] = splice
        dialer.resume_reading()
        self._arm()

    def drop_pending(
        self, circuit_id: int, reason: str, *, status: RelayStatus | None = None
    ) -> None:
        transport = self.pending.pop(circuit_id, None)
        if reason:
            self.core.end(circuit_id, reason)
        if transport is None:
            return
        if status is not None:
            _refuse(transport, status)
        else:
            transport.abort()

    # -- time ----------------------------------------------------------------------

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self.core.next_deadline()
        if at is not None:
            delay = max(0.0, at - self.clock.now()) + 0.01
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        for circuit in self.core.expire(self.clock.now()):
            if circuit.circuit_id in self.pending:
                self.drop_pending(circuit.circuit_id, "", status=RelayStatus.NOT_ACCEPTED)
            splice = self.splices.get(circuit.circuit_id)
            if splice is not None:
                splice.close(abort=True)
        self._arm()


def _refuse(transport: asyncio.Transport, status: RelayStatus) -> None:
    if not transport.is_closing():
        transport.write(encode_hello(Status(status)))
        transport.close()


# -- the client (private nodes) --------------------------------------------------------------


@dataclass
class _Held:
    hop: RelayHop
    expires: float
    renew_at: float
    pinged: float


class RelayClient:
    """Keeps ``config.reservations`` reservations while :meth:`active` says so,
    tells ``on_change`` the relay addresses to announce, and accepts the
    circuits the relays announce (``Incoming``)."""

    def __init__(
        self,
        host: PeerHost,
        config: RelayConfig,
        contacts: Callable[[], list[Contact]],
        active: Callable[[], bool],
        on_change: Callable[[tuple[RelayHop, ...]], None],
        clock: Clock = MONOTONIC,
    ) -> None:
        self.host = host
        self.config = config
        self.contacts = contacts
        self.active = active
        self.on_change = on_change
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self.held: dict[bytes, _Held] = {}
        self._refused: dict[tuple[str, int], float] = {}  # retry after
        self._accepting = 0
        self._stepping = asyncio.Lock()  # one step at a time (the loop, a refresh)
        self._tasks = TaskSet("relay-client")
        register(host.registry)

    def start(self) -> None:
        routes_of(self.host).route((Incoming,), self._on_incoming)
        self._tasks.spawn(self._maintain(), "relay-reservations")

    async def close(self) -> None:
        await self._tasks.close()

    def hops(self) -> tuple[RelayHop, ...]:
        return tuple(h.hop for h in self.held.values())

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        out["reservations_held"] = len(self.held)
        return out

    async def _maintain(self) -> None:
        short = 0.5  # while short of reservations: look again soon, backing off
        while True:
            try:
                await self.step()
            except P2PError as exc:  # a relay misbehaved: next round
                log.debug("relay reservations: %s", exc)
            if self.active() and len(self.held) < self.config.reservations:
                short = min(short * 2, self.config.check_interval)
                await asyncio.sleep(short)
            else:
                short = 0.5
                await asyncio.sleep(self.config.check_interval)

    async def step(self) -> None:
        """Drop lost reservations, renew and keep alive the others, fill up."""
        async with self._stepping:
            await self._step()

    async def _step(self) -> None:
        before = self.hops()
        now = self.clock.now()
        if not self.active():
            self.held.clear()
        for relay_id, held in list(self.held.items()):
            if held.expires <= now or self.host.connection_to(relay_id) is None:
                del self.held[relay_id]
                self.counters["reservations_lost"] += 1
        for relay_id, held in list(self.held.items()):
            if now >= held.renew_at:
                await self._reserve(held.hop[0], held.hop[1], relay_id)
            elif now - held.pinged >= self.config.check_interval * 6:
                held.pinged = now
                with contextlib.suppress(P2PError, TimeoutError):
                    await self._request(PeerAddress(relay_id, held.hop[0], held.hop[1]), Ping())
        if self.active():
            for host, port, candidate in self._candidates(now):
                if len(self.held) >= self.config.reservations:
                    break
                await self._reserve(host, port, candidate)
        if self.hops() != before:
            self.on_change(self.hops())

    def _candidates(self, now: float) -> list[tuple[str, int, bytes | None]]:
        for key in [k for k, at in self._refused.items() if at <= now]:
            del self._refused[key]
        out: list[tuple[str, int, bytes | None]] = []
        if self.config.relays:
            out = [(h, p, None) for h, p in self.config.relays]
        else:
            contacts = sorted(
                self.contacts(), key=lambda c: (c.rtt is None, c.rtt if c.rtt is not None else 0)
            )
            out = [(c.host, c.port, c.node_id) for c in contacts]
        held = {(h.hop[0], h.hop[1]) for h in self.held.values()}
        return [
            c
            for c in out
            if (c[0], c[1]) not in held
            and (c[0], c[1]) not in self._refused
            and c[2] not in self.held
        ][:16]

    async def _reserve(self, host: str, port: int, relay_id: bytes | None) -> None:
        now = self.clock.now()
        try:
            conn = await self.host.connect(PeerAddress(relay_id, host, port))
            relay = conn.remote_node_id
            assert relay is not None
            async with asyncio.timeout(self.host.limits.request_timeout):
                answer = await conn.request(Reserve())
        except (P2PError, TimeoutError) as exc:
            self.counters["reserve_failed"] += 1
            self._refused[(host, port)] = now + 60.0
            self.held.pop(relay_id or b"", None)
            log.debug("relay %s:%d: no reservation: %s", host, port, exc)
            return
        if not isinstance(answer, ReserveReply) or answer.status != RelayStatus.OK:
            status = answer.status if isinstance(answer, ReserveReply) else "bad_answer"
            self.counters[f"reserve_refused.{status}"] += 1
            self._refused[(host, port)] = now + 60.0
            self.held.pop(relay, None)
            return
        ttl = max(1.0, float(answer.expires_in))
        self.counters["reservations_made"] += 1
        self.held[relay] = _Held((host, port, relay), now + ttl, now + ttl / 2, now)

    async def _request(self, peer: PeerAddress, msg: Message) -> Message:
        return await self.host.request(peer, msg)

    # -- accepting circuits ------------------------------------------------------------

    async def _on_incoming(self, remote: bytes, msg: Message) -> Message:
        assert isinstance(msg, Incoming)
        held = self.held.get(remote)
        if held is None or self._accepting >= MAX_ACCEPTING:
            self.counters["incoming_refused"] += 1
            return IncomingReply(False)
        self._accepting += 1
        task = self._tasks.spawn(self._accept(held.hop, msg), "relay-accept")
        if task is None:
            self._accepting -= 1
            return IncomingReply(False)
        return IncomingReply(True)

    async def _accept(self, hop: RelayHop, msg: Incoming) -> None:
        host, port, _ = hop
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            try:
                async with asyncio.timeout(self.host.limits.handshake_timeout):
                    await loop.sock_connect(sock, (host, port))
                    await loop.sock_sendall(sock, encode_hello(Accept(msg.circuit_id, msg.secret)))
                    status = await read_hello(loop, sock)
                if not isinstance(status, Status) or not status.ok:
                    raise ProtocolError(f"relay refused the accept: {status}")
            except BaseException:
                sock.close()
                raise
            await self.host.adopt(sock, initiator=False, expected=None, via="relayed")
            self.counters["circuits_accepted"] += 1
        except (P2PError, OSError, TimeoutError) as exc:
            self.counters["circuits_failed"] += 1
            log.debug("relayed circuit %d from %s failed: %s", msg.circuit_id, host, exc)
        finally:
            self._accepting -= 1


# -- both, as a node runs them -------------------------------------------------------------


class Relay:
    """A node's relay parts: the service (on while ``config.service`` says so:
    ``auto`` = while ``reachability()`` is "public") and the client (``auto`` =
    while it is "private"); the relay addresses the client holds go to the DHT's
    provider records (``discovery.set_relays``), and while it holds any the node
    announces a *peer record*: a provider record under its own node id, so a
    node that is in no routing table can still be found by its id (with its
    relays)."""

    def __init__(
        self,
        host: PeerHost,
        discovery: Discovery,
        config: RelayConfig,
        reachability: Callable[[], str | None],
        clock: Clock = MONOTONIC,
        port: int = 0,
    ) -> None:
        self.config = config
        self.reachability = reachability
        self.discovery = discovery
        self.node_id = host.node_id
        self.port = port
        self.service = RelayService(host, config.limits, clock)
        self.client = RelayClient(
            host,
            config,
            discovery.contacts,
            lambda: _wanted(config.client, self.reachability(), "private"),
            self._relays_changed,
            clock,
        )
        self._tasks = TaskSet("relay-node")

    def start(self) -> None:
        self.service.start()
        self._check_service()
        self.client.start()
        if self.config.service == "auto":
            self._tasks.spawn(self._watch(), "relay-service")

    async def close(self) -> None:
        await self._tasks.close()
        await self.client.close()
        await self.service.close()

    def stats(self) -> dict[str, object]:
        return {
            "service": self.service.stats(),
            "client": self.client.stats(),
            "reservations": [
                {"relay": peer_id_to_str(relay), "address": f"{h}:{p}"}
                for h, p, relay in self.client.hops()
            ],
        }

    def flat_stats(self) -> dict[str, int]:
        """Both parts' counters in one flat dict (the metrics' ``relay`` part):
        the service's as they are, the client's prefixed ``client_``."""
        out = self.service.stats()
        out.update({f"client_{k}": v for k, v in self.client.stats().items()})
        return out

    def refresh(self) -> None:
        """The reachability verdict changed: follow it now (for its change hook;
        otherwise it is looked at every ``check_interval``)."""
        self._check_service()
        self._tasks.spawn(self._quiet_step(), "relay-refresh")

    async def _quiet_step(self) -> None:
        with contextlib.suppress(P2PError):
            await self.client.step()

    def _relays_changed(self, hops: tuple[RelayHop, ...]) -> None:
        self.discovery.set_relays(hops)
        if hops and self.port:
            self._tasks.spawn(self._announce_peer(), "relay-peer-record")
        elif not hops:
            self.discovery.remove_provider(self.node_id)

    async def _announce_peer(self) -> None:
        with contextlib.suppress(P2PError):
            await self.discovery.add_provider(self.node_id, self.port)

    def _check_service(self) -> None:
        self.service.set_enabled(_wanted(self.config.service, self.reachability(), "public"))

    async def _watch(self) -> None:
        while True:  # the verdict may change; the relay follows it
            await asyncio.sleep(self.config.check_interval)
            self._check_service()


def _wanted(mode: str, verdict: str | None, when: str) -> bool:
    if mode == "always":
        return True
    if mode == "never":
        return False
    return verdict == when
