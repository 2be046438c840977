"""Hole punching on 127.0.0.1 (no lab): the reuse-port listener, the punch
socket, and the upgrade's message exchange with one side public (connection
reversal: on loopback nothing drops a SYN, so only that case is deterministic
here; the NAT cases are in test_holepunch_lab.py)."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import AsyncIterator

import pytest

from p2pnode.endpoints import LOOP_ENDPOINTS, bind_listeners
from p2pnode.errors import HolePunchFailed, RemoteError, UsageError
from p2pnode.identity import Identity
from p2pnode.nat.holepunch import HolePuncher
from p2pnode.nat.holepunch_core import HolePunchConfig
from p2pnode.nat.holepunch_messages import PunchConnect, PunchSync, pack_addr
from p2pnode.nat.punch_socket import PunchSettings, punch_any, punch_connect
from p2pnode.nat.types import Reachability, Via
from p2pnode.net.config import NetLimits
from p2pnode.net.connection import PeerConnection
from p2pnode.net.dispatch import routes_of
from p2pnode.net.host import PeerAddress, PeerHost
from p2pnode.wire.messages import Message, Ping, Pong
from tests.helpers import eventually

pytestmark = pytest.mark.usefixtures("no_errors_logged")

LIMITS = NetLimits(handshake_timeout=3.0)
CONFIG = HolePunchConfig(open_timeout=2.0, reply_timeout=2.0, retry_delay=0.05)


async def pong(remote: bytes, msg: Message) -> Message:
    return Pong()


@pytest.fixture
async def made() -> AsyncIterator[list[tuple[PeerHost, HolePuncher]]]:
    peers: list[tuple[PeerHost, HolePuncher]] = []
    yield peers
    for host, puncher in peers:
        await puncher.close()
        await host.close()


async def peer(
    made: list[tuple[PeerHost, HolePuncher]],
    reachability: Reachability,
    config: HolePunchConfig = CONFIG,
    limits: NetLimits = LIMITS,
) -> tuple[PeerHost, HolePuncher]:
    host = PeerHost(Identity.generate(), limits)
    port = await host.listen("127.0.0.1", 0)
    routes_of(host).route((Ping,), pong)
    puncher = HolePuncher(
        host,
        listen_port=port,
        addresses=lambda: [("127.0.0.1", port)],
        reachability=lambda: reachability,
        config=config,
        bind_host="127.0.0.1",
    )
    puncher.start()
    made.append((host, puncher))
    return host, puncher


def tcp_socket_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        left = socket.create_connection(server.getsockname())
        right, _ = server.accept()
    left.setblocking(False)
    right.setblocking(False)
    return left, right


async def relayed(a: PeerHost, b: PeerHost) -> tuple[PeerConnection, PeerConnection]:
    """A connection a dialed, marked relayed (a socket pair stands for the relay)."""
    left, right = tcp_socket_pair()
    conn_a, conn_b = await asyncio.gather(
        a.adopt(left, initiator=True, expected=b.node_id, via=Via.RELAYED),
        b.adopt(right, initiator=False, expected=None, via=Via.RELAYED),
    )
    return conn_a, conn_b


def vias(host: PeerHost, other: PeerHost) -> list[str]:
    return sorted(str(c.via) for c in host.connections_to(other.node_id))


# -- the listener and the punch socket ------------------------------------------


async def test_listener_shares_its_port_with_punch_sockets_but_not_with_a_second_node() -> None:
    server, port = await LOOP_ENDPOINTS.server(asyncio.Protocol, "127.0.0.1", 0)
    try:
        # a second node on the same port: refused, although we listen with SO_REUSEPORT
        with pytest.raises(OSError) as info:
            await LOOP_ENDPOINTS.server(asyncio.Protocol, "127.0.0.1", port)
        assert info.value.errno == errno.EADDRINUSE
        with pytest.raises(OSError, match="in use"):
            bind_listeners([(socket.AF_INET, ("127.0.0.1", port))])
        # a punch socket connects from the listening port
        with socket.create_server(("127.0.0.1", 0)) as target:
            sock = await punch_connect(("127.0.0.1", port), target.getsockname()[:2])
            with sock:
                accepted, source = target.accept()
                accepted.close()
                assert sock.getsockname() == ("127.0.0.1", port) and source[1] == port
    finally:
        server.close()
        await server.wait_closed()


async def test_punch_fails_with_a_reason_and_takes_the_first_that_connects() -> None:
    settings = PunchSettings(timeout=2.0, refused_retries=1, retry_delay=0.01)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[:2]  # bound, not listening: refused
        with pytest.raises(HolePunchFailed) as info:
            await punch_connect(("127.0.0.1", 0), dead, settings)
        assert info.value.reason == "refused"
        with socket.create_server(("127.0.0.1", 0)) as live:
            sock = await punch_any(("127.0.0.1", 0), [dead, live.getsockname()[:2]], settings)
            sock.close()
    with pytest.raises(HolePunchFailed, match="no_address"):
        await punch_any(("127.0.0.1", 0), [], settings)


async def test_accepted_and_punched_sockets_have_nagle_off() -> None:
    """asyncio sets TCP_NODELAY only on sockets made with IPPROTO_TCP; with Nagle
    on, each Noise handshake step waited ~40 ms for a delayed ACK."""
    accepted: asyncio.Future[asyncio.BaseTransport] = asyncio.get_running_loop().create_future()

    class Record(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.set_result(transport)

    server, port = await LOOP_ENDPOINTS.server(Record, "127.0.0.1", 0)
    try:
        with socket.create_server(("127.0.0.1", 0)) as target:
            sock = await punch_connect(("127.0.0.1", 0), target.getsockname()[:2])
            assert sock.proto == socket.IPPROTO_TCP
            sock.close()
        with socket.create_connection(("127.0.0.1", port)):
            transport = await asyncio.wait_for(accepted, 5)
            inner = transport.get_extra_info("socket")
            assert inner.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            transport.close()
    finally:
        server.close()
        await server.wait_closed()


# -- the upgrade ----------------------------------------------------------------


async def test_upgrade_with_a_public_peer_is_a_connection_reversal(
    made: list[tuple[PeerHost, HolePuncher]],
) -> None:
    """a (private) dialed b (public) through a relay: b waits, a connects to
    b's listener from its own listening port and is the Noise initiator."""
    a, puncher_a = await peer(made, Reachability.PRIVATE)
    b, _ = await peer(made, Reachability.PUBLIC)
    await relayed(a, b)

    conn, again = await asyncio.gather(puncher_a.upgrade(b.node_id), puncher_a.upgrade(b.node_id))

    assert conn is again  # concurrent calls share one upgrade
    assert conn.via == "punched" and conn.remote_node_id == b.node_id
    await eventually(lambda: vias(a, b) == ["punched"] and vias(b, a) == ["punched"], 10)
    reply = await a.request(PeerAddress(b.node_id, "192.0.2.1", 9), Ping())
    assert isinstance(reply, Pong)
    stats = puncher_a.stats()
    assert stats["holepunch_successes"] == 1 and stats["holepunch_relayed_closed"] == 1, stats
    # already direct: nothing to do
    assert await puncher_a.upgrade(b.node_id) is conn
    assert puncher_a.stats()["holepunch_upgrades"] == 1


async def test_upgrade_needs_a_relayed_connection(
    made: list[tuple[PeerHost, HolePuncher]],
) -> None:
    _, puncher_a = await peer(made, Reachability.PRIVATE)
    with pytest.raises(UsageError, match="no relayed connection"):
        await puncher_a.upgrade(Identity.generate().node_id)


async def test_requests_over_a_direct_connection_or_out_of_order_are_refused(
    made: list[tuple[PeerHost, HolePuncher]],
) -> None:
    a, _ = await peer(made, Reachability.PRIVATE)
    b, puncher_b = await peer(made, Reachability.PRIVATE)
    addrs = (pack_addr("127.0.0.1", 9),)
    # no relayed connection: nobody may make us punch
    (listen_b,) = [port for _, port in puncher_b.addresses()]
    with pytest.raises(RemoteError, match="not relayed"):
        direct = PeerAddress(b.node_id, "127.0.0.1", listen_b)
        await a.request(direct, PunchConnect(1, addrs, False))
    # relayed now, but a Sync before any Connect
    conn_a, _ = await relayed(a, b)
    with pytest.raises(RemoteError, match="unexpected sync"):
        await conn_a.request(PunchSync(1))
    stats = puncher_b.stats()
    assert stats["holepunch_refused_not_relayed"] == 1, stats
    assert stats["holepunch_refused_unexpected_sync"] == 1, stats


# -- dual-stack listening ---------------------------------------------------------


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
async def test_listening_on_the_ipv6_wildcard_takes_ipv4_and_ipv6_peers() -> None:
    server = PeerHost(Identity.generate(), LIMITS)
    clients = [PeerHost(Identity.generate(), LIMITS) for _ in range(2)]
    try:
        routes_of(server).route((Ping,), pong)
        port = await server.listen("::", 0)
        for client, host in zip(clients, ("127.0.0.1", "::1"), strict=True):
            reply = await client.request(PeerAddress(server.node_id, host, port), Ping())
            assert isinstance(reply, Pong)
        seen = sorted(server.connections_to(c.node_id)[0].peername[0] for c in clients)
        assert seen == ["::1", "::ffff:127.0.0.1"], seen
        # one socket holds both families: a second node is refused on either
        for host in ("0.0.0.0", "::"):
            with pytest.raises(OSError) as info:
                await LOOP_ENDPOINTS.server(asyncio.Protocol, host, port)
            assert info.value.errno == errno.EADDRINUSE
        # and a punch to an IPv4 peer still leaves from the listening port
        with socket.create_server(("127.0.0.1", 0)) as target:
            sock = await punch_connect(("::", port), target.getsockname()[:2])
            with sock:
                assert sock.family == socket.AF_INET and sock.getsockname()[1] == port
    finally:
        for host in (server, *clients):
            await host.close()
