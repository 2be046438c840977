"""Where a node's sockets come from: the event loop, or a simulated network.

The DHT and peer connections open every endpoint through an :class:`Endpoints`.
:class:`LoopEndpoints` (the default) hands the calls to the running asyncio loop,
so a node uses real UDP and TCP sockets. A simulation passes one bound to a
virtual host instead (``p2pnode.sim.virtual``): the same protocol objects then
move bytes through an in-memory network, with no file descriptors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol


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
        self, factory: Callable[[], asyncio.BaseProtocol], host: str, port: int
    ) -> None:
        """Open a TCP connection to ``host:port`` for the protocol ``factory`` makes.
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
        server = await loop.create_server(factory, host, port, reuse_address=True)
        sockets = server.sockets
        return server, int(sockets[0].getsockname()[1]) if sockets else port

    async def connect(
        self, factory: Callable[[], asyncio.BaseProtocol], host: str, port: int
    ) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(factory, host, port)


LOOP_ENDPOINTS: Endpoints = LoopEndpoints()
