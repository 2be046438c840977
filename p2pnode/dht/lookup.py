"""Kademlia's iterative lookup, with a deadline and a query budget.

Unlike ``kademlia.crawling`` this keeps ``alpha`` queries in flight at all times,
never raises because of what a remote answered (a query returns ``None`` for no or
a malformed answer, which drops that node from the lookup), asks each address at
most once (a responder listing many made-up ids at its own address gets one query),
stops at a deadline or after ``max_queries`` with what it has, and cancels and
awaits its own queries when it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from kademlia.node import Node

Query = Callable[[Node], Awaitable[list[Node] | None]]


async def iterative_lookup(
    target: bytes,
    seeds: Iterable[Node],
    query: Query,
    *,
    self_id: bytes,
    k: int,
    alpha: int,
    timeout: float,
    max_queries: int,
    done: Callable[[], bool] | None = None,
) -> list[Node]:
    """Ask the nodes closest to ``target`` for closer ones until the ``k`` closest
    known have all answered (or failed), ``done()`` is true, the deadline passes or
    ``max_queries`` nodes were asked. Returns up to ``k`` nodes that answered,
    closest first. ``query(node)`` returns the nodes it listed, or None."""
    goal = int.from_bytes(target, "big")

    def distance(node: Node) -> int:
        return int(node.long_id) ^ goal

    known: dict[bytes, Node] = {}
    asked: set[bytes] = set()
    asked_addrs: set[tuple[str, int]] = set()  # one query per address, whatever id it claims
    failed: set[bytes] = set()
    answered: dict[bytes, Node] = {}

    def learn(nodes: Iterable[Node]) -> None:
        for node in nodes:
            if node.id != self_id and node.id not in known:
                known[node.id] = node

    learn(seeds)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    in_flight: dict[asyncio.Task[list[Node] | None], Node] = {}
    try:
        while done is None or not done():
            closest = sorted((n for n in known.values() if n.id not in failed), key=distance)
            for node in closest[:k]:
                if len(in_flight) >= alpha or len(asked) >= max_queries:
                    break
                if node.id in asked:
                    continue
                if (node.ip, node.port) in asked_addrs:
                    failed.add(node.id)  # a second id at an address already asked
                    continue
                asked.add(node.id)
                asked_addrs.add((node.ip, node.port))
                in_flight[loop.create_task(_run(query, node))] = node
            if not in_flight:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            finished, _ = await asyncio.wait(
                in_flight, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            for task in finished:
                node = in_flight.pop(task)
                listed = task.result()
                if listed is None:
                    failed.add(node.id)
                else:
                    answered[node.id] = node
                    learn(listed)
    finally:
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)
    return sorted(answered.values(), key=distance)[:k]


async def _run(query: Query, node: Node) -> list[Node] | None:
    return await query(node)
