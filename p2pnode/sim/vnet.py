"""An in-memory network for ``--mode virtual``: hosts, UDP datagrams and TCP-like
streams, delivered by the event loop's timers (virtual time under VirtualTimeLoop).

Each :class:`VirtualHost` is an :class:`~p2pnode.endpoints.Endpoints`: the DHT and
the peer host open their "sockets" through it and get transports that behave like
asyncio's (same callbacks, same flow control), with no file descriptor behind them.

Link model (:class:`LinkModel`), the same for every pair of hosts:

- one-way delay = ``latency`` + uniform [0, ``jitter``) + serialization on the
  sender's uplink (``bandwidth`` bytes/s per host; 0 = unlimited);
- datagrams are lost with probability ``loss``; streams are reliable and ordered;
- a datagram to an address nobody listens on vanishes; a connect to a host that
  has no listener on the port is refused after a round trip (an RST); a segment
  arriving for a connection that no longer exists resets the sender's end.

Randomness comes from one ``random.Random`` per sending host, seeded from the
network seed and the host's address, so the delays and losses a host sees do not
depend on how other hosts' events interleave. Addresses come from 100.64.0.0/10
(shared address space) and never leave the process.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BASE = int(ipaddress.IPv4Address("100.64.0.0"))
SUBNETS = 1 << 14  # /24s in 100.64.0.0/10
EPHEMERAL = 40_000  # first port handed out for port 0 / outgoing connections
SYN_TIMEOUT = 20.0  # a connect to an address no host has fails after this long
DEFAULT_HIGH = 64 * 1024


def address(index: int) -> str:
    """Host ``index``'s address: one per /24 first (subnet-diversity rules treat
    hosts as unrelated), then a second host in each /24, and so on."""
    subnet, host = index % SUBNETS, 1 + index // SUBNETS
    if host > 254:
        raise ValueError("too many hosts for 100.64.0.0/10")
    return str(ipaddress.IPv4Address(BASE + (subnet << 8) + host))


@dataclass(frozen=True)
class LinkModel:
    latency: float = 0.02  # seconds, one way
    jitter: float = 0.0  # seconds, uniform extra delay
    loss: float = 0.0  # datagram loss probability
    bandwidth: float = 0.0  # bytes/s per host uplink, 0 = unlimited

    def __post_init__(self) -> None:
        if self.latency < 0 or self.jitter < 0 or self.bandwidth < 0:
            raise ValueError("latency, jitter and bandwidth must be >= 0")
        if not 0 <= self.loss < 1:
            raise ValueError("loss must be in [0, 1)")


@dataclass
class NetStats:
    datagrams_sent: int = 0
    datagrams_delivered: int = 0
    datagrams_lost: int = 0  # by the loss model
    datagrams_unroutable: int = 0  # nobody listening at the destination
    stream_bytes: int = 0
    stream_writes: int = 0
    connects: int = 0
    connects_refused: int = 0
    resets: int = 0

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


class VirtualNetwork:
    def __init__(self, loop: asyncio.AbstractEventLoop, model: LinkModel, seed: int) -> None:
        self.loop = loop
        self.model = model
        self.seed = seed
        self.hosts: dict[str, VirtualHost] = {}
        self.stats = NetStats()
        # Deliveries: the virtual loop's cheap timers when there is one.
        self.at: Callable[..., Any] = getattr(loop, "call_net", loop.call_at)

    def host(self, index: int) -> VirtualHost:
        ip = address(index)
        host = self.hosts.get(ip)
        if host is None:
            host = self.hosts[ip] = VirtualHost(self, ip)
        return host


class VirtualHost:
    """One machine: its ports, its uplink, its random stream. ``Endpoints``."""

    def __init__(self, net: VirtualNetwork, ip: str) -> None:
        self.net = net
        self.ip = ip
        self.up = True
        self.udp: dict[int, VirtualDatagramTransport] = {}
        self.listeners: dict[int, VirtualServer] = {}
        self.streams: set[VirtualStreamTransport] = set()
        self._next_port = EPHEMERAL
        self._uplink_free = 0.0
        self._rng: random.Random | None = None

    # -- the link model -------------------------------------------------------------

    def _random(self) -> random.Random:
        if self._rng is None:
            self._rng = random.Random(f"vnet:{self.net.seed}:{self.ip}")
        return self._rng

    def delay(self, nbytes: int) -> float:
        """Arrival time of ``nbytes`` sent now from this host (uplink, latency, jitter)."""
        model = self.net.model
        now = self.net.loop.time()
        start = now
        if model.bandwidth:
            start = max(now, self._uplink_free) + nbytes / model.bandwidth
            self._uplink_free = start
        jitter = self._random().random() * model.jitter if model.jitter else 0.0
        return start + model.latency + jitter

    def lost(self) -> bool:
        loss = self.net.model.loss
        return bool(loss) and self._random().random() < loss

    def _port(self, wanted: int, taken: dict[int, Any]) -> int:
        if wanted:
            if wanted in taken:
                raise OSError(errno.EADDRINUSE, f"address {self.ip}:{wanted} already in use")
            return wanted
        while self._next_port in taken or self._next_port in self.listeners:
            self._next_port += 1
        port = self._next_port
        self._next_port += 1
        return port

    # -- Endpoints ------------------------------------------------------------------

    async def datagram_endpoint(
        self, factory: Callable[[], asyncio.DatagramProtocol], host: str, port: int
    ) -> tuple[asyncio.DatagramTransport, int]:
        bound = self._port(port, self.udp)
        protocol = factory()
        transport = VirtualDatagramTransport(self, bound, protocol)
        self.udp[bound] = transport
        protocol.connection_made(transport)
        return transport, bound

    async def server(
        self, factory: Callable[[], asyncio.BaseProtocol], host: str, port: int
    ) -> tuple[VirtualServer, int]:
        bound = self._port(port, self.listeners)
        server = VirtualServer(self, bound, factory)
        self.listeners[bound] = server
        return server, bound

    async def connect(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        host: str,
        port: int,
        local_host: str | None = None,  # a virtual host has one address: its own
    ) -> None:
        net = self.net
        loop = net.loop
        net.stats.connects += 1
        remote = net.hosts.get(host)
        if remote is None:
            await asyncio.sleep(SYN_TIMEOUT)
            raise OSError(errno.ETIMEDOUT, f"connect to {host}:{port} timed out")
        syn = self.delay(64)
        await asyncio.sleep(max(0.0, syn - loop.time()))
        listener = remote.listeners.get(port) if remote.up else None
        if listener is None or listener.closed or not self.up:
            back = remote.delay(64)
            await asyncio.sleep(max(0.0, back - loop.time()))
            net.stats.connects_refused += 1
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"{host}:{port} refused")
        local_port = self._port(0, {})
        client = VirtualStreamTransport(self, local_port, remote.ip, port)
        server = VirtualStreamTransport(remote, port, self.ip, local_port)
        client.peer, server.peer = server, client
        server.attach(listener.factory())
        synack = remote.delay(64)
        future: asyncio.Future[None] = loop.create_future()
        loop.call_at(synack, _resolve, future)
        try:
            await future
        except asyncio.CancelledError:
            client.peer = None
            server.abort()
            raise
        if not self.up:
            server.abort()
            raise ConnectionResetError(errno.ECONNRESET, "host went down while connecting")
        if client._lost:  # the server refused it at once (e.g. over its connection limit)
            raise ConnectionResetError(errno.ECONNRESET, f"{host}:{port} reset the connection")
        client.attach(factory())

    # -- crash and recovery ------------------------------------------------------------

    def crash(self) -> None:
        """The process dies: its kernel resets its connections and drops its UDP
        socket; from then on the host sends nothing, and a segment that still arrives
        for one of its old connections resets the sender."""
        self.up = False
        for stream in sorted(self.streams, key=_stream_order):
            stream.abort()
        for port in sorted(self.udp):
            self.udp[port].close()

    def recover(self) -> None:
        self.up = True


def _stream_order(t: VirtualStreamTransport) -> tuple[Any, ...]:
    # Sets of transports iterate in address order, which differs between runs.
    return (t.get_extra_info("sockname"), t.get_extra_info("peername"))


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class VirtualServer:
    def __init__(
        self, host: VirtualHost, port: int, factory: Callable[[], asyncio.BaseProtocol]
    ) -> None:
        self.host = host
        self.port = port
        self.factory = factory
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.host.listeners.get(self.port) is self:
                del self.host.listeners[self.port]

    async def wait_closed(self) -> None:
        return None


class VirtualDatagramTransport(asyncio.DatagramTransport):
    def __init__(self, host: VirtualHost, port: int, protocol: asyncio.DatagramProtocol) -> None:
        super().__init__({"sockname": (host.ip, port), "peername": None, "socket": None})
        self._host = host
        self._port = port
        self._protocol = protocol
        self._closing = False
        self._src = (host.ip, port)

    def sendto(self, data: Any, addr: Any = None) -> None:
        host = self._host
        if self._closing or not host.up or addr is None:
            return
        net = host.net
        net.stats.datagrams_sent += 1
        when = host.delay(len(data))
        if host.lost():
            net.stats.datagrams_lost += 1
            return
        net.at(when, _deliver_datagram, net, addr[0], addr[1], bytes(data), self._src)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._host.udp.get(self._port) is self:
            del self._host.udp[self._port]
        self._host.net.loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self._closing

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    def get_write_buffer_size(self) -> int:
        return 0


def _deliver_datagram(
    net: VirtualNetwork, ip: str, port: int, data: bytes, src: tuple[str, int]
) -> None:
    host = net.hosts.get(ip)
    transport = host.udp.get(port) if host is not None and host.up else None
    if transport is None or transport._closing:
        net.stats.datagrams_unroutable += 1
        return
    net.stats.datagrams_delivered += 1
    transport._protocol.datagram_received(data, src)


_FIN = "FIN"
_RST = "RST"


class VirtualStreamTransport(asyncio.Transport):
    """One end of a connected pair. Bytes written arrive at the other end after the
    link delay, in order; the write buffer counts bytes not yet delivered."""

    def __init__(self, host: VirtualHost, port: int, peer_ip: str, peer_port: int) -> None:
        super().__init__({"sockname": (host.ip, port), "peername": (peer_ip, peer_port)})
        self._host = host
        self._loop = host.net.loop
        self._at = host.net.at
        self.peer: VirtualStreamTransport | None = None
        self._protocol: Any = None
        self._buffered_proto = False
        self._pending: list[bytes] = []  # arrived before attach() or while paused
        self._closing = False
        self._lost = False
        self._reading = True
        self._eof_pending = False
        self._buffer = 0  # bytes written, not yet delivered
        self._high = DEFAULT_HIGH
        self._low = DEFAULT_HIGH // 4
        self._paused = False
        self._last_arrival = 0.0  # arrival times never decrease (in order despite jitter)
        # What is on the wire, oldest first: bytes, or _FIN / _RST. Each timer takes the
        # head, so segments due at the same instant still arrive in the order sent.
        self._wire: deque[bytes | str] = deque()
        host.streams.add(self)

    # -- set-up -----------------------------------------------------------------------

    def attach(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._buffered_proto = isinstance(protocol, asyncio.BufferedProtocol) or (
            hasattr(protocol, "get_buffer") and hasattr(protocol, "buffer_updated")
        )
        protocol.connection_made(self)
        if self._pending and self._reading and not self._lost:
            pending, self._pending = self._pending, []
            for chunk in pending:
                self._feed(chunk)
        if self._eof_pending:
            self._eof_pending = False
            self._on_eof()

    # -- asyncio.Transport ------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return None
        return super().get_extra_info(name, default)

    def write(self, data: Any) -> None:
        if self._closing or self._lost:
            return
        n = len(data)
        if not n:
            return
        host = self._host
        if not host.up:
            return
        stats = host.net.stats
        stats.stream_writes += 1
        stats.stream_bytes += n
        self._buffer += n
        self._send(bytes(data))
        if not self._paused and self._buffer > self._high and self._protocol is not None:
            self._paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        if self._closing or self._lost:
            return
        self._closing = True
        self._host.streams.discard(self)
        if self._host.up and self.peer is not None:
            # FIN after the data already written.
            self._send(_FIN)
        self._loop.call_soon(self._connection_lost, None)

    def abort(self) -> None:
        if self._lost:
            return
        self._closing = True
        self._host.streams.discard(self)
        if self.peer is not None:  # even from a dying host: its kernel sends the RST
            self._send(_RST)
        self._loop.call_soon(self._connection_lost, None)

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = DEFAULT_HIGH if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        if not self._paused and self._buffer > high and self._protocol is not None:
            self._paused = True
            self._protocol.pause_writing()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return self._buffer

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if self._reading:
            return
        self._reading = True
        pending, self._pending = self._pending, []
        for chunk in pending:
            if self._lost or not self._reading:
                self._pending.append(chunk)
                continue
            self._feed(chunk)

    def is_reading(self) -> bool:
        return self._reading and not self._lost

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    # -- delivery ---------------------------------------------------------------------

    def _send(self, item: bytes | str) -> None:
        when = self._host.delay(len(item) if isinstance(item, bytes) else 0)
        if when < self._last_arrival:
            when = self._last_arrival
        self._last_arrival = when
        self._wire.append(item)
        self._at(when, self._arrive)

    def _arrive(self) -> None:
        """The oldest segment on the wire reaches the peer (runs on the sender's end)."""
        item = self._wire.popleft()
        if item is _FIN:
            self._fin_arrives()
            return
        if item is _RST:
            self._rst_arrives()
            return
        assert isinstance(item, bytes)
        data = item
        self._buffer -= len(data)
        if self._paused and self._buffer <= self._low and not self._lost:
            self._paused = False
            self._protocol.resume_writing()
        peer = self.peer
        if peer is None:
            return
        if peer._lost or peer._closing or not peer._host.up:
            # Nobody reads there any more: its OS answers with a reset.
            if not self._lost and not self._closing:
                self._send_reset_back(peer)
            return
        peer._receive(data)

    def _send_reset_back(self, peer: VirtualStreamTransport) -> None:
        when = (
            peer._host.delay(0)
            if peer._host.up
            else self._loop.time() + 2 * (self._host.net.model.latency)
        )
        self._loop.call_at(when, self._reset_by_peer)

    def _receive(self, data: bytes) -> None:
        if self._protocol is None or not self._reading:
            self._pending.append(data)
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        protocol = self._protocol
        if not self._buffered_proto:
            protocol.data_received(data)
            return
        view = memoryview(data)
        while view and not self._lost:
            buf = protocol.get_buffer(len(view))
            n = min(len(buf), len(view))
            if n == 0:
                raise RuntimeError("get_buffer() returned an empty buffer")
            buf[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]

    def _fin_arrives(self) -> None:
        peer = self.peer
        if peer is None or peer._lost:
            return
        if peer._protocol is None:
            peer._eof_pending = True
            return
        peer._on_eof()

    def _on_eof(self) -> None:
        if self._lost:
            return
        keep_open = False
        eof = getattr(self._protocol, "eof_received", None)
        if eof is not None:
            keep_open = bool(eof())
        if not keep_open:
            self._closing = True
            self._host.streams.discard(self)
            self._connection_lost(None)

    def _rst_arrives(self) -> None:
        peer = self.peer
        if peer is not None:
            peer._reset_by_peer()

    def _reset_by_peer(self) -> None:
        if self._lost:
            return
        self._host.net.stats.resets += 1
        self._closing = True
        self._host.streams.discard(self)
        self._connection_lost(ConnectionResetError(errno.ECONNRESET, "connection reset by peer"))

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._pending.clear()
        if self._protocol is not None:
            self._protocol.connection_lost(exc)
