"""A test-only relay: splices two TCP connections, byte for byte (the real
circuit relay lives in p2pnode/nat/relay*.py). Both ends dial it; it never
reads what passes (Noise runs end to end over it)."""

from __future__ import annotations

import asyncio
import socket

from p2pnode.endpoints import SocketFactory
from tests.netns import connect_from

CHUNK = 64 * 1024


class Splicer:
    """Listens at ``host`` (a socket from ``make_socket``); :meth:`circuit`
    returns two sockets, one per end, joined through it."""

    def __init__(self, make_socket: SocketFactory, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = make_socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._listener.bind((host, 0))
        self._listener.listen(8)
        self._listener.setblocking(False)
        self.address: tuple[str, int] = (host, int(self._listener.getsockname()[1]))
        self.host = host
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.bytes_spliced = 0

    async def circuit(
        self, left: SocketFactory, right: SocketFactory
    ) -> tuple[socket.socket, socket.socket]:
        """Connect ``left`` then ``right`` to the splicer and join them."""
        loop = asyncio.get_running_loop()
        ends = []
        streams = []
        for make in (left, right):
            accepting = loop.create_task(loop.sock_accept(self._listener))
            ends.append(await connect_from(make, self.address))
            conn, _ = await asyncio.wait_for(accepting, 10)
            reader, writer = await asyncio.open_connection(sock=conn)
            self._writers.append(writer)
            streams.append((reader, writer))
        (left_r, left_w), (right_r, right_w) = streams
        for reader, writer in ((left_r, right_w), (right_r, left_w)):
            task = loop.create_task(self._pump(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return ends[0], ends[1]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                self.bytes_spliced += len(data)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            writer.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        self._listener.close()
