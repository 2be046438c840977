"""PeerHost: direct, authenticated peer connections and requests over them.

Each connection is a :class:`~p2pnode.net.core.ConnectionCore` (the protocol:
handshake, request mux, limits, deadlines; no I/O) under a
:class:`~p2pnode.net.connection.PeerConnection` (the asyncio shell); the host
keeps the pool and the limits that span connections.

Rules
-----
- One pool of connections, keyed by the remote node id (and by the dialed
  address, for dials that did not name a node id). Connections are
  symmetric: either side may send requests on any open connection, inbound
  or outbound. Concurrent requests to a peer we are not connected to share
  one dial.
- Bounded by the budgets of :class:`~p2pnode.net.budget.ConnectionBudget`:
  inbound handshakes (full: the oldest is evicted), inbound connections in
  all (full: the least recently used idle one is evicted, else refused), per
  address and per subnet (refused), outbound connections apart (a
  dial at the limit first evicts the least recently used idle outbound
  connection); then ``max_inflight_per_connection`` handler tasks per connection, an
  idle timeout, a handshake timeout, a request timeout, ``max_frame``, an
  optional per-connection request rate, and a cap on answers buffered for a
  peer that does not read them. Every limit that trips is counted in
  :meth:`PeerHost.stats` and drops only the offending connection (with a RST)
  or request.
- Errors from :meth:`PeerHost.request`: ``P2PTimeoutError`` (no answer, or the
  dial/handshake took too long), ``HandshakeError`` (wrong peer, bad identity,
  version), ``PeerUnreachable`` (TCP connect failed), ``ConnectionClosed``,
  ``ProtocolError`` (a malformed or mistyped answer), ``RemoteError`` (the
  peer answered with an ``ErrorReply``), ``LimitExceeded`` (our own limits).
- Goaway (``p2pnode/net/core.py``): a request failed with ``ClosedUnread``
  (the peer closed the connection gracefully and said it never read it, or it
  never left) is sent once more, on another connection to the peer (pooled or
  dialed), within what is left of its time limit
  (``requests_resent_unread``); nothing else is sent again, so a request the
  peer may have handled never is. :meth:`close` ends open connections
  gracefully, with a goaway, unless their write buffer is not empty (a RST).
- Every task (handlers, dials) and timer is owned; :meth:`PeerHost.close`
  ends them all and waits until every connection is gone.
- Relays (``p2pnode/nat/relay.py``): a :class:`PeerAddress` with ``relays`` is
  dialed directly first, then through each relay after ``relay_dial_delay``
  (a circuit hello, then :meth:`PeerHost.adopt` with ``via="relayed"``); the
  first connection wins. A host that offers a relay reads the first two bytes
  of each accepted connection (``p2pnode/net/firstbytes.py``) to tell a circuit
  hello from a Noise handshake.
- Concurrent requests to one peer at the same addresses share one dial; a
  request naming other addresses (a fresher record) dials anew.
- A request (or :meth:`PeerHost.connect`) that names a node id and waits on a
  dial takes the first authenticated connection to that node id, whichever way
  it came: the dial's, another dial's, one the peer opened to us (inbound, a
  reversal, through a relay), a punched one. The handshake proves the node id
  of a connection, inbound too; addresses prove nothing, so a request by
  address alone waits for its dial. ``exclusive`` connections
  (:meth:`PeerHost.dial_fresh`) never count. The overtaken dial is cancelled
  when nobody waits on it any more and the connection that came is one the
  peer opened to us and not relayed (it is as good as anything the dial could
  make). Otherwise it goes on in the background, bounded by the handshake
  timeout: beside a relayed connection a direct one it makes still wins the
  pool, and an outbound connection may be the dial's own, established an
  instant before the dial returns it. A dial whose handshake is done when it
  is cancelled keeps its connection: it is pooled, and requests may already
  use it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from p2pnode.clock import MONOTONIC, Clock
from p2pnode.endpoints import LOOP_ENDPOINTS, Endpoints, ListeningServer
from p2pnode.errors import (
    ClosedUnread,
    ConnectionClosed,
    LimitExceeded,
    P2PError,
    P2PTimeoutError,
    PeerUnreachable,
    ProtocolError,
    RelayRefused,
    RequestTimeout,
    UsageError,
)
from p2pnode.identity import Identity, peer_id_to_str
from p2pnode.nat.relay_wire import Connect, Hello, Status, decode_hello, encode_hello, hello_length
from p2pnode.net.budget import ConnectionBudget
from p2pnode.net.config import NetLimits
from p2pnode.net.connection import Handler, PeerConnection
from p2pnode.net.firstbytes import FirstBytes
from p2pnode.net.heap import trim_heap
from p2pnode.net.memory import MemoryBudget
from p2pnode.net.session import Credentials, Session
from p2pnode.wire.messages import DEFAULT_REGISTRY, DecodeLimits, Message, MessageRegistry

log = logging.getLogger(__name__)

__all__ = ["CircuitAcceptor", "Handler", "PeerAddress", "PeerHost", "RelayHop"]

# (relay host, relay port, relay peer id): reach a peer through that relay
RelayHop = tuple[str, int, bytes]


@dataclass(frozen=True)
class PeerAddress:
    """Where to reach a peer. ``node_id=None`` accepts whoever answers (bootstrap-like).
    ``relays``: relays the peer holds a reservation on, tried when the direct
    address does not answer (see :meth:`PeerHost.request`)."""

    node_id: bytes | None
    host: str
    port: int
    relays: tuple[RelayHop, ...] = ()

    def __str__(self) -> str:
        who = peer_id_to_str(self.node_id) if self.node_id else "any"
        return f"{who}@{self.host}:{self.port}"


class CircuitAcceptor(Protocol):
    """The relay side of the listener (``p2pnode/nat/relay.py``): it takes over a
    connection that opened with a circuit hello."""

    hello_timeout: float
    max_undecided: int

    def circuit_hello(self, transport: asyncio.Transport, hello: Hello, ip: str) -> None: ...


_DialKey = tuple[bytes | None, str, int, tuple[RelayHop, ...]]

# A burst of this many closed connections gives the freed heap back (heap.py).
TRIM_AFTER_LOST = 32
# A peer with relay addresses: its relays are tried when the direct dial has not
# succeeded after this long (or has failed), one more every RELAY_DIAL_DELAY.
# A peer announces relays only once dial-backs found it private, so its direct
# address will most likely not answer: a short head start (a LAN or a mapping
# answers within it), not go-libp2p's 500 ms (which was most of the time to the
# first byte from a NATed provider in the lab matrix). A direct or punched
# connection that comes later still wins the pool.
RELAY_DIAL_DELAY = 0.05


class PeerHost:
    """This node's direct peer connections: it listens, dials, and carries requests.

    A ``PeerHost`` owns every TCP peer connection of a node (Noise XX bound to
    the node's Ed25519 identity, then the request mux of
    :class:`~p2pnode.net.core.ConnectionCore`). :meth:`request` sends a
    message to a peer and returns its answer, dialing (or reusing a pooled
    connection) as needed; requests from peers go to the one handler set with
    :meth:`set_handler` (the exchange installs itself). The module rules above
    state its limits and errors.

    Rules of use:

    - Sockets come from ``endpoints`` (the running loop by default; a simulated
      network's in-memory transports in ``--mode virtual``), times from
      ``clock``: neither is read from anywhere else.
    - One handler: it gets ``(peer node id, message)`` and returns the answer;
      ``NotFoundError``, ``LimitExceeded``, ``ProtocolError``/``UsageError``
      become ``not_found``, ``busy``, ``bad_request`` answers, anything else an
      ``internal`` answer (logged). Without one, requests are answered
      ``unsupported``.
    - Messages are decoded with :attr:`registry`: a feature registers its
      message types there before peers send them.
    - :meth:`close` once, at the end: it ends every connection, dial and handler
      task; later calls to :meth:`listen` or :meth:`request` raise
      ``UsageError``.
    """

    def __init__(
        self,
        identity: Identity,
        limits: NetLimits,
        clock: Clock = MONOTONIC,
        endpoints: Endpoints = LOOP_ENDPOINTS,
    ) -> None:
        self.identity = identity
        self.endpoints = endpoints
        self._node_id = identity.node_id
        self.limits = limits
        self.clock = clock
        self.registry: MessageRegistry = DEFAULT_REGISTRY
        self.decode_limits = DecodeLimits(
            max_bin_len=limits.max_frame,
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_array_len,
        )
        self.counters: Counter[str] = Counter()
        self._credentials = Credentials.create(identity)
        self._handler: Handler | None = None
        self._established_listeners: list[Callable[[PeerConnection], None]] = []
        self._conns: set[PeerConnection] = set()
        self._by_peer: dict[bytes, list[PeerConnection]] = {}
        self._by_addr: dict[tuple[str, int], PeerConnection] = {}
        self._budget: ConnectionBudget[PeerConnection] = ConnectionBudget(limits, self.counters)
        # what peers make this node hold; the piece server reserves in it too
        self.memory = MemoryBudget(limits.memory_budget, limits.memory_per_peer, self.counters)
        # connections lost since the heap was last trimmed (see p2pnode/net/heap.py)
        self._lost_since_trim = 0
        self._trim_timer: asyncio.TimerHandle | None = None
        self._dials: dict[_DialKey, asyncio.Task[PeerConnection]] = {}
        # how many callers wait on each dial (an overtaken dial nobody waits on ends)
        self._dial_waiters: Counter[_DialKey] = Counter()
        # callers waiting on a dial to a node id, woken by any connection to it
        # (see _dial_or_arrival); an entry lives only while someone waits
        self._arrivals: dict[bytes, set[asyncio.Future[None]]] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        self._servers: list[ListeningServer] = []
        # A host listening on one address dials from it too: peers (and their
        # dial-backs) see the address it serves at, not the kernel's pick.
        self._source_host: str | None = None
        self._closing = False
        # the relay this node offers, if any; then the listener reads first bytes
        self._circuits: CircuitAcceptor | None = None
        self._undecided: dict[FirstBytes, None] = {}  # oldest first
        self.relay_dial_delay = RELAY_DIAL_DELAY
        if not limits.encrypt:
            log.warning(
                "NetLimits.encrypt=False: peer traffic after the handshake is neither "
                "encrypted nor authenticated (meant for benchmarks only)"
            )

    @property
    def node_id(self) -> bytes:
        return self._node_id

    # -- public API --------------------------------------------------------

    def set_handler(self, handler: Handler) -> None:
        self._handler = handler

    def on_established(self, listener: Callable[[PeerConnection], None]) -> None:
        """Call ``listener`` with each connection once its handshake is done
        (e.g. to upgrade a relayed one). It must not block or raise."""
        self._established_listeners.append(listener)

    def set_circuit_acceptor(self, acceptor: CircuitAcceptor | None) -> None:
        """Offer a circuit relay on this host's port (None: stop): accepted
        connections then go through :class:`~p2pnode.net.firstbytes.FirstBytes`."""
        self._circuits = acceptor

    def connection_to(self, node_id: bytes) -> PeerConnection | None:
        """An open connection to ``node_id`` (a direct one first), or None: never dials."""
        return self._pooled(PeerAddress(node_id, "", 0))

    async def connect(self, peer: PeerAddress) -> PeerConnection:
        """A connection to ``peer``: a pooled one, or a new dial (bounded by the
        handshake timeout); for callers that need the connection itself."""
        if self._closing:
            raise UsageError("PeerHost is closed")
        if peer.node_id == self.node_id:
            raise UsageError(f"{peer} is this node")
        return await self._connection_for(peer)

    def peer_ip(self, node_id: bytes) -> str | None:
        """The IP address of an open connection to ``node_id`` (a direct one first)."""
        for conn in sorted(self._by_peer.get(node_id, ()), key=_pool_rank):
            if conn.is_open:
                return conn.peername[0]
        return None

    async def listen(self, host: str, port: int) -> int:
        """Accept peer connections on TCP ``host:port``; return the bound port."""
        if self._closing:
            raise UsageError("PeerHost is closed")
        server, bound = await self.endpoints.server(self._accepted_protocol, host, port)
        self._servers.append(server)
        if host not in ("", "0.0.0.0", "::"):
            self._source_host = host
        return bound

    async def request(
        self, peer: PeerAddress, msg: Message, timeout: float | None = None
    ) -> Message:
        """Send ``msg`` to ``peer`` (dialing if needed) and return its answer."""
        if self._closing:
            raise UsageError("PeerHost is closed")
        if peer.node_id == self.node_id:
            raise UsageError(f"{peer} is this node")
        limit = self.limits.request_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        retried = False
        try:
            while True:  # at most twice: see the module rules on goaway
                conn = self._pooled(peer)
                left = limit - (loop.time() - started) if retried else limit
                if conn is None:
                    async with asyncio.timeout(left):
                        conn = await self._connection_for(peer)
                    left = limit - (loop.time() - started)
                try:
                    # the answer's wait has one timer, the connection's (the hot path)
                    return await conn.request(msg, timeout=left)
                except ClosedUnread:
                    if retried or self._closing or loop.time() - started >= limit:
                        raise
                    retried = True
                    self.counters["requests_resent_unread"] += 1
        except TimeoutError:
            self.counters["request_timeouts"] += 1
            raise RequestTimeout(
                f"{type(msg).__name__} to {peer} got no answer within {limit:g}s"
            ) from None

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        open_conns = [c for c in self._conns if c.is_open]
        out["connections_open"] = len(open_conns)
        out["connections_relayed"] = sum(1 for c in open_conns if c.via == "relayed")
        out["connections_undecided"] = len(self._undecided)
        out["connections_handshaking"] = len(self._conns) - len(open_conns)
        out["connections_inbound"] = self._budget.inbound
        out["connections_outbound"] = self._budget.outbound
        out["handshakes_inbound"] = self._budget.handshaking
        out["handlers_inflight"] = sum(c.inflight for c in self._conns)
        out["peers"] = len(self._by_peer)
        out["memory_used"] = self.memory.used
        out["memory_peak"] = self.memory.peak
        out["memory_budget"] = self.memory.total
        return out

    def connections(self) -> list[dict[str, object]]:
        """The open peer connections: who, how (``via``: direct, relayed,
        punched), which way, to which address."""
        return [
            {
                "peer_id": peer_id_to_str(node_id),
                "via": conn.via,
                "direction": "outbound" if conn.dialed is not None else "inbound",
                "address": f"{conn.peername[0]}:{conn.peername[1]}",
                "inflight": conn.inflight,
            }
            for node_id, conns in self._by_peer.items()
            for conn in conns
            if conn.is_open
        ]

    def connections_to(self, node_id: bytes) -> list[PeerConnection]:
        """The open connections with ``node_id`` (any direction, any way)."""
        return [c for c in self._by_peer.get(node_id, ()) if c.is_open]

    async def dial_fresh(self, peer: PeerAddress) -> PeerConnection:
        """A new outbound connection to ``peer``, even if one is pooled (AutoNAT's
        dial-back must prove that a new connection reaches it). It is the caller's
        alone: the pool never hands it out for other requests (the caller closes
        it when done, which would fail them)."""
        if self._closing:
            raise UsageError("PeerHost is closed")
        if peer.node_id == self.node_id:
            raise UsageError(f"{peer} is this node")
        # exclusive from the start: once established it is in the pool's maps,
        # and a waiting request must not take it (see _dial_or_arrival)
        return await self._dial(peer, exclusive=True)

    def connected_peers(self) -> list[bytes]:
        return [
            nid
            for nid, conns in self._by_peer.items()
            if any(c.is_open and not c.exclusive for c in conns)
        ]

    async def close(self) -> None:
        """Stop listening, close every connection, end every task it owns."""
        self._closing = True
        if self._trim_timer is not None:
            self._trim_timer.cancel()
            self._trim_timer = None
        for server in self._servers:
            server.close()
        for sniffer in list(self._undecided):
            sniffer.drop("first_bytes_closed")
        for task in list(self._dials.values()):
            task.cancel()
        for conn in list(self._conns):
            if conn.is_open and conn.writable:
                # a goaway: the peer may send again elsewhere what crosses it
                conn.close(ConnectionClosed("host closing"))
                conn.abort_if_unsent()  # nothing left behind a peer that does not read
            else:
                conn.close(ConnectionClosed("host closing"), abort=True)
                conn.abort_if_unsent()  # (one already closing gracefully, too)
        while self._tasks:
            pending = list(self._tasks)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            # Ended now, whether or not their done callbacks ran: on Python 3.12+ a
            # gather of tasks already done does not yield, so waiting for the
            # callbacks to empty the set would spin for ever.
            self._tasks.difference_update(pending)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        closing = [c.closed for c in self._conns if c.transport is not None]
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)
        self._conns.clear()

    # -- ConnectionOwner ---------------------------------------------------

    def handler(self) -> Handler | None:
        return self._handler

    def handler_started(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)  # cancelled and awaited by close()

    def handler_ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)

    def conn_made(self, conn: PeerConnection) -> bool:
        if conn.dialed is not None:
            return not self._closing  # outbound: counted when the dial began
        if self._closing:
            return False
        budget = self._budget
        if budget.inbound >= self.limits.max_connections:
            self._evict_idle(inbound=True)
        admitted, evicted = budget.admit_inbound(conn, conn.peername[0])
        if evicted is not None:
            evicted.close(
                P2PTimeoutError("handshake evicted to make room for a newer one"), abort=True
            )
        if not admitted:
            return False
        self._conns.add(conn)
        return True

    def conn_established(self, conn: PeerConnection) -> bool:
        if self._closing:
            conn.close(ConnectionClosed("host closing"), abort=True)
            return False
        self._budget.established(conn)
        node_id = conn.remote_node_id
        assert node_id is not None
        self._by_peer.setdefault(node_id, []).append(conn)
        if conn.dialed is not None:
            self._by_addr[conn.dialed] = conn
        for listener in self._established_listeners:
            listener(conn)
        if not conn.exclusive:
            self._wake_arrivals(node_id)
        return True

    def conn_lost(self, conn: PeerConnection) -> None:
        self._conns.discard(conn)
        self._budget.release(conn)
        self._lost_since_trim += 1
        lost = self._lost_since_trim
        if lost >= TRIM_AFTER_LOST and self._trim_timer is None and not self._closing:
            self._trim_timer = asyncio.get_running_loop().call_later(1.0, self._trim)
        node_id = conn.remote_node_id
        if node_id is not None:
            conns = self._by_peer.get(node_id)
            if conns is not None and conn in conns:
                conns.remove(conn)
                if not conns:
                    del self._by_peer[node_id]
        if conn.dialed is not None and self._by_addr.get(conn.dialed) is conn:
            del self._by_addr[conn.dialed]

    # -- internals ---------------------------------------------------------

    def _trim(self) -> None:
        self._trim_timer = None
        self._lost_since_trim = 0
        if trim_heap():
            self.counters["heap_trims"] += 1

    def _session(self, *, expected: bytes | None, initiator: bool) -> Session:
        return Session(
            self._credentials,
            initiator=initiator,
            encrypt=self.limits.encrypt,
            max_frame=self.limits.max_frame,
            expected_node_id=expected,
        )

    def _accepted_protocol(self) -> asyncio.BaseProtocol:
        acceptor = self._circuits
        if acceptor is not None:
            return FirstBytes(self, acceptor.hello_timeout)
        return PeerConnection(self, self._session(expected=None, initiator=False))

    # -- FirstBytesOwner: the listener of a node that offers a relay ------------------

    def undecided_open(self, sniffer: FirstBytes) -> bool:
        if self._closing or self._circuits is None:
            return False
        if len(self._undecided) >= self._circuits.max_undecided:
            oldest = next(iter(self._undecided))
            oldest.drop("first_bytes_evicted")
        self._undecided[sniffer] = None
        return True

    def undecided_closed(self, sniffer: FirstBytes) -> None:
        self._undecided.pop(sniffer, None)

    def handoff_peer(self, transport: asyncio.Transport, data: bytes) -> None:
        """A Noise handshake: a PeerConnection takes the transport and the bytes read."""
        conn = PeerConnection(self, self._session(expected=None, initiator=False))
        transport.set_protocol(conn)
        conn.connection_made(transport)
        view = memoryview(data)
        while view and not transport.is_closing():
            buf = conn.get_buffer(len(view))
            n = min(len(buf), len(view))
            if n == 0:
                break
            buf[:n] = view[:n]
            view = view[n:]
            conn.buffer_updated(n)

    def handoff_hello(self, transport: asyncio.Transport, hello: Hello, ip: str) -> None:
        acceptor = self._circuits
        if acceptor is None or self._closing:
            transport.abort()
            return
        acceptor.circuit_hello(transport, hello, ip)

    def _pooled(self, peer: PeerAddress) -> PeerConnection | None:
        if peer.node_id is not None:
            best: PeerConnection | None = None
            # a direct or punched connection before a relayed one, then the least busy
            for conn in self._by_peer.get(peer.node_id, ()):
                if conn.exclusive or not conn.is_open:
                    continue
                if best is None or _pool_rank(conn) < _pool_rank(best):
                    best = conn
            return best
        found = self._by_addr.get((peer.host, peer.port))
        # a relayed connection is filed under the relay's address: not the relay
        if found is None or not found.is_open or found.via == "relayed" or found.exclusive:
            return None
        return found

    async def _connection_for(self, peer: PeerAddress) -> PeerConnection:
        conn = self._pooled(peer)
        if conn is not None:
            return conn
        # Concurrent requests to the same peer at the same addresses share one dial.
        # One naming other addresses is another dial: a fresher record (a new
        # address, relays) must not wait on a dial to the old one (say, a probe of
        # a peer that turned private since), which may hang for the handshake
        # timeout where the new address or the relays answer at once.
        key: _DialKey = (peer.node_id, peer.host, peer.port, peer.relays)
        task = self._dials.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._dial(peer))
            self._dials[key] = task
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._dial_done, key))
        if peer.node_id is None:
            return await asyncio.shield(task)
        return await self._dial_or_arrival(peer, key, task)

    async def _dial_or_arrival(
        self, peer: PeerAddress, key: _DialKey, task: asyncio.Task[PeerConnection]
    ) -> PeerConnection:
        """The dial's connection, or the first usable connection to
        ``peer.node_id`` that opens meanwhile, whichever comes first (the module
        rules say why and what becomes of the dial). Waiting never cancels the
        dial: a caller that gives up leaves it to the others, as before."""
        node_id = peer.node_id
        assert node_id is not None
        loop = asyncio.get_running_loop()
        won: PeerConnection | None = None
        self._dial_waiters[key] += 1
        try:
            while True:  # one turn per wake-up: the dial ends, or a connection came
                arrived: asyncio.Future[None] = loop.create_future()
                self._arrivals.setdefault(node_id, set()).add(arrived)
                try:
                    await asyncio.wait((task, arrived), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    self._forget_arrival(node_id, arrived)
                if task.done() and not task.cancelled() and task.exception() is None:
                    return task.result()
                won = self._pooled(peer)
                if won is not None:
                    if _opened_by_peer(won):
                        self.counters["dials_overtaken"] += 1
                    return won
                if task.done():
                    if task.cancelled():  # by close(): the caller itself was not
                        raise ConnectionClosed(f"{peer}: the host closed while dialing")
                    return task.result()  # the dial's error
                # the connection that came is gone already (or exclusive): wait on
        finally:
            self._dial_waiters[key] -= 1
            if self._dial_waiters[key] <= 0:
                del self._dial_waiters[key]
                if won is not None and _opened_by_peer(won) and not task.done():
                    self._abandon_dial(key, task)

    def _abandon_dial(self, key: _DialKey, task: asyncio.Task[PeerConnection]) -> None:
        """Cancel a dial nobody waits on any more (a connection to its peer came
        another way); later requests dial anew if they need to."""
        if self._dials.get(key) is task:
            del self._dials[key]
        task.cancel()
        self.counters["dials_abandoned"] += 1

    def _wake_arrivals(self, node_id: bytes) -> None:
        for arrived in self._arrivals.pop(node_id, ()):
            if not arrived.done():
                arrived.set_result(None)

    def _forget_arrival(self, node_id: bytes, arrived: asyncio.Future[None]) -> None:
        waiting = self._arrivals.get(node_id)
        if waiting is not None:
            waiting.discard(arrived)
            if not waiting:
                del self._arrivals[node_id]
        arrived.cancel()  # no-op once woken; a cancelled future warns of nothing

    def _dial_done(self, key: _DialKey, task: asyncio.Task[PeerConnection]) -> None:
        self._tasks.discard(task)
        if self._dials.get(key) is task:
            del self._dials[key]
        if not task.cancelled():
            task.exception()  # retrieved even if every waiter gave up

    def _evict_idle(self, *, inbound: bool = False) -> None:
        """Close the least recently used idle connection of one direction, if any
        (its budget is full; runs only then, so the scan costs nothing usually).
        Inbound, it keeps authenticated peers that hold slots and do nothing
        from locking out the rest."""
        budget = self._budget
        idle = [
            c for c in self._conns if c.is_open and not c.busy and budget.is_inbound(c) == inbound
        ]
        if not idle:
            return
        victim = min(idle, key=lambda c: c.last_activity)
        self.counters["evicted_idle_inbound" if inbound else "evicted_idle"] += 1
        victim.close(ConnectionClosed("evicted to make room for a new connection"))
        self._conns.discard(victim)
        budget.release(victim)

    async def _dial(self, peer: PeerAddress, *, exclusive: bool = False) -> PeerConnection:
        if peer.relays and peer.node_id is not None:
            return await self._dial_any(peer, exclusive=exclusive)
        return await self._dial_direct(peer, exclusive=exclusive)

    async def _dial_any(self, peer: PeerAddress, *, exclusive: bool = False) -> PeerConnection:
        """The direct address first; each relay after ``relay_dial_delay`` without
        success (at once when everything tried so far failed). The first
        connection wins; the other attempts are cancelled."""
        loop = asyncio.get_running_loop()
        relays = [r for r in peer.relays if r[2] != self.node_id]
        direct = loop.create_task(self._dial_direct(peer, exclusive=exclusive), name="direct")
        pending: set[asyncio.Task[PeerConnection]] = {direct}
        failures: list[tuple[str, P2PError]] = []
        next_at = loop.time() + self.relay_dial_delay
        try:
            while pending or relays:
                timeout = max(0.0, next_at - loop.time()) if relays and pending else None
                if pending:
                    done, pending = await asyncio.wait(
                        pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                else:
                    done = set()
                for task in done:
                    exc = task.exception()
                    if exc is None:
                        return task.result()
                    if not isinstance(exc, P2PError):
                        raise exc
                    failures.append((task.get_name(), exc))
                if relays and (not pending or loop.time() >= next_at):
                    hop = relays.pop(0)
                    name = f"via relay {hop[0]}:{hop[1]}"
                    task = loop.create_task(
                        self._dial_relayed(peer, hop, exclusive=exclusive), name=name
                    )
                    pending.add(task)
                    next_at = loop.time() + self.relay_dial_delay
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        said = "; ".join(f"{name}: {exc}" for name, exc in failures)
        refused = [exc for _, exc in failures if isinstance(exc, RelayRefused)]
        if refused:
            raise RelayRefused(refused[-1].status, f"cannot reach {peer}: {said}")
        raise PeerUnreachable(f"cannot reach {peer}: {said}")

    async def _dial_relayed(
        self, peer: PeerAddress, hop: RelayHop, *, exclusive: bool = False
    ) -> PeerConnection:
        """A connection to ``peer`` through the relay ``hop``: a circuit hello,
        the relay's status, then our Noise handshake end to end over the spliced
        socket (``adopt``)."""
        assert peer.node_id is not None
        host, port, _relay_id = hop
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.counters["relay_dials"] += 1
        try:
            try:
                async with asyncio.timeout(self.limits.handshake_timeout):
                    await loop.sock_connect(sock, (host, port))
                    await loop.sock_sendall(sock, encode_hello(Connect(peer.node_id)))
                    status = await read_hello(loop, sock)
            except TimeoutError:
                raise P2PTimeoutError(f"relay {host}:{port} did not answer in time") from None
            except OSError as exc:
                raise PeerUnreachable(
                    f"cannot connect to relay {host}:{port}: {exc.strerror or exc}"
                ) from None
            if not isinstance(status, Status):
                raise ProtocolError(f"relay {host}:{port} answered no status")
            if not status.ok:
                self.counters[f"relay_refused.{status.status}"] += 1
                raise RelayRefused(
                    status.status, f"relay {host}:{port} refused: {status.status} {status.message}"
                )
        except BaseException:
            self.counters["relay_dial_failures"] += 1
            sock.close()
            raise
        conn = await self.adopt(
            sock, initiator=True, expected=peer.node_id, via="relayed", exclusive=exclusive
        )
        self.counters["relay_dials_ok"] += 1
        return conn

    async def _dial_direct(self, peer: PeerAddress, *, exclusive: bool = False) -> PeerConnection:
        session = self._session(expected=peer.node_id, initiator=True)
        conn = PeerConnection(self, session, dialed=(peer.host, peer.port))
        conn.exclusive = exclusive

        async def connect() -> None:
            await self.endpoints.connect(
                lambda: conn, peer.host, peer.port, local_host=self._source_host
            )

        return await self._open_outbound(conn, connect, str(peer))

    async def adopt(
        self,
        sock: socket.socket,
        *,
        initiator: bool,
        expected: bytes | None,
        via: str,
        exclusive: bool = False,
    ) -> PeerConnection:
        """Run the handshake over ``sock``, a TCP socket connected by other means
        (a relay circuit, a punched hole), and pool the connection like a dialed
        or accepted one. The initiator counts as outbound, the other side as
        inbound. Real sockets only (not in ``--mode virtual``). ``exclusive``:
        the caller's alone, never handed out by the pool (``dial_fresh``)."""
        if self._closing:
            sock.close()
            raise UsageError("PeerHost is closed")
        loop = asyncio.get_running_loop()
        session = self._session(expected=expected, initiator=initiator)
        name = f"{via} connection"
        if initiator:
            remote = sock.getpeername()
            dialed = (str(remote[0]), int(remote[1])) if isinstance(remote, tuple) else (via, 0)
            conn = PeerConnection(self, session, dialed=dialed, via=via)
            conn.exclusive = exclusive

            async def connect() -> None:
                await loop.create_connection(lambda: conn, sock=sock)

            return await self._open_outbound(conn, connect, name)
        conn = PeerConnection(self, session, via=via)
        conn.exclusive = exclusive
        try:
            async with asyncio.timeout(self.limits.handshake_timeout):
                await loop.create_connection(lambda: conn, sock=sock)
                await conn.handshake
        except TimeoutError:
            self.counters["handshake_timeouts"] += 1
            conn.close(P2PTimeoutError(f"{name}: handshake timed out"), abort=True)
            raise P2PTimeoutError(
                f"{name}: no handshake within {self.limits.handshake_timeout:g}s"
            ) from None
        except BaseException:
            conn.close(ConnectionClosed(f"{name} abandoned"), abort=True)
            raise
        return conn

    async def _open_outbound(
        self, conn: PeerConnection, connect: Callable[[], Awaitable[None]], name: str
    ) -> PeerConnection:
        if self._budget.outbound_full:
            self._evict_idle()
        if not self._budget.add_outbound(conn):
            raise LimitExceeded(
                f"cannot dial {name}: {self.limits.max_outbound} outbound connections open, "
                "none idle"
            )
        self._conns.add(conn)
        try:
            try:
                async with asyncio.timeout(self.limits.handshake_timeout):
                    await connect()
                    await conn.handshake
            except TimeoutError:
                self.counters["handshake_timeouts"] += 1
                raise P2PTimeoutError(
                    f"connecting to {name} timed out after {self.limits.handshake_timeout:g}s"
                ) from None
            except OSError as exc:
                self.counters["dial_failures"] += 1
                host, port = conn.dialed or ("?", 0)
                raise PeerUnreachable(
                    f"cannot connect to {host}:{port}: {exc.strerror or exc}"
                ) from None
        except BaseException as exc:
            if isinstance(exc, P2PError):
                conn.close(exc, abort=True)
            elif (
                isinstance(exc, asyncio.CancelledError)
                and conn.is_open
                and not conn.exclusive
                and not self._closing
            ):
                # cancelled with the handshake done: the connection is pooled and
                # requests may use it already (see _dial_or_arrival); it stays
                self.counters["connections_dialed"] += 1
                raise
            else:
                conn.close(ConnectionClosed("dial abandoned"), abort=True)
            if conn.transport is None:
                self._conns.discard(conn)
                self._budget.release(conn)
            raise
        self.counters["connections_dialed"] += 1
        return conn


def _pool_rank(conn: PeerConnection) -> tuple[bool, int]:
    return (conn.via == "relayed", conn.inflight)


def _opened_by_peer(conn: PeerConnection) -> bool:
    """A direct or punched connection the peer opened to us: it overtakes a
    dial, which could make nothing better (see the module rules)."""
    return conn.dialed is None and conn.via != "relayed"


async def read_hello(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> Hello:
    """One hello frame from a non-blocking socket, not a byte more (what follows
    is the Noise handshake, read by the connection that adopts the socket)."""
    prefix = await _recv_exactly(loop, sock, 2)
    try:
        length = hello_length(prefix)
    except ProtocolError as exc:
        raise ProtocolError(f"the relay answered no hello: {exc}") from None
    return decode_hello(await _recv_exactly(loop, sock, length))


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:  # bounded: every turn reads at least one byte or ends
        chunk = await loop.sock_recv(sock, n - len(out))
        if not chunk:
            raise ConnectionClosed("the relay closed the connection")
        out += chunk
    return bytes(out)
