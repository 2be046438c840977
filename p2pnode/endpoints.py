"""Where a node's sockets come from: the event loop, or a simulated network.

The DHT and peer connections open every endpoint through an :class:`Endpoints`.
:class:`LoopEndpoints` (the default) hands the calls to the running asyncio loop,
so a node uses real UDP and TCP sockets. A simulation passes one bound to a
virtual host instead (``p2pnode.sim.virtual``): the same protocol objects then
move bytes through an in-memory network, with no file descriptors.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

SocketFactory = Callable[[int, int, int], socket.socket]
"""Makes a socket of (family, type, proto): ``socket.socket`` unless a test needs
its sockets made elsewhere (in a lab namespace). TCP sockets are made with
``IPPROTO_TCP``, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets
that say so, and with Nagle on each handshake step waits for a delayed ACK."""

LISTEN_BACKLOG = 100


class ListeningServer(Protocol):
    """What a node needs of a listening TCP server."""

    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...


class Endpoints(Protocol):
    async def datagram_endpoint(
        self, factory: Callable[[], asyncio.DatagramProtocol], host: str, port: int
    ) -> tuple[asyncio.DatagramTransport, int]:
        """Bind a UDP endpoint at ``host:port``; the transport and the bound port."""
        ...

    async def server(
        self, factory: Callable[[], asyncio.BaseProtocol], host: str, port: int
    ) -> tuple[ListeningServer, int]:
        """Listen for TCP at ``host:port``; the server and the bound port."""
        ...

    async def connect(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        host: str,
        port: int,
        local_host: str | None = None,
    ) -> None:
        """Open a TCP connection to ``host:port`` for the protocol ``factory`` makes,
        from ``local_host`` if given (a node bound to one address speaks from it).
        OSError when it cannot be opened."""
        ...


class LoopEndpoints:
    """Real sockets, from the running event loop."""

    async def datagram_endpoint(
        self, factory: Callable[[], asyncio.DatagramProtocol], host: str, port: int
    ) -> tuple[asyncio.DatagramTransport, int]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(factory, local_addr=(host, port))
        return transport, int(transport.get_extra_info("sockname")[1])

    async def server(
        self, factory: Callable[[], asyncio.BaseProtocol], host: str, port: int
    ) -> tuple[ListeningServer, int]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        sockets = bind_listeners([(info[0], info[4]) for info in infos])
        return await serve_sockets(factory, sockets)

    async def connect(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        host: str,
        port: int,
        local_host: str | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        local = (local_host, 0) if local_host and _same_family(local_host, host) else None
        await loop.create_connection(factory, host, port, local_addr=local)


def _same_family(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a).version == ipaddress.ip_address(b).version
    except ValueError:
        return False


LOOP_ENDPOINTS: Endpoints = LoopEndpoints()


# -- TCP listeners that share their port with hole-punching sockets ------------


class _Servers:
    """Several asyncio servers (one per bound address) closed as one."""

    def __init__(self, servers: list[asyncio.Server]) -> None:
        self._servers = servers

    @property
    def sockets(self) -> list[object]:
        """Every listening socket (as ``asyncio.Server.sockets``)."""
        return [sock for server in self._servers for sock in server.sockets]

    def close(self) -> None:
        for server in self._servers:
            server.close()

    async def wait_closed(self) -> None:
        for server in self._servers:
            await server.wait_closed()


async def serve_sockets(
    factory: Callable[[], asyncio.BaseProtocol], sockets: Sequence[socket.socket]
) -> tuple[ListeningServer, int]:
    """Serve ``factory`` on listening ``sockets`` (from :func:`bind_listeners`);
    the server and the bound port."""
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    try:
        for sock in sockets:
            servers.append(await loop.create_server(factory, sock=sock))
    except BaseException:
        for server in servers:
            server.close()
        for sock in sockets:
            sock.close()
        raise
    return _Servers(servers), int(sockets[0].getsockname()[1])


def bind_listeners(
    addresses: Sequence[tuple[int, Any]],
    *,
    reuse_port: bool = True,
    make_socket: SocketFactory = socket.socket,
) -> list[socket.socket]:
    """Listening TCP sockets on ``addresses`` ((family, sockaddr) pairs, one port).

    With ``reuse_port`` (the default) each gets SO_REUSEPORT, so a hole punch can
    connect *from* the listening port (p2pnode.nat.punch_socket): NATs that keep
    ports then map both to the same public port, which is the address peers
    learned. SO_REUSEPORT set before bind would also let a second node bind the
    same port and silently share its connections; so each socket binds *without*
    it (failing with "address in use" whenever anything holds the port, and
    picking a truly free port for port 0, atomically) and sets it just after,
    before listening: Linux checks the flag of the sockets already bound when a
    later one binds, so punch sockets may share the port, a second listener may
    not. Port 0 binds the first address to a free port and the rest to that one.
    """
    if not addresses:
        raise OSError(errno.EADDRNOTAVAIL, "no address to listen on")
    bound: list[socket.socket] = []
    port: int | None = None
    # "::" alone listens dual-stack (IPv4 arrives v4-mapped, ::ffff:a.b.c.d);
    # beside an IPv4 socket it is IPv6 only, as asyncio does it
    dual = (
        len(addresses) == 1 and addresses[0][0] == socket.AF_INET6 and _unspecified(addresses[0][1])
    )
    try:
        seen: set[tuple[int, Any]] = set()
        for family, sockaddr in addresses:
            if port is not None:
                sockaddr = (sockaddr[0], port, *sockaddr[2:])
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            sock = make_socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(not dual))
            sock.bind(sockaddr)
            if reuse_port:  # after bind: see above
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            port = int(sock.getsockname()[1])
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def _unspecified(sockaddr: Any) -> bool:
    return str(sockaddr[0]).split("%", 1)[0] in ("::", "0:0:0:0:0:0:0:0")
