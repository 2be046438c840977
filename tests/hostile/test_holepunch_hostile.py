"""A peer cannot use hole punching to make us flood a third party with SYNs:
it must hold a relayed connection to us, each round opens to at most
``max_targets`` of the addresses it lists, and it may start at most
``per_peer_rounds`` rounds per window (p2pnode/nat/holepunch_core.py)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from p2pnode.errors import RemoteError
from p2pnode.identity import Identity
from p2pnode.nat.holepunch import HolePuncher
from p2pnode.nat.holepunch_core import HolePunchConfig
from p2pnode.nat.holepunch_messages import PunchConnect, PunchSync, pack_addr
from p2pnode.nat.types import Reachability
from p2pnode.net.config import NetLimits
from p2pnode.net.host import PeerHost
from tests.helpers import eventually
from tests.integration.test_holepunch import LIMITS, peer, relayed

pytestmark = pytest.mark.usefixtures("no_errors_logged")

# the victims never answer the handshake: give up on it soon
QUICK = NetLimits(handshake_timeout=0.5)
CONFIG = HolePunchConfig(open_timeout=1.0, max_targets=4, per_peer_rounds=6)
ROUNDS = 10
PER_CONNECT = 8  # addresses listed per Connect (the message's maximum)
VICTIMS = ROUNDS * PER_CONNECT


@pytest.fixture
def victims() -> Iterator[list[socket.socket]]:
    """Listeners standing for a third party's ports (loopback: the node under
    attack is on loopback too, so only the counts limit what reaches them)."""
    made = []
    for _ in range(VICTIMS):
        sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        sock.setblocking(False)
        made.append(sock)
    yield made
    for sock in made:
        sock.close()


@pytest.fixture
async def made() -> AsyncIterator[list[tuple[PeerHost, HolePuncher]]]:
    peers: list[tuple[PeerHost, HolePuncher]] = []
    yield peers
    for host, puncher in peers:
        await puncher.close()
        await host.close()


def connections_reaching(victims: list[socket.socket]) -> int:
    count = 0
    for victim in victims:
        for _ in range(1000):  # bounded drain of the accept queue
            try:
                conn, _ = victim.accept()
            except BlockingIOError:
                break
            conn.close()
            count += 1
    return count


async def test_a_peer_cannot_aim_a_stream_of_punches_at_third_parties(
    made: list[tuple[PeerHost, HolePuncher]], victims: list[socket.socket]
) -> None:
    _, puncher = await peer(made, Reachability.PRIVATE, CONFIG, QUICK)
    target = made[0][0]
    attacker = PeerHost(Identity.generate(), LIMITS)
    made.append((attacker, HolePuncher(attacker, listen_port=0, addresses=list)))
    conn, _ = await relayed(attacker, target)
    refused = 0
    for attempt in range(1, ROUNDS + 1):
        # each round sprays fresh ports of the victim
        listed = victims[(attempt - 1) * PER_CONNECT : attempt * PER_CONNECT]
        addrs = tuple(pack_addr(*v.getsockname()[:2]) for v in listed)
        try:
            await conn.request(PunchConnect(attempt, addrs, False))
            await conn.request(PunchSync(attempt))
        except RemoteError:
            refused += 1

    def settled() -> bool:
        stats = puncher.stats()
        ended = sum(v for k, v in stats.items() if k.startswith("holepunch_round_failed_"))
        return ended + stats.get("holepunch_successes", 0) == stats.get("holepunch_rounds", 0)

    await eventually(settled, 10, interval=0.02, what="every punch round to end")
    reached = connections_reaching(victims)
    stats = puncher.stats()
    assert 0 < reached <= CONFIG.max_targets * CONFIG.per_peer_rounds, (reached, stats)
    assert refused == ROUNDS - CONFIG.per_peer_rounds, stats
    assert stats["holepunch_refused_limit"] == refused, stats
    too_many = (PER_CONNECT - CONFIG.max_targets) * CONFIG.per_peer_rounds
    assert stats["holepunch_addr_rejected_too_many"] == too_many, stats
