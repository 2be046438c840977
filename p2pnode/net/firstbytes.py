"""The first bytes of an accepted TCP connection decide what it is.

A node that offers a circuit relay hears two kinds of connections on its TCP
port: peer connections, which always start with the Noise handshake's first
message (a 2-byte length 0x0020), and circuit hellos (a 2-byte length with the
top bit set, see ``p2pnode/nat/relay_wire.py``). :class:`FirstBytes` reads
until it can tell, then hands the transport on (``transport.set_protocol``)
to a :class:`~p2pnode.net.connection.PeerConnection`, with the bytes read so far
replayed into it, or to the relay, with the decoded hello.

A connection that says nothing within ``hello_timeout``, or says something
else, is dropped and counted; at most ``max_undecided`` are undecided at once
(a newer one evicts the oldest, as inbound handshakes do). Nodes that offer no
relay never use this: their listener makes ``PeerConnection``s directly.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Protocol, cast

from p2pnode.errors import ProtocolError
from p2pnode.nat.relay_wire import Hello, decode_hello, hello_length

NOISE_FIRST = b"\x00\x20"


class FirstBytesOwner(Protocol):
    counters: Counter[str]

    def undecided_open(self, sniffer: FirstBytes) -> bool: ...
    def undecided_closed(self, sniffer: FirstBytes) -> None: ...
    def handoff_peer(self, transport: asyncio.Transport, data: bytes) -> None: ...
    def handoff_hello(self, transport: asyncio.Transport, hello: Hello, ip: str) -> None: ...


class FirstBytes(asyncio.Protocol):
    def __init__(self, owner: FirstBytesOwner, timeout: float) -> None:
        self.owner = owner
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.ip = "?"
        self._buf = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._decided = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.ip = str(peer[0])
        if not self.owner.undecided_open(self):
            self.drop("first_bytes_refused")
            return
        self._timer = asyncio.get_running_loop().call_later(self.timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self._decided:
            return
        self._buf += data
        buf = self._buf
        if len(buf) < 2:
            return
        transport = self.transport
        assert transport is not None
        if buf[:2] == NOISE_FIRST:
            self._decide()
            self.owner.handoff_peer(transport, bytes(buf))
            return
        try:
            length = hello_length(bytes(buf[:2]))
            if len(buf) < 2 + length:
                return
            if len(buf) > 2 + length:
                # nothing may follow a hello before the relay's status
                raise ProtocolError("bytes after a relay hello")
            hello = decode_hello(bytes(buf[2 : 2 + length]))
        except ProtocolError:
            self.drop("relay_hello_bad")
            return
        self._decide()
        self.owner.handoff_hello(transport, hello, self.ip)

    def eof_received(self) -> bool | None:
        if not self._decided:
            self.drop("relay_hello_eof")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._decided:
            self._decide()

    def drop(self, counter: str) -> None:
        """Abort the connection, counted under ``counter``."""
        self.owner.counters[counter] += 1
        self._decide()
        if self.transport is not None:
            self.transport.abort()

    def _decide(self) -> None:
        if self._decided:
            return
        self._decided = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buf = bytearray()
        self.owner.undecided_closed(self)

    def _timed_out(self) -> None:
        self._timer = None
        self.drop("first_bytes_timeouts")
