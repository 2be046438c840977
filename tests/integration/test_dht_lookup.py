"""The iterative lookup driven by in-memory query functions (no sockets)."""

from __future__ import annotations

import asyncio
import random

from kademlia.node import Node

from p2pnode.dht.lookup import iterative_lookup

SELF = b"\xff" * 20
TARGET = b"\x00" * 20


def node(i: int, port: int | None = None) -> Node:
    return Node(i.to_bytes(20, "big"), "10.0.0.1", port if port is not None else 1000 + i)


class Network:
    """Nodes 1..n; each lists the ``per`` nodes closest to the target it knows."""

    def __init__(self, n: int, per: int = 4) -> None:
        self.nodes = {i: node(i) for i in range(1, n + 1)}
        self.per = per
        self.asked: list[int] = []
        rng = random.Random(n)
        self.knows = {i: rng.sample(sorted(self.nodes), min(n, 6)) for i in self.nodes}

    async def query(self, asked: Node) -> list[Node] | None:
        i = int.from_bytes(asked.id, "big")
        self.asked.append(i)
        await asyncio.sleep(0)
        return [self.nodes[j] for j in sorted(self.knows[i])[: self.per]]


async def run(query, seeds, **kw):  # type: ignore[no-untyped-def]
    args = {"self_id": SELF, "k": 4, "alpha": 3, "timeout": 5.0, "max_queries": 100}
    args.update(kw)
    return await iterative_lookup(TARGET, seeds, query, **args)


async def test_finds_the_closest() -> None:
    net = Network(40)
    net.knows = {i: list(range(max(1, i - 10), i)) for i in net.nodes}  # each knows closer ones
    found = await run(net.query, [net.nodes[40]])
    assert [int.from_bytes(n.id, "big") for n in found] == [1, 2, 3, 4]
    assert len(net.asked) == len(set(net.asked))


async def test_failures_are_dropped_and_never_raise() -> None:
    async def query(asked: Node) -> list[Node] | None:
        i = int.from_bytes(asked.id, "big")
        return None if i % 2 else [node(j) for j in range(1, 9)]

    found = await run(query, [node(8)])
    assert all(int.from_bytes(n.id, "big") % 2 == 0 for n in found)
    assert len(found) == 4


async def test_one_query_per_address() -> None:
    calls: list[bytes] = []

    async def query(asked: Node) -> list[Node] | None:
        calls.append(asked.id)
        # a liar at port 7 listing ever closer made-up ids at its own address
        return [Node(random.randbytes(2).rjust(20, b"\x00"), "10.0.0.1", 7) for _ in range(20)]

    found = await run(query, [node(1 << 100, port=7)])
    assert len(calls) == 1
    assert len(found) == 1


async def test_budget_and_deadline() -> None:
    counter = iter(range(1, 10**6))

    async def endless(asked: Node) -> list[Node] | None:
        return [node(next(counter)) for _ in range(10)]

    calls = 0

    async def counting(asked: Node) -> list[Node] | None:
        nonlocal calls
        calls += 1
        return await endless(asked)

    await run(counting, [node(10**5)], k=50, max_queries=30)
    assert calls == 30

    started = asyncio.Event()
    cancelled = 0

    async def hangs(asked: Node) -> list[Node] | None:
        nonlocal cancelled
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return None

    loop = asyncio.get_running_loop()
    begin = loop.time()
    assert await run(hangs, [node(1), node(2), node(3)], timeout=0.2) == []
    assert loop.time() - begin < 2
    assert cancelled == 3  # its own queries are cancelled and awaited


async def test_done_stops_early() -> None:
    net = Network(30)
    await run(net.query, [net.nodes[30]], done=lambda: len(net.asked) >= 2)
    assert 2 <= len(net.asked) <= 4


async def test_stalled_queries_stop_holding_alpha_slots() -> None:
    """Dead contacts closest to the target must not hold the lookup for their timeout."""
    import asyncio as _asyncio

    from kademlia.node import Node as _Node

    from p2pnode.dht.lookup import iterative_lookup

    target = bytes(20)
    dead = [_Node(bytes([0] * 19 + [i]), "127.0.0.1", 1000 + i) for i in range(1, 4)]
    live = _Node(bytes([0] * 18 + [1, 0]), "127.0.0.1", 2000)
    goal = _Node(target, "127.0.0.1", 3000)
    rpc_timeout = 2.0
    reached: list[_Node] = []

    async def query(node: _Node) -> list[_Node] | None:
        if node in dead:
            await _asyncio.sleep(rpc_timeout)  # stands for an RPC that times out
            return None
        if node.id == goal.id:
            reached.append(node)
        return [goal] if node is live else []

    loop = _asyncio.get_running_loop()
    started = loop.time()
    await iterative_lookup(
        target,
        [*dead, live],
        query,
        self_id=b"\xff" * 20,
        k=8,
        alpha=3,
        timeout=30.0,
        max_queries=50,
        done=lambda: bool(reached),
        stall=0.05,
    )
    assert reached == [goal]
    assert loop.time() - started < rpc_timeout / 2


async def test_a_closest_lookup_ends_without_waiting_out_dead_nodes() -> None:
    """With no done(), a lookup for the k closest treats stalled nodes as gone: the
    next closest are asked instead, and it ends once only stalled queries remain."""
    import asyncio as _asyncio

    from kademlia.node import Node as _Node

    from p2pnode.dht.lookup import iterative_lookup

    target = bytes(20)
    dead = [_Node(bytes([0] * 19 + [i]), "127.0.0.1", 1000 + i) for i in range(1, 4)]
    live = [_Node(bytes([0] * 18 + [1, i]), "127.0.0.1", 2000 + i) for i in range(4)]
    rpc_timeout = 3.0

    async def query(node: _Node) -> list[_Node] | None:
        if node in dead:
            await _asyncio.sleep(rpc_timeout)  # stands for an RPC that times out
            return None
        return list(live)

    loop = _asyncio.get_running_loop()
    started = loop.time()
    result = await iterative_lookup(
        target, [*dead, *live], query, self_id=b"\xff" * 20, k=4, alpha=3,
        timeout=30.0, max_queries=50, stall=0.05,
    )  # fmt: skip
    assert result == sorted(live, key=lambda n: n.long_id)
    assert loop.time() - started < rpc_timeout / 3
