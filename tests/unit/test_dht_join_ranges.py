"""A node that joins knows someone in every range of distances farther than its
closest neighbour (Kademlia paper, 2.3), so lookups through it never end among
nodes that know nothing closer.

Real Discovery objects over the simulator's in-memory network and virtual clock:
no sockets, deterministic, a second or two.
"""

from __future__ import annotations

import asyncio
import random

from p2pnode.dht import DhtConfig, Discovery
from p2pnode.identity import Identity
from p2pnode.sim import vloop
from p2pnode.sim.vnet import LinkModel, VirtualNetwork

NODES = 300
PORT = 4001


def _bit(a: bytes, b: bytes) -> int:
    """The range of a's distance to b: 160 when they differ in the top bit."""
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_length()


async def _network() -> list[Discovery]:
    loop = asyncio.get_running_loop()
    net = VirtualNetwork(loop, LinkModel(latency=0.01), seed=5)
    clock = vloop.LoopClock(loop)
    rng = random.Random(5)
    config = DhtConfig(ksize=8, rpc_timeout=1.0, lookup_timeout=10.0)
    nodes: list[Discovery] = []
    for i in range(NODES):
        identity = Identity.from_seed(rng.randbytes(32))
        d = Discovery(identity, config, clock=clock, endpoints=net.host(i), rng=random.Random(i))
        await d.listen(net.host(i).ip, PORT)
        if nodes:
            await d.bootstrap([(net.host(0).ip, PORT)])
        nodes.append(d)
    return nodes


def test_a_joined_node_knows_every_far_range_that_has_nodes() -> None:
    async def main() -> list[tuple[int, int]]:
        nodes = await _network()
        ids = [d.node_id for d in nodes]
        missing: list[tuple[int, int]] = []
        for i, d in enumerate(nodes[1:], start=1):
            known = {_bit(c.node_id, d.node_id) for c in d.contacts()}
            closest = min(_bit(other, d.node_id) for other in ids if other != d.node_id)
            populated = {_bit(other, d.node_id) for other in ids if other != d.node_id}
            missing += [(i, r) for r in populated if r > closest and r not in known]
        for d in nodes:
            await d.close()
        return missing

    missing = vloop.run(main)
    assert not missing, f"{len(missing)} (node, range) pairs without a contact: {missing[:10]}"
