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
BehindV6 = Literal["firewall", "public"]

# IPv6 (no NAT: a stateful firewall at most): the public segment, a /64 per LAN
V6_PUBLIC = "2001:db8::"
V6_RELAY = "2001:db8::100"

LIMITS = NetLimits(handshake_timeout=5.0)


V6_FIREWALL = """
table ip6 lab6 {
    chain forward {
        type filter hook forward priority filter; policy accept;
        iifname "wan" ct state new drop
    }
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state new drop
    }
}
"""


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
        self.splicer_v6: Splicer | None = None
        self._v6_ids = itertools.count(1)
        self._v6_routes: list[tuple[str, str]] = []  # (LAN prefix, via router's WAN)
        self._v6_public: list[Node] = []  # nodes on the public segment with IPv6

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

    def place_v6(self, name: str, behind: BehindV6) -> tuple[Node, str, bool]:
        """Like :meth:`place`, over IPv6 only: a host on the public segment, or
        behind a router that routes its LAN's /64 and drops unsolicited inbound
        (the IPv6 home router: a firewall, no NAT)."""
        if self.splicer_v6 is None:
            self._v6_join(self.relay_node, V6_RELAY)
            self.splicer_v6 = Splicer(socket_factory(self.relay_node), V6_RELAY)
        k = next(self._v6_ids)
        if behind == "public":
            node = self.lab.host(name, on=self.net)
            address = f"{V6_PUBLIC}{k}"
            self._v6_join(node, address)
            return node, address, True
        router = self.lab.router(
            f"r{name}", wan=self.net, lan=f"100.64.{next(self._lans)}.0/24", nat="firewall"
        )
        wan = f"{V6_PUBLIC}{k}"
        prefix = f"2001:db8:0:{k}::"
        self._v6_join(router, wan)
        self._v6_addr(router, "lan", f"{prefix}1")
        self.lab.run(router, ["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])
        self.lab.nft(router, V6_FIREWALL)
        for node in self._v6_public:
            if node is not router:
                self.lab.run(node, ["ip", "-6", "route", "add", f"{prefix}/64", "via", wan])
        self._v6_routes.append((f"{prefix}/64", wan))
        host = self.lab.host(name, behind=router)
        self._v6_addr(host, "eth0", f"{prefix}2")
        self.lab.run(host, ["ip", "-6", "route", "add", "default", "via", f"{prefix}1"])
        return host, f"{prefix}2", False

    def _v6_join(self, node: Node, address: str) -> None:
        """``node`` (on the public segment) gets ``address`` and routes to every LAN."""
        ifname = "wan" if node.lan is not None else "eth0"
        self._v6_addr(node, ifname, address)
        for prefix, via in self._v6_routes:
            self.lab.run(node, ["ip", "-6", "route", "add", prefix, "via", via])
        self._v6_public.append(node)

    def _v6_addr(self, node: Node, ifname: str, address: str) -> None:
        """``address`` on ``ifname``, usable at once: nodad, and the link-local
        address replaced by one without duplicate address detection too (while
        it is tentative, the first packets wait ~2 s for neighbour discovery)."""
        run = self.lab.run
        run(node, ["ip", "-6", "addr", "add", f"{address}/64", "dev", ifname, "nodad"])
        run(node, ["ip", "-6", "addr", "flush", "dev", ifname, "scope", "link"])
        local = f"fe80::{next(self._v6_ids) + 0x100:x}/64"
        run(node, ["ip", "-6", "addr", "add", local, "dev", ifname, "nodad"])

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
        v6 = ":" in public_ip
        port = await host.listen("::" if v6 else "0.0.0.0", 0)
        routes_of(host).route((Ping,), pong)
        verdict = Reachability.PUBLIC if public else Reachability.PRIVATE
        puncher = HolePuncher(
            host,
            listen_port=port,
            addresses=lambda: [(public_ip, port)],
            reachability=lambda: verdict,
            config=config,
            punch=punch,
            bind_host="::" if v6 else "0.0.0.0",
            make_socket=socket_factory(node),
        )
        puncher.start()
        made = Peer(node, public_ip, host, puncher, port)
        self.peers.append(made)
        return made

    async def relay(self, dialer: Peer, other: Peer) -> tuple[PeerConnection, PeerConnection]:
        """A relayed connection (through the splicer) that ``dialer`` opened."""
        splicer = self.splicer_v6 if ":" in dialer.public_ip else self.splicer
        assert splicer is not None
        left, right = await splicer.circuit(socket_factory(dialer.node), socket_factory(other.node))
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
        if self.splicer_v6 is not None:
            await self.splicer_v6.close()
