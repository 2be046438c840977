"""Hole punching through the network-namespace lab (DESIGN.md, "The
network-namespace lab"): two peers behind routers, a relayed connection
between them (tests/splice.py), then HolePuncher.upgrade."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from p2pnode.errors import HolePunchFailed, P2PTimeoutError
from p2pnode.nat.holepunch_core import HolePunchConfig
from p2pnode.net.host import PeerAddress
from p2pnode.sim.netlab import Lab
from p2pnode.wire.messages import Ping, Pong
from tests.conftest import needs_lab
from tests.helpers import eventually
from tests.punch_lab import Peer, PunchLab

pytestmark = [needs_lab, pytest.mark.usefixtures("no_errors_logged")]

CONFIG = HolePunchConfig(open_timeout=2.0, reply_timeout=3.0, retry_delay=0.1)
# symmetric NAT: every round fails by timeout; keep the three rounds short
FAILING = HolePunchConfig(open_timeout=0.8, reply_timeout=3.0, retry_delay=0.1)


@pytest.fixture
async def plab(lab: Lab) -> AsyncIterator[PunchLab]:
    built = PunchLab(lab)
    try:
        yield built
    finally:
        await built.close()


async def ping(a: Peer, b: Peer) -> None:
    # nothing listens at the address given: the pooled connection carries it
    reply = await a.host.request(PeerAddress(b.node_id, "192.0.2.1", 9), Ping(), timeout=5)
    assert isinstance(reply, Pong)


async def poll(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    await eventually(condition, timeout, interval=0.02)


async def test_punch_through_two_port_keeping_nats_that_drop_unsolicited(
    plab: PunchLab,
) -> None:
    a = await plab.peer(*plab.place("a", "eim"), CONFIG)
    b = await plab.peer(*plab.place("b", "eim"), CONFIG)
    await plab.relay(a, b)
    await ping(a, b)

    conn = await a.puncher.upgrade(b.node_id)

    assert conn.via == "punched" and conn.remote_node_id == b.node_id
    await poll(lambda: "punched" in b.vias(a))
    # the relayed connection closes once idle; requests go over the punched one
    await poll(lambda: a.vias(b) == ["punched"] and b.vias(a) == ["punched"])
    await ping(a, b)
    await ping(b, a)
    stats = a.puncher.stats()
    assert stats["holepunch_successes"] == 1 and stats["holepunch_relayed_closed"] == 1, stats
    # the peer came from the router's address and our listening port: a real hole
    assert conn.peername == (b.public_ip, b.port)


async def test_symmetric_nat_fails_cleanly_and_the_relayed_connection_stays(
    plab: PunchLab,
) -> None:
    a = await plab.peer(*plab.place("a", "eim"), FAILING)
    b = await plab.peer(*plab.place("b", "symmetric"), FAILING)
    await plab.relay(a, b)

    with pytest.raises(HolePunchFailed) as failed:
        await a.puncher.upgrade(b.node_id)

    assert failed.value.reason in ("timeout", "handshake")
    assert a.vias(b) == ["relayed"] and b.vias(a) == ["relayed"]
    await ping(a, b)
    await ping(b, a)
    stats = a.puncher.stats()
    assert stats["holepunch_rounds"] == 3 and stats["holepunch_upgrades_failed"] == 1, stats


async def test_one_public_side_gets_a_connection_reversal(plab: PunchLab) -> None:
    """B public reaches A (eim, drop) through the relay; A connects back."""
    a = await plab.peer(*plab.place("a", "eim"), CONFIG)
    b = await plab.peer(*plab.place("b", "public"), CONFIG)
    await plab.relay(b, a)

    conn = await b.puncher.upgrade(a.node_id)

    # B accepted A's connection on its listener while it waited for it: made
    # by the coordination, so punched on both ends (A is its Noise initiator)
    assert conn.via == "punched" and conn.dialed is None
    await poll(lambda: a.vias(b) == ["punched"] and b.vias(a) == ["punched"])
    await ping(a, b)
    await ping(b, a)


# -- IPv6: no NAT, a stateful firewall ---------------------------------------------


async def test_ipv6_firewall_drops_unsolicited_inbound_but_not_replies(plab: PunchLab) -> None:
    a = await plab.peer(*plab.place_v6("a", "firewall"), CONFIG)
    outside = await plab.peer(*plab.place_v6("p", "public"), CONFIG)
    # a, behind the firewall, reaches the public host...
    reply = await a.host.request(
        PeerAddress(outside.node_id, outside.public_ip, outside.port), Ping(), timeout=5
    )
    assert isinstance(reply, Pong)
    # ...but a fresh connection to a's own (global, unNATed) address dies silently
    other = await plab.peer(*plab.place_v6("q", "public"), CONFIG)
    with pytest.raises(P2PTimeoutError):
        await other.host.request(PeerAddress(a.node_id, a.public_ip, a.port), Ping(), timeout=1)


async def test_punch_through_two_ipv6_firewalls(plab: PunchLab) -> None:
    a = await plab.peer(*plab.place_v6("a", "firewall"), CONFIG)
    b = await plab.peer(*plab.place_v6("b", "firewall"), CONFIG)
    await plab.relay(a, b)

    conn = await a.puncher.upgrade(b.node_id)

    assert conn.via == "punched" and conn.peername == (b.public_ip, b.port)
    await poll(lambda: a.vias(b) == ["punched"] and b.vias(a) == ["punched"])
    await ping(a, b)
    await ping(b, a)
