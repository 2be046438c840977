"""Two peers behind chosen NATs, a test-only relay between them, and hole
punching over it: what tests/integration/test_holepunch_lab.py and
benchmarks/bench_holepunch.py build (root only: p2pnode/sim/netlab.py).

Every peer runs in this process, its sockets in its own namespace
(tests/netns.py); the relay is tests/splice.py on a public host.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Literal

from p2pnode.identity import Identity
from p2pnode.nat.holepunch import HolePuncher
from p2pnode.nat.holepunch_core import HolePunchConfig
from p2pnode.nat.punch_socket import PunchSettings
from p2pnode.nat.types import Reachability, Via
from p2pnode.net.config import NetLimits
from p2pnode.net.connection import PeerConnection
from p2pnode.net.dispatch import routes_of
from p2pnode.net.host import PeerHost
from p2pnode.sim.netlab import Lab, Node, Segment
from p2pnode.wire.messages import Message, Ping, Pong
from tests.netns import NetnsEndpoints, socket_factory
from tests.splice import Splicer

Behind = Literal["eim", "eim_nodrop", "symmetric", "public"]

LIMITS = NetLimits(handshake_timeout=5.0)


async def pong(remote: bytes, msg: Message) -> Message:
    return Pong()


@dataclass
class Peer:
    node: Node
    public_ip: str
    host: PeerHost
    puncher: HolePuncher
    port: int

    @property
    def node_id(self) -> bytes:
        return self.host.node_id

    def vias(self, other: Peer) -> list[str]:
        return sorted(str(c.via) for c in self.host.connections_to(other.node_id))

    async def close(self) -> None:
        await self.puncher.close()
        await self.host.close()


class PunchLab:
    """A public bridge with a relay host, and places for peers behind routers."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.net: Segment = lab.public_bridge("203.0.113.0/24")
        self.relay_node = lab.host("relay", on=self.net)
        self.splicer = Splicer(socket_factory(self.relay_node), str(self.relay_node.address))
        self._lans = itertools.count(1)
        self.peers: list[Peer] = []

    def place(self, name: str, behind: Behind) -> tuple[Node, str, bool]:
        """A host ``behind`` a router of that kind (or public): the node, the IP
        peers see it at, whether it is public."""
        if behind == "public":
            node = self.lab.host(name, on=self.net)
            return node, str(node.address), True
        nat = "symmetric" if behind == "symmetric" else "eim"
        router = self.lab.router(
            f"r{name}",
            wan=self.net,
            lan=f"100.64.{next(self._lans)}.0/24",
            nat=nat,
            drop_unsolicited=behind != "eim_nodrop",
        )
        return self.lab.host(name, behind=router), str(router.address), False

    async def peer(
        self,
        node: Node,
        public_ip: str,
        public: bool,
        config: HolePunchConfig,
        punch: PunchSettings | None = None,
    ) -> Peer:
        """A PeerHost + HolePuncher in ``node``'s namespace, listening on a fresh port."""
        host = PeerHost(Identity.generate(), LIMITS, endpoints=NetnsEndpoints(node))
        port = await host.listen("0.0.0.0", 0)
        routes_of(host).route((Ping,), pong)
        verdict = Reachability.PUBLIC if public else Reachability.PRIVATE
        puncher = HolePuncher(
            host,
            listen_port=port,
            addresses=lambda: [(public_ip, port)],
            reachability=lambda: verdict,
            config=config,
            punch=punch,
            make_socket=socket_factory(node),
        )
        puncher.start()
        made = Peer(node, public_ip, host, puncher, port)
        self.peers.append(made)
        return made

    async def relay(self, dialer: Peer, other: Peer) -> tuple[PeerConnection, PeerConnection]:
        """A relayed connection (through the splicer) that ``dialer`` opened."""
        left, right = await self.splicer.circuit(
            socket_factory(dialer.node), socket_factory(other.node)
        )
        mine, theirs = await asyncio.gather(
            dialer.host.adopt(left, initiator=True, expected=other.node_id, via=Via.RELAYED),
            other.host.adopt(right, initiator=False, expected=None, via=Via.RELAYED),
        )
        return mine, theirs

    async def close(self) -> None:
        for made in self.peers:
            await made.close()
        self.peers.clear()
        await self.splicer.close()
