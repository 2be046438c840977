"""Attacks on the circuit relay (real sockets on 127.0.0.1): a flood of circuit
hellos from one address, a flood of connections that never say what they are,
and an accept that guesses a circuit with the wrong secret. Each fails without
its defence (per-dialer-IP circuit cap, eviction of the oldest undecided
connection, the one-time secret)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from p2pnode.exchange.messages import GetPiece
from p2pnode.nat.relay import RelayClient
from p2pnode.nat.relay_core import RelayLimits, RelayStatus
from p2pnode.nat.relay_wire import Accept, Connect, Incoming, IncomingReply, Status, encode_hello
from p2pnode.net.host import read_hello
from p2pnode.wire.messages import Message
from tests.integration.test_relay import RID, MakeSetup, eventually, relayed

__all__ = ["relayed"]

FLOODER = "127.0.0.2"  # another source address: the dialer under test is 127.0.0.1


async def open_from(source: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await loop.sock_connect(sock, ("127.0.0.1", port))
    return sock


async def test_a_circuit_hello_flood_from_one_address_is_capped(relayed: MakeSetup) -> None:
    s = await relayed(RelayLimits(max_circuits_per_ip=4, max_circuits_per_reservation=64))
    loop = asyncio.get_running_loop()
    socks = []
    statuses = []
    try:
        for _ in range(40):
            sock = await open_from(FLOODER, s.r_port)
            socks.append(sock)
            await loop.sock_sendall(sock, encode_hello(Connect(s.c.node_id)))
        # 4 admitted (C accepts them: ok), the 36 others refused at once
        for sock in socks:
            async with asyncio.timeout(10):
                statuses.append(await read_hello(loop, sock))
        said = sorted(st.status for st in statuses if isinstance(st, Status))
        assert said == [RelayStatus.CIRCUITS_PER_IP] * 36 + [RelayStatus.OK] * 4
        assert s.relay.stats()["refused.circuits_per_ip"] == 36
        # C was asked about 4 circuits only; an honest dialer still gets through
        d = s.dialer()
        await d.request(s.target(), GetPiece(RID, 1))
        stats = s.client.stats()
        assert stats.get("circuits_accepted", 0) + stats.get("circuits_failed", 0) <= 5
    finally:
        for sock in socks:
            sock.close()


async def test_connections_that_never_speak_cannot_lock_the_relay(relayed: MakeSetup) -> None:
    s = await relayed(RelayLimits(max_undecided=8, hello_timeout=60.0))
    socks = []
    try:
        for _ in range(50):
            socks.append(await open_from(FLOODER, s.r_port))
        await eventually(lambda: s.r.stats().get("first_bytes_evicted", 0) >= 42)
        assert s.r.stats()["connections_undecided"] <= 8
        d = s.dialer()  # its hello evicts the oldest silent connection
        await d.request(s.target(), GetPiece(RID, 1))
        conn = d.connection_to(s.c.node_id)
        assert conn is not None and conn.via == "relayed"
    finally:
        for sock in socks:
            sock.close()


class Holding(RelayClient):
    """Takes the relay's Incoming but does not accept it (yet): the circuit waits."""

    held_incoming: list[Incoming]

    async def _on_incoming(self, remote: bytes, msg: Message) -> Message:
        assert isinstance(msg, Incoming)
        self.held_incoming.append(msg)
        return IncomingReply(True)


async def test_an_accept_with_a_wrong_secret_is_refused(relayed: MakeSetup) -> None:
    Holding.held_incoming = []
    s = await relayed(client_type=Holding)
    d = s.dialer()
    dial = asyncio.ensure_future(d.request(s.target(), GetPiece(RID, 1)))
    try:
        await eventually(lambda: bool(Holding.held_incoming))
        (incoming,) = Holding.held_incoming
        loop = asyncio.get_running_loop()
        for secret in (bytes(16), incoming.secret[:-1] + bytes([incoming.secret[-1] ^ 1])):
            attacker = await open_from(FLOODER, s.r_port)
            try:
                await loop.sock_sendall(attacker, encode_hello(Accept(incoming.circuit_id, secret)))
                async with asyncio.timeout(10):
                    status = await read_hello(loop, attacker)
                assert isinstance(status, Status) and status.status == RelayStatus.BAD_SECRET
            finally:
                attacker.close()
        assert s.relay.stats()["refused.bad_secret"] == 2
        assert not dial.done()
        # The real accept, with the secret, still works: D reaches C.
        hop = ("127.0.0.1", s.r_port, s.r.node_id)
        s.client._accepting += 1
        await RelayClient._accept(s.client, hop, incoming)
        async with asyncio.timeout(10):
            await dial
        conn = d.connection_to(s.c.node_id)
        assert conn is not None and conn.via == "relayed"
    finally:
        dial.cancel()
        await asyncio.gather(dial, return_exceptions=True)


pytestmark = pytest.mark.usefixtures("no_errors_logged")
