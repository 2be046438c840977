"""The circuit relay over real sockets on 127.0.0.1: a dialer D reaches a node C
through a relay R (real PeerHosts); Noise is end to end (R sees ciphertext only,
and a byte R flips breaks the connection, never the data); R's limits refuse or
end circuits cleanly and count it.

Rules: port 0 only; no sleep as synchronisation (``eventually`` polls with a
deadline); every host and relay part is closed at the end.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from p2pnode.errors import P2PError, RelayRefused
from p2pnode.exchange.messages import GetPiece, PieceData
from p2pnode.identity import Identity
from p2pnode.nat.relay import RelayClient, RelayConfig, RelayService
from p2pnode.nat.relay_core import Circuit, RelayLimits, RelayStatus
from p2pnode.nat.relay_wire import Reserve, ReserveReply
from p2pnode.net import NetLimits, PeerAddress, PeerHost
from p2pnode.net.dispatch import routes_of
from p2pnode.wire.messages import Message

pytestmark = pytest.mark.usefixtures("no_errors_logged")

FAST = NetLimits(handshake_timeout=5.0, request_timeout=10.0)
RID = bytes(range(32))
PLAIN = b"KNOWN-PLAINTEXT-"  # what C serves, over and over


async def eventually(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


def dead_port() -> int:
    """A port nothing listens on (connection refused: the direct dial fails fast)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve_pieces(remote: bytes, msg: Message) -> Message:
    assert isinstance(msg, GetPiece)
    size = msg.index * 1024  # the index says how many KiB
    return PieceData(msg.resource_id, msg.index, (PLAIN * (size // len(PLAIN) + 1))[:size])


class Capturing(RelayService):
    """A relay that keeps a copy of everything it splices."""

    seen: bytearray

    def pass_bytes(
        self, circuit: Circuit, side: int, data: memoryview
    ) -> bytes | bytearray | memoryview:
        self.seen += data
        return data


class Tampering(RelayService):
    """A relay that flips one byte of the first large chunk from C to D."""

    flipped = False

    def pass_bytes(
        self, circuit: Circuit, side: int, data: memoryview
    ) -> bytes | bytearray | memoryview:
        if side == 1 and not self.flipped and len(data) > 4096:
            self.flipped = True
            changed = bytearray(data)
            changed[len(changed) // 2] ^= 0x01
            return bytes(changed)
        return data


@dataclass
class Setup:
    relay: RelayService
    r: PeerHost
    r_port: int
    c: PeerHost
    client: RelayClient
    hosts: list[PeerHost] = field(default_factory=list)

    def target(self) -> PeerAddress:
        hop = ("127.0.0.1", self.r_port, self.r.node_id)
        return PeerAddress(self.c.node_id, "127.0.0.1", dead_port(), (hop,))

    def dialer(self) -> PeerHost:
        host = PeerHost(Identity.generate(), FAST)
        self.hosts.append(host)
        return host


MakeSetup = Callable[..., Awaitable[Setup]]


@pytest.fixture
async def relayed() -> AsyncIterator[MakeSetup]:
    made: list[Setup] = []

    async def make(
        limits: RelayLimits | None = None,
        service: type[RelayService] = RelayService,
        client_type: type[RelayClient] = RelayClient,
        net: NetLimits = FAST,
    ) -> Setup:
        r = PeerHost(Identity.generate(), net)
        relay = service(r, limits or RelayLimits())
        relay.start()
        relay.set_enabled(True)
        r_port = await r.listen("127.0.0.1", 0)
        c = PeerHost(Identity.generate(), FAST)
        routes_of(c).route((GetPiece,), serve_pieces)
        changes: list[object] = []
        config = RelayConfig(client="always", relays=(("127.0.0.1", r_port),))
        client = client_type(c, config, list, lambda: True, changes.append)
        client.start()
        setup = Setup(relay, r, r_port, c, client, [r, c])
        made.append(setup)
        await eventually(lambda: bool(client.held))
        assert changes == [(("127.0.0.1", r_port, r.node_id),)]
        return setup

    yield make
    for setup in made:
        await setup.client.close()
        await setup.relay.close()
        for host in setup.hosts:
            await host.close()


async def test_a_dialer_reaches_a_node_through_its_relay(relayed: MakeSetup) -> None:
    s: Setup = await relayed()
    d = s.dialer()
    answer = await d.request(s.target(), GetPiece(RID, 64))
    assert isinstance(answer, PieceData) and answer.data == (PLAIN * 4096)[: 64 * 1024]
    conn = d.connection_to(s.c.node_id)
    assert conn is not None and conn.via == "relayed"
    assert d.stats()["connections_relayed"] == 1
    # Both ways: C's side of the circuit is a pooled connection to D too.
    await eventually(lambda: s.c.connection_to(d.node_id) is not None)
    back = s.c.connection_to(d.node_id)
    assert back is not None and back.via == "relayed"
    stats = s.relay.stats()
    assert stats["circuits_opened"] == 1 and stats["circuits_live"] == 1
    assert stats["bytes_relayed"] > 64 * 1024
    assert s.client.stats()["circuits_accepted"] == 1
    # Dialing the relay's address (no id named) reaches the relay, not C.
    to_relay = await d.connect(PeerAddress(None, "127.0.0.1", s.r_port))
    assert to_relay.remote_node_id == s.r.node_id


async def test_the_relay_sees_only_ciphertext(relayed: MakeSetup) -> None:
    s: Setup = await relayed(service=Capturing)
    relay = s.relay
    assert isinstance(relay, Capturing)
    relay.seen = bytearray()
    d = s.dialer()
    answer = await d.request(s.target(), GetPiece(RID, 256))
    assert isinstance(answer, PieceData) and PLAIN in bytes(answer.data)
    assert len(relay.seen) > 256 * 1024
    assert PLAIN not in relay.seen
    assert RID not in relay.seen  # the request too


async def test_a_tampering_relay_is_detected(relayed: MakeSetup) -> None:
    s: Setup = await relayed(service=Tampering)
    d = s.dialer()
    with pytest.raises(P2PError):
        await d.request(s.target(), GetPiece(RID, 256))
    assert isinstance(s.relay, Tampering) and s.relay.flipped
    await eventually(lambda: d.stats().get("tampered_chunks", 0) == 1)


async def test_the_reservation_cap_refuses_and_counts(relayed: MakeSetup) -> None:
    s: Setup = await relayed(RelayLimits(max_reservations=1))
    other = s.dialer()
    relay = PeerAddress(s.r.node_id, "127.0.0.1", s.r_port)
    answer = await other.request(relay, Reserve())
    assert isinstance(answer, ReserveReply) and answer.status == RelayStatus.RESERVATIONS_FULL
    assert s.relay.stats()["refused.reservations_full"] == 1
    # the one held is renewed, not refused
    again = await s.c.request(relay, Reserve())
    assert isinstance(again, ReserveReply) and again.status == RelayStatus.OK


async def test_the_circuit_cap_refuses_and_the_dialer_is_told_which_limit(
    relayed: MakeSetup,
) -> None:
    s: Setup = await relayed(RelayLimits(max_circuits_per_reservation=1))
    first = s.dialer()
    await first.request(s.target(), GetPiece(RID, 1))
    second = s.dialer()
    with pytest.raises(RelayRefused) as refused:
        await second.request(s.target(), GetPiece(RID, 1))
    assert refused.value.status == RelayStatus.CIRCUITS_PER_RESERVATION
    assert "circuits_per_reservation" in str(refused.value)
    assert s.relay.stats()["refused.circuits_per_reservation"] == 1
    assert second.stats()["relay_refused.circuits_per_reservation"] == 1


async def test_no_reservation_is_refused(relayed: MakeSetup) -> None:
    s: Setup = await relayed()
    d = s.dialer()
    hop = ("127.0.0.1", s.r_port, s.r.node_id)
    stranger = PeerAddress(Identity.generate().node_id, "127.0.0.1", dead_port(), (hop,))
    with pytest.raises(RelayRefused) as refused:
        await d.request(stranger, GetPiece(RID, 1))
    assert refused.value.status == RelayStatus.NO_RESERVATION


async def test_the_byte_limit_ends_the_circuit(relayed: MakeSetup) -> None:
    s: Setup = await relayed(RelayLimits(circuit_bytes=128 * 1024))
    d = s.dialer()
    await d.request(s.target(), GetPiece(RID, 16))  # within the limit
    with pytest.raises(P2PError):
        await d.request(s.target(), GetPiece(RID, 512))
    await eventually(lambda: s.relay.stats().get("ended.bytes", 0) == 1)
    await eventually(lambda: d.connection_to(s.c.node_id) is None)
    assert s.relay.stats()["circuits_live"] == 0


async def test_the_duration_limit_ends_the_circuit(relayed: MakeSetup) -> None:
    s: Setup = await relayed(RelayLimits(circuit_duration=2.0))
    d = s.dialer()
    await d.request(s.target(), GetPiece(RID, 1))
    assert d.connection_to(s.c.node_id) is not None
    await eventually(lambda: d.connection_to(s.c.node_id) is None)
    assert s.relay.stats()["ended.duration"] == 1
    assert s.relay.stats()["circuits_live"] == 0


async def test_the_idle_limit_ends_the_circuit(relayed: MakeSetup) -> None:
    s: Setup = await relayed(RelayLimits(circuit_idle=0.3))
    d = s.dialer()
    await d.request(s.target(), GetPiece(RID, 1))
    await eventually(lambda: d.connection_to(s.c.node_id) is None)
    assert s.relay.stats()["ended.idle"] == 1


async def test_a_direct_address_that_answers_wins(relayed: MakeSetup) -> None:
    s: Setup = await relayed()
    c_port = await s.c.listen("127.0.0.1", 0)
    d = s.dialer()
    hop = ("127.0.0.1", s.r_port, s.r.node_id)
    await d.request(PeerAddress(s.c.node_id, "127.0.0.1", c_port, (hop,)), GetPiece(RID, 1))
    conn = d.connection_to(s.c.node_id)
    assert conn is not None and conn.via == "direct"
    assert s.relay.stats().get("circuits_requested", 0) == 0


async def test_reservations_are_renewed_and_moved_when_a_relay_is_lost() -> None:
    hosts: list[PeerHost] = []
    relays: list[RelayService] = []
    ports: list[int] = []
    for _ in range(2):
        r = PeerHost(Identity.generate(), FAST)
        relay = RelayService(r, RelayLimits(reservation_ttl=1.0))
        relay.start()
        relay.set_enabled(True)
        ports.append(await r.listen("127.0.0.1", 0))
        hosts.append(r)
        relays.append(relay)
    c = PeerHost(Identity.generate(), FAST)
    hosts.append(c)
    changes: list[tuple[tuple[str, int, bytes], ...]] = []
    config = RelayConfig(
        client="always",
        reservations=1,
        relays=tuple(("127.0.0.1", p) for p in ports),
        check_interval=0.1,
    )
    client = RelayClient(c, config, list, lambda: True, changes.append)
    client.start()
    try:
        await eventually(lambda: bool(changes))
        assert changes[0] == (("127.0.0.1", ports[0], hosts[0].node_id),)
        # renewed at half its lifetime, again and again
        await eventually(lambda: relays[0].stats().get("reservations_renewed", 0) >= 2)
        assert relays[0].stats()["reservations"] == 1
        assert len(changes) == 1
        # the first relay goes away: C reserves on the other and says so
        await relays[0].close()
        await hosts[0].close()
        await eventually(lambda: len(changes) >= 2 and bool(changes[-1]))
        assert changes[-1] == (("127.0.0.1", ports[1], hosts[1].node_id),)
        assert client.stats()["reservations_lost"] == 1
    finally:
        await client.close()
        for relay in relays:
            await relay.close()
        for host in hosts:
            await host.close()


async def test_a_dial_with_relays_does_not_wait_for_one_without(relayed: MakeSetup) -> None:
    """A dial to a peer's direct address alone (say, an AutoNAT probe of a peer
    that has since turned private) hangs until the handshake timeout; a request
    that names the peer's relays must not join it and wait too."""
    s: Setup = await relayed()
    d = s.dialer()
    with socket.socket() as silent:  # accepts at the TCP level, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        hang = PeerAddress(s.c.node_id, "127.0.0.1", silent.getsockname()[1])
        stuck = asyncio.get_running_loop().create_task(d.request(hang, GetPiece(RID, 1)))
        await asyncio.sleep(0.1)  # (the direct-only dial is under way)
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await d.request(s.target(), GetPiece(RID, 2))
        assert isinstance(answer, PieceData)
        assert loop.time() - started < FAST.handshake_timeout / 2
        stuck.cancel()
        await asyncio.gather(stuck, return_exceptions=True)
