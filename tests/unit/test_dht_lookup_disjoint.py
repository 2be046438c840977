"""Lookups over disjoint paths (S/Kademlia 4.4), against a simulated network in
memory: no sockets, each node's answer computed from its routing table.

- one path asks exactly the nodes, in exactly the order, the lookup asked before
  paths existed (recorded from that engine on a fixed seed);
- with several paths no node is asked twice, the paths' sets are disjoint, and a
  path only asks nodes it was dealt or that an answer to that path named;
- value answers are collected from every path; a path that got one stops there
  unless told to go on;
- against adversaries that name made-up ids next to the key, three paths reach
  the honest node closest to the key more often than one (the figures for more
  paths and fractions: benchmarks/bench_lookup_paths.py).
"""

from __future__ import annotations

import asyncio
import random

from kademlia.node import Node

from p2pnode.dht.lookup import Found, disjoint_lookup, iterative_lookup
from p2pnode.sim import vloop
from p2pnode.sim.lookupnet import SimNetwork

GOLDEN_ASKED = [
    373,
    274,
    104,
    187,
    300,
    321,
    398,
    236,
    12,
    10,
    98,
    64,
    158,
    128,
    373,
    104,
    274,
    106,
    30,
    142,
    52,
    389,
    180,
    172,
    227,
    165,
    223,
    373,
    274,
    54,
    73,
    34,
    224,
    292,
    145,
    61,
    45,
    333,
    315,
    23,
    53,
    276,
    78,
    118,
    190,
    329,
    177,
    179,
    141,
    88,
    304,
    86,
    95,
    345,
    205,
    365,
    356,
    340,
    278,
    104,
    274,
    373,
    394,
    147,
    186,
    154,
    31,
    102,
    341,
    313,
    217,
    223,
    373,
    104,
    56,
    70,
    21,
    199,
    18,
    284,
    311,
    103,
    41,
    352,
    223,
    274,
    104,
    334,
    395,
    226,
    99,
    248,
    322,
    90,
    27,
    323,
    33,
    42,
    131,
    140,
    43,
    82,
    264,
    46,
    335,
    2,
    36,
    333,
    45,
    344,
    174,
    218,
    289,
    331,
    122,
    271,
    379,
    234,
    63,
    15,
    274,
    104,
    373,
    375,
    287,
    136,
    225,
    101,
    55,
    249,
    385,
    16,
    344,
    315,
    333,
    164,
    234,
    383,
    201,
    209,
    228,
    24,
    281,
    381,
]
GOLDEN_CLOSEST = [
    [398, 236, 12, 10, 98, 64, 158, 128],
    [52, 389, 106, 180, 172, 227, 165, 30],
    [54, 73, 34, 223, 224, 292, 145, 61],
    [78, 23, 53, 118, 190, 329, 276, 177],
    [304, 345, 86, 95, 205, 365, 340, 278],
    [154, 31, 102, 341, 394, 313, 147, 217],
    [199, 18, 284, 56, 70, 103, 41, 352],
    [248, 334, 27, 323, 33, 42, 395, 226],
    [140, 264, 46, 335, 43, 2, 82, 36],
    [331, 122, 271, 379, 234, 174, 63, 15],
    [375, 225, 101, 55, 249, 385, 274, 16],
    [383, 201, 209, 164, 228, 24, 281, 381],
]


async def _trace_one_path(paths: int | None) -> tuple[list[int], list[list[int]]]:
    """Twelve lookups on a fixed network (10% dead), answers arriving after a
    seeded number of loop turns: which nodes were asked, in order, and the results."""
    net = SimNetwork(400, seed=1, bucket=4, dead=0.1)
    pos = {v: i for i, v in enumerate(net.ids)}
    delays = random.Random(2)
    me = net.honest[0]
    asked: list[int] = []
    results: list[list[int]] = []
    for _ in range(12):
        target = net.rng.getrandbits(160)

        async def query(node: Node, target: int = target) -> list[Node] | None:
            asked.append(pos[node.long_id])
            for _ in range(delays.randrange(4)):
                await asyncio.sleep(0)
            return net.answer(node.long_id, target, 8)

        extra = {} if paths is None else {"paths": paths}
        found = await iterative_lookup(
            target.to_bytes(20, "big"), net.seeds(me, target, 24), query,
            self_id=net.nodes[me].id, k=8, alpha=3, timeout=30.0, max_queries=200, **extra,
        )  # fmt: skip
        results.append([pos[n.long_id] for n in found])
    return asked, results


async def test_one_path_asks_what_the_single_lookup_asked_in_the_same_order() -> None:
    for paths in (None, 1):
        asked, results = await _trace_one_path(paths)
        assert asked == GOLDEN_ASKED
        assert results == GOLDEN_CLOSEST


async def test_paths_are_disjoint_and_fed_only_by_their_own_answers() -> None:
    net = SimNetwork(300, seed=4, bucket=8, dead=0.1)
    rng = random.Random(5)
    for _ in range(10):
        me, target = rng.choice(net.honest), rng.getrandbits(160)
        listed: dict[bytes, list[bytes]] = {}

        async def query(
            node: Node, target: int = target, listed: dict[bytes, list[bytes]] = listed
        ) -> list[Node] | None:
            await asyncio.sleep(rng.random() / 100)
            answer = net.answer(node.long_id, target, 8)
            listed[node.id] = [n.id for n in answer or ()]
            return answer

        seeds = net.seeds(me, target, 24)
        result = await disjoint_lookup(
            target.to_bytes(20, "big"), seeds, query,
            self_id=net.nodes[me].id, k=8, alpha=3, timeout=30.0, max_queries=200, paths=3,
        )  # fmt: skip
        everyone = [n.id for asked in result.queried for n in asked]
        assert len(everyone) == len(set(everyone)) == result.queries
        assert len({(n.ip, n.port) for asked in result.queried for n in asked}) == len(everyone)
        dealt = sorted(seeds, key=lambda n: n.long_id ^ target)
        for p, asked in enumerate(result.queried):
            assert asked, "every path asks someone"
            mine = {n.id for n in dealt[p::3]}
            for node in asked:  # each was dealt to this path or named to it earlier
                assert node.id in mine, f"path {p} asked a node it never learned"
                mine.update(listed.get(node.id, ()))
        closest = sorted(
            (n for asked in result.queried for n in asked if n.long_id not in net.dead),
            key=lambda n: n.long_id ^ target,
        )[:8]
        assert result.closest == closest  # the k closest that answered, across paths


async def test_starting_contacts_are_dealt_round_robin_closest_first() -> None:
    target = bytes(20)
    seeds = [Node(i.to_bytes(20, "big"), "10.0.0.1", 1000 + i) for i in range(12, 0, -1)]

    async def silent(node: Node) -> list[Node] | None:
        return []

    result = await disjoint_lookup(
        target, seeds, silent, self_id=b"\xff" * 20, k=20, alpha=3, timeout=5.0,
        max_queries=100, paths=4,
    )  # fmt: skip
    assert [[n.long_id for n in asked] for asked in result.queried] == [
        [1, 5, 9], [2, 6, 10], [3, 7, 11], [4, 8, 12],
    ]  # fmt: skip


async def test_every_path_reports_its_values_and_stops_at_the_first() -> None:
    """The 12 nodes closest to the key answer with a value (a sequence number): the
    caller gets values from every path, and all of them if paths go on."""
    net = SimNetwork(300, seed=6, bucket=8)
    target = net.rng.getrandbits(160)
    holders = net.closest(net.honest, target, 12)
    seq = {h: 10 + i for i, h in enumerate(holders)}
    me = next(i for i in net.honest if i not in seq)

    async def run(stop_on_value: bool, events: list[tuple[str, Node]]):  # type: ignore[no-untyped-def]
        async def query(node: Node) -> list[Node] | Found[int] | None:
            events.append(("ask", node))
            await asyncio.sleep(random.Random(node.long_id).random() / 100)
            if node.long_id in seq:
                events.append(("value", node))
                return Found(seq[node.long_id])
            return net.answer(node.long_id, target, 8)

        return await disjoint_lookup(
            target.to_bytes(20, "big"), net.seeds(me, target, 24), query,
            self_id=net.nodes[me].id, k=8, alpha=3, timeout=30.0, max_queries=200, paths=3,
            stop_on_value=stop_on_value,
        )  # fmt: skip

    events: list[tuple[str, Node]] = []
    stopping = await run(True, events)
    assert {f.path for f in stopping.found} == {0, 1, 2}, "each path got a value of its own"
    for f in stopping.found:
        assert f.node in stopping.queried[f.path]
        assert f.value == seq[f.node.long_id]
    for asked in stopping.queried:  # a path asks no one once its first value came
        first_value = min(events.index(("value", n)) for n in asked if ("value", n) in events)
        assert not [n for what, n in events[first_value:] if what == "ask" and n in asked]
    assert len(stopping.found) < len(holders)

    going_on = await run(False, [])
    assert {f.node.long_id for f in going_on.found} == set(holders)
    assert max(f.value for f in going_on.found) == max(seq.values())  # the caller's pick


async def test_a_value_that_does_not_verify_neither_counts_nor_ends_a_path() -> None:
    """The query verifies: a forger's answer is None, its path goes on to the
    honest holder."""
    net = SimNetwork(200, seed=8, bucket=8)
    target = net.rng.getrandbits(160)
    honest_holder, *_ = net.closest(net.honest, target, 1)
    forgers = set(net.closest(net.honest, target, 6)[1:])
    me = next(i for i in net.honest if i != honest_holder and i not in forgers)

    async def query(node: Node) -> list[Node] | Found[str] | None:
        if node.long_id in forgers:
            return None  # its record's signature did not verify
        if node.long_id == honest_holder:
            return Found("signed")
        return net.answer(node.long_id, target, 8)

    result = await disjoint_lookup(
        target.to_bytes(20, "big"), net.seeds(me, target, 24), query,
        self_id=net.nodes[me].id, k=8, alpha=3, timeout=30.0, max_queries=200, paths=1,
    )  # fmt: skip
    assert [f.value for f in result.found] == ["signed"]


def _success(net: SimNetwork, paths: int, lookups: int) -> float:
    """Share of lookups (from random honest nodes toward random keys) that reach
    the honest node closest to the key, each node answering after its own delay."""
    rtt = {i: random.Random(i).uniform(0.02, 0.2) for i in net.ids}

    async def main() -> float:
        rng = random.Random(9)  # the same starts and keys for every number of paths
        reached = 0
        for _ in range(lookups):
            target = rng.getrandbits(160)
            goal = min(net.honest, key=lambda j: j ^ target)
            me = rng.choice([i for i in net.honest if i != goal])

            async def query(node: Node, target: int = target) -> list[Node] | None:
                await asyncio.sleep(rtt.get(node.long_id, 0.05))
                return net.answer(node.long_id, target, 20)

            result = await disjoint_lookup(
                target.to_bytes(20, "big"), net.seeds(me, target, 60), query,
                self_id=net.nodes[me].id, k=20, alpha=3, timeout=30.0, max_queries=100,
                paths=paths, stall=0.44,
            )  # fmt: skip
            reached += any(n.long_id == goal for asked in result.queried for n in asked)
        return reached / lookups

    result: float = vloop.run(main)
    return result


def test_disjoint_paths_get_past_adversaries_a_single_path_does_not() -> None:
    """20% of the nodes name made-up ids next to the key (Sybils that answer with
    more of them): one path is led astray far more often than three."""
    net = SimNetwork(300, seed=11, bucket=20, adversarial=0.2)
    one, three = _success(net, 1, 40), _success(net, 3, 40)  # 0.75 and 0.975
    assert three > one
    assert three >= 0.9
    assert one < 0.9  # the attack does bite a single path
