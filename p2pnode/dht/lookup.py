"""Kademlia's iterative lookup, with a deadline and a query budget.

Unlike ``kademlia.crawling`` this keeps ``alpha`` queries in flight at all times,
never raises because of what a remote answered (a query returns ``None`` for no or
a malformed answer, which drops that node from the lookup), asks each address at
most once (a responder listing many made-up ids at its own address gets one query),
stops at a deadline or after ``max_queries`` with what it has, and cancels and
awaits its own queries when it ends. A query still unanswered after ``stall``
seconds stops counting against ``alpha`` (it may still answer), so dead or slow
contacts among the closest cannot hold a lookup for a whole RPC timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from kademlia.node import Node

from p2pnode.clock import Clock

Query = Callable[[Node], Awaitable[list[Node] | None]]


class _Lookup:
    def __init__(self, target: bytes, query: Query, self_id: bytes, k: int, alpha: int) -> None:
        self.goal = int.from_bytes(target, "big")
        self.query = query
        self.self_id = self_id
        self.k = k
        self.alpha = alpha
        self.known: dict[bytes, Node] = {}
        self.asked: set[bytes] = set()
        self.asked_addrs: set[tuple[str, int]] = set()
        self.failed: set[bytes] = set()
        self.answered: dict[bytes, Node] = {}
        self.in_flight: dict[asyncio.Task[list[Node] | None], Node] = {}
        self.started: dict[asyncio.Task[list[Node] | None], float] = {}

    def distance(self, node: Node) -> int:
        return int(node.long_id) ^ self.goal

    def learn(self, nodes: Iterable[Node]) -> None:
        for node in nodes:
            if node.id != self.self_id and node.id not in self.known:
                self.known[node.id] = node

    def active(self, now: float, stall: float) -> int:
        """Queries in flight that have not stalled yet."""
        return sum(1 for started in self.started.values() if now - started < stall)

    def stalled(self, now: float, stall: float) -> set[bytes]:
        """Ids of the nodes whose queries are in flight but stalled."""
        return {
            self.in_flight[task].id
            for task, started in self.started.items()
            if now - started >= stall
        }

    def fill(self, max_queries: int, now: float, stall: float) -> None:
        """Query the closest ``k`` not yet asked, up to ``alpha`` active queries.
        Stalled nodes are left out of the ``k`` closest (as if they had failed), so
        the next closest take their place."""
        stalled = self.stalled(now, stall)
        while True:
            live = (
                n for n in self.known.values() if n.id not in self.failed and n.id not in stalled
            )
            skipped = False
            for node in sorted(live, key=self.distance)[: self.k]:
                if self.active(now, stall) >= self.alpha or len(self.asked) >= max_queries:
                    return
                if node.id in self.asked:
                    continue
                if (node.ip, node.port) in self.asked_addrs:
                    self.failed.add(node.id)  # another id at an address already asked
                    skipped = True
                    continue
                self.asked.add(node.id)
                self.asked_addrs.add((node.ip, node.port))
                task = asyncio.get_running_loop().create_task(_run(self.query, node))
                self.in_flight[task] = node
                self.started[task] = now
            if not skipped:  # else the k closest changed: look again
                return

    def settle(self, task: asyncio.Task[list[Node] | None]) -> None:
        node = self.in_flight.pop(task)
        self.started.pop(task, None)
        listed = task.result()
        if listed is None:
            self.failed.add(node.id)
        else:
            self.answered[node.id] = node
            self.learn(listed)

    def result(self) -> list[Node]:
        return sorted(self.answered.values(), key=self.distance)[: self.k]

    async def cancel(self) -> None:
        for task in self.in_flight:
            task.cancel()
        if self.in_flight:
            await asyncio.gather(*self.in_flight, return_exceptions=True)
        self.in_flight.clear()
        self.started.clear()

    def next_stall(self, now: float, stall: float) -> float:
        """Seconds until the next active query stalls (inf if none is active)."""
        pending = [started + stall - now for started in self.started.values()]
        return max(0.0, min((p for p in pending if p > 0), default=float("inf")))


async def _run(query: Query, node: Node) -> list[Node] | None:
    return await query(node)


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
    stall: float = float("inf"),
    clock: Clock | None = None,
) -> list[Node]:
    """Ask the nodes closest to ``target`` for closer ones until the ``k`` closest
    known have all answered (or failed, or stalled), ``done()`` is true, the
    deadline passes or ``max_queries`` nodes were asked. Returns up to ``k`` nodes that answered,
    closest first. ``query(node)`` returns the nodes it listed, or None. Time is
    ``clock`` (default: the event loop's), which must run at the loop's pace."""
    lookup = _Lookup(target, query, self_id, k, alpha)
    lookup.learn(seeds)
    now_of = clock.now if clock is not None else asyncio.get_running_loop().time
    deadline = now_of() + timeout
    try:
        while done is None or not done():
            now = now_of()
            lookup.fill(max_queries, now, stall)
            remaining = deadline - now
            if not lookup.in_flight or remaining <= 0:
                break
            if lookup.active(now, stall) == 0 and lookup.answered:
                # Only stalled queries left, and some answered: the closest that
                # answer have answered. (With no answer at all, wait for the slow.)
                break
            wait = min(remaining, lookup.next_stall(now, stall))
            finished, _ = await asyncio.wait(
                lookup.in_flight, timeout=wait, return_when=asyncio.FIRST_COMPLETED
            )
            for task in finished:
                lookup.settle(task)
    finally:
        await lookup.cancel()
    return lookup.result()
