"""Sockets inside lab namespaces from this very process (p2pnode/sim/netlab.py makes them).

A socket belongs to the network namespace it was created in, whatever the
thread does later; so one asyncio loop can drive peers that each live in their
own namespace: the thread enters the namespace only for the ``socket()`` call
(synchronous, no ``await`` in between, so no other coroutine runs meanwhile).
Root only, like the lab. Python 3.11 has no ``os.setns``: libc's, by ctypes.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from p2pnode.endpoints import ListeningServer, SocketFactory, bind_listeners, serve_sockets
from p2pnode.sim.netlab import Node

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the block with this thread in namespace ``ns`` (then back)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def socket_factory(node: Node | str) -> SocketFactory:
    """Makes sockets in ``node``'s namespace."""
    ns = node.ns if isinstance(node, Node) else node

    def make(family: int, kind: int, proto: int = 0) -> socket.socket:
        with in_netns(ns):
            return socket.socket(family, kind, proto)

    return make


class NetnsEndpoints:
    """``p2pnode.endpoints.Endpoints`` whose sockets live in a lab namespace
    (IP literals only: nothing is resolved)."""

    def __init__(self, node: Node | str) -> None:
        self.make_socket = socket_factory(node)

    async def datagram_endpoint(
        self, factory: Callable[[], asyncio.DatagramProtocol], host: str, port: int
    ) -> tuple[asyncio.DatagramTransport, int]:
        sock = self.make_socket(_family(host), socket.SOCK_DGRAM, 0)
        sock.bind((host, port))
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(factory, sock=sock)
        return transport, int(sock.getsockname()[1])

    async def server(
        self, factory: Callable[[], asyncio.BaseProtocol], host: str, port: int
    ) -> tuple[ListeningServer, int]:
        sockets = bind_listeners([(_family(host), (host, port))], make_socket=self.make_socket)
        return await serve_sockets(factory, sockets)

    async def connect(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        host: str,
        port: int,
        local_host: str | None = None,  # the namespace's own address is the source
    ) -> None:
        sock = await connect_from(self.make_socket, (host, port))
        await asyncio.get_running_loop().create_connection(factory, sock=sock)


async def connect_from(make_socket: SocketFactory, remote: tuple[str, int]) -> socket.socket:
    """A TCP socket made by ``make_socket``, connected to ``remote``."""
    sock = make_socket(_family(remote[0]), socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, remote)
    except BaseException:
        sock.close()
        raise
    return sock


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
