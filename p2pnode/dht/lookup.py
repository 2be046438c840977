"""Kademlia's iterative lookup over disjoint paths, with a deadline and a query budget.

Unlike ``kademlia.crawling`` this keeps ``alpha`` queries in flight at all times,
never raises because of what a remote answered (a query returns ``None`` for no or
a malformed answer, which drops that node from the lookup), asks each address at
most once (a responder listing many made-up ids at its own address gets one query),
stops at a deadline or after ``max_queries`` with what it has, and cancels and
awaits its own queries when it ends. A query still unanswered after ``stall``
seconds stops counting against ``alpha`` (it may still answer), so dead or slow
contacts among the closest cannot hold a lookup for a whole RPC timeout.

Disjoint paths (S/Kademlia, Baumgart and Mies 2007, section 4.4): the starting
contacts are dealt round-robin into ``paths`` lookups. Each keeps its own shortlist
and parallelism; the nodes an answer lists go only into the shortlist of the path
that asked; a node is asked by one path at most (the first to pick it), so one
adversary, however many fake close nodes it names, steers one path only. The
lookup ends when every path has converged. With ``paths=1`` it is the plain
Kademlia lookup.

The bookkeeping (:class:`_Lookup`) is pure: no asyncio, time is an argument. The
shell (:func:`disjoint_lookup`) runs the queries as tasks.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kademlia.node import Node

from p2pnode.clock import Clock

V = TypeVar("V")


@dataclass(frozen=True)
class Found(Generic[V]):
    """A query's answer that carries a value (find_value), and any nodes it listed.
    The query should verify the value first and answer ``[]`` (or ``None``) for one
    that does not: a forged value must neither count nor end a path."""

    value: V
    nodes: Sequence[Node] = ()


@dataclass(frozen=True)
class FoundOn(Generic[V]):
    """A value found, by whom, on which path."""

    path: int
    node: Node
    value: V


@dataclass
class LookupResult(Generic[V]):
    """How a lookup ended: ``closest``, the ``k`` nodes closest to the target that
    answered (closest first, across all paths); ``found``, every value answered, in
    arrival order; ``queried``, the nodes each path asked, in order; ``queries``,
    how many queries were sent."""

    closest: list[Node]
    found: list[FoundOn[V]] = field(default_factory=list)
    queried: list[list[Node]] = field(default_factory=list)
    depth: dict[bytes, int] = field(default_factory=dict)

    @property
    def queries(self) -> int:
        return sum(len(asked) for asked in self.queried)

    def hops(self, node_id: bytes) -> int | None:
        """Through how many successive answers ``node_id`` was first learned (0: a
        starting contact; None: never learned)."""
        return self.depth.get(node_id)


Query = Callable[[Node], Awaitable[list[Node] | None]]
# A query that may also answer with a value (find_value).
ValueQuery = Callable[[Node], Awaitable["list[Node] | Found[V] | None"]]


Contact = tuple[bytes, str, int]  # (id, ip, port): a node as an answer listed it


def _contact(node: Node) -> Contact:
    return (node.id, node.ip, node.port)


class _Path:
    """One of the disjoint lookups: its shortlist, its queries and their fate."""

    def __init__(self, index: int, alpha: int) -> None:
        self.index = index
        self.alpha = alpha
        # By contact (id, ip, port), not by id: an answer may list a sought id at a
        # colluder's address; the real node at its own address must stay askable.
        self.known: dict[Contact, Node] = {}
        self.depth: dict[bytes, int] = {}  # hops from a starting contact, by id
        self.asked: list[Node] = []
        self.failed: set[Contact] = set()
        self.answered: dict[Contact, Node] = {}
        self.started: dict[int, float] = {}  # query in flight -> when it was sent
        self.stopped = False  # got a value, and the caller wants paths to end there

    def learn(self, nodes: Iterable[Node], self_id: bytes, depth: int) -> None:
        for node in nodes:
            contact = _contact(node)
            if node.id != self_id and contact not in self.known:
                self.known[contact] = node
                self.depth.setdefault(node.id, depth)

    def active(self, now: float, stall: float) -> int:
        """Queries in flight that have not stalled yet."""
        return sum(1 for started in self.started.values() if now - started < stall)


class _Lookup(Generic[V]):
    """The pure part of a lookup: which node each path asks next, and what the
    answers teach. Queries are named by an int the shell maps to its task."""

    def __init__(
        self,
        target: bytes,
        self_id: bytes,
        k: int,
        alpha: int,
        paths: int,
        path_alpha: int | None,
        stop_on_value: bool,
        path_k: int | None = None,
        group_of: Callable[[str], str | None] | None = None,
        group_cap: int = 0,
    ) -> None:
        self.goal = int.from_bytes(target, "big")
        # Diversity: at most group_cap of any group (subnet) count among the closest,
        # so Sybils of one subnet crowding the target cannot end a lookup on them.
        self.group_of = group_of if group_cap > 0 else None
        self.group_cap = group_cap
        self.self_id = self_id
        self.k = k
        self.path_k = max(1, path_k) if path_k is not None else k
        self.stop_on_value = stop_on_value
        per_path = path_alpha if path_alpha is not None else alpha
        self.paths = [_Path(i, max(1, per_path)) for i in range(max(1, paths))]
        self.claimed: dict[Contact, int] = {}  # contact -> the path that asked it
        self.asked_addrs: set[tuple[str, int]] = set()
        self.in_flight: dict[int, tuple[_Path, Node]] = {}
        self.found: list[FoundOn[V]] = []
        self._next_query = 0

    def distance(self, node: Node) -> int:
        return int(node.long_id) ^ self.goal

    def closest(self, nodes: Iterable[Node], k: int) -> list[Node]:
        """The ``k`` nodes closest to the target, at most ``group_cap`` per group."""
        group_of = self.group_of
        if group_of is None:
            return heapq.nsmallest(k, nodes, key=self.distance)
        taken: dict[str, int] = {}
        out: list[Node] = []
        for node in sorted(nodes, key=self.distance):
            group = group_of(node.ip)
            if group is not None:
                if taken.get(group, 0) >= self.group_cap:
                    continue
                taken[group] = taken.get(group, 0) + 1
            out.append(node)
            if len(out) >= k:
                break
        return out

    def deal(self, seeds: Iterable[Node]) -> None:
        """Deal the starting contacts round-robin into the paths, closest first, so
        each path starts from contacts as close as the others'."""
        distinct: dict[Contact, Node] = {}
        for node in seeds:
            if node.id != self.self_id:
                distinct.setdefault(_contact(node), node)
        ordered = sorted(distinct.values(), key=self.distance)
        for i, node in enumerate(ordered):
            self.paths[i % len(self.paths)].learn([node], self.self_id, 0)

    def stalled(self, path: _Path, now: float, stall: float) -> set[Contact]:
        """The contacts whose queries on ``path`` are in flight but stalled."""
        return {
            _contact(self.in_flight[query][1])
            for query, started in path.started.items()
            if now - started >= stall
        }

    def plan(self, max_queries: int, now: float, stall: float) -> list[tuple[int, Node]]:
        """The queries to send now: on each path not stopped, the closest ``k`` of
        its shortlist not yet asked, up to its ``alpha`` active queries and its
        share of ``max_queries``. Stalled
        nodes, and nodes another path asked, are left out of a path's ``k`` closest
        (as if they had failed), so the next closest take their place."""
        out: list[tuple[int, Node]] = []
        # Each path has its share of the budget: a path led into an endless chain of
        # made-up ids must not starve the others.
        budget = max(1, max_queries // len(self.paths))
        for path in self.paths:
            if not path.stopped:
                out.extend(self._plan_path(path, budget, now, stall))
        return out

    def _plan_path(
        self, path: _Path, budget: int, now: float, stall: float
    ) -> list[tuple[int, Node]]:
        out: list[tuple[int, Node]] = []
        stalled = self.stalled(path, now, stall)
        mine = path.index
        while True:
            live = (
                n
                for c, n in path.known.items()
                if c not in path.failed and c not in stalled and self.claimed.get(c, mine) == mine
            )
            skipped = False
            for node in self.closest(live, self.path_k):
                if path.active(now, stall) >= path.alpha or len(path.asked) >= budget:
                    return out
                contact = _contact(node)
                if contact in self.claimed:
                    continue  # asked already (by this path: others' are left out above)
                if (node.ip, node.port) in self.asked_addrs:
                    path.failed.add(contact)  # another id at an address already asked
                    skipped = True
                    continue
                self.claimed[contact] = mine
                self.asked_addrs.add((node.ip, node.port))
                path.asked.append(node)
                query = self._next_query
                self._next_query += 1
                self.in_flight[query] = (path, node)
                path.started[query] = now
                out.append((query, node))
            if not skipped:  # else the k closest changed: look again
                return out

    def settle(self, query: int, answer: list[Node] | Found[V] | None) -> None:
        path, node = self.in_flight.pop(query)
        path.started.pop(query, None)
        if answer is None:
            path.failed.add(_contact(node))
            return
        path.answered[_contact(node)] = node
        listed: Sequence[Node]
        if isinstance(answer, Found):
            self.found.append(FoundOn(path.index, node, answer.value))
            listed = answer.nodes
            if self.stop_on_value:
                path.stopped = True
        else:
            listed = answer
        path.learn(listed, self.self_id, path.depth.get(node.id, 0) + 1)

    def active(self, now: float, stall: float) -> int:
        """Active queries of the paths still running."""
        return sum(p.active(now, stall) for p in self.paths if not p.stopped)

    def answered(self) -> bool:
        return any(p.answered for p in self.paths)

    def next_stall(self, now: float, stall: float) -> float:
        """Seconds until the next active query of a running path stalls (inf if
        none)."""
        pending = [
            started + stall - now
            for p in self.paths
            if not p.stopped
            for started in p.started.values()
        ]
        return max(0.0, min((p for p in pending if p > 0), default=float("inf")))

    def result(self) -> LookupResult[V]:
        answered: dict[Contact, Node] = {}
        depth: dict[bytes, int] = {}
        for path in self.paths:
            answered.update(path.answered)
            for node_id, hops in path.depth.items():
                depth[node_id] = min(hops, depth.get(node_id, hops))
        closest = self.closest(answered.values(), self.k)
        return LookupResult(closest, list(self.found), [list(p.asked) for p in self.paths], depth)


async def disjoint_lookup(
    target: bytes,
    seeds: Iterable[Node],
    query: ValueQuery[V],
    *,
    self_id: bytes,
    k: int,
    alpha: int,
    timeout: float,
    max_queries: int,
    paths: int = 1,
    path_alpha: int | None = None,
    path_k: int | None = None,
    stop_on_value: bool = True,
    done: Callable[[], bool] | None = None,
    stall: float = float("inf"),
    clock: Clock | None = None,
    group_of: Callable[[str], str | None] | None = None,
    group_cap: int = 0,
) -> LookupResult[V]:
    """Ask the nodes closest to ``target`` for closer ones, on ``paths`` disjoint
    paths, until on every path the ``k`` closest known have all answered (or
    failed, or stalled, or were asked by another path), ``done()`` is true, the
    deadline passes or ``max_queries`` nodes were asked (all paths together; each
    path may ask its share).

    ``query(node)`` returns the nodes it listed, a :class:`Found` value, or None.
    A path that got a value stops there if ``stop_on_value`` (the others go on:
    the caller gets every value, to keep the best one that verifies). Each path
    keeps ``path_alpha`` queries active (default ``alpha``) and has converged once
    the ``path_k`` closest of its shortlist were asked (default ``k``: each path a
    whole Kademlia lookup, as S/Kademlia's are, at about ``paths`` times the RPCs;
    ceil(k / paths) asks about as many as one path, and finds the same k closest
    in bench_lookup_paths.py, but explores less: joining nodes then missed far
    ranges in test_dht_join_ranges). Time is ``clock``
    (default: the event loop's), which must run at the loop's pace. With
    ``group_of`` and ``group_cap``, at most ``group_cap`` nodes of one group (a
    subnet) count among any k closest, the result's too."""
    lookup: _Lookup[V] = _Lookup(
        target,
        self_id,
        k,
        alpha,
        paths,
        path_alpha,
        stop_on_value,
        path_k,
        group_of=group_of,
        group_cap=group_cap,
    )
    lookup.deal(seeds)
    now_of = clock.now if clock is not None else asyncio.get_running_loop().time
    deadline = now_of() + timeout
    loop = asyncio.get_running_loop()
    tasks: dict[asyncio.Task[list[Node] | Found[V] | None], int] = {}
    try:
        while done is None or not done():
            now = now_of()
            for name, node in lookup.plan(max_queries, now, stall):
                tasks[loop.create_task(_run(query, node))] = name
            remaining = deadline - now
            if not tasks or remaining <= 0:
                break
            if lookup.active(now, stall) == 0 and lookup.answered():
                # Only stalled queries (or those of stopped paths) left, and some
                # answered: the closest that answer have answered. (With no answer
                # at all, wait for the slow.)
                break
            wait = min(remaining, lookup.next_stall(now, stall))
            finished, _ = await asyncio.wait(
                tasks, timeout=wait, return_when=asyncio.FIRST_COMPLETED
            )
            for task in finished:
                lookup.settle(tasks.pop(task), task.result())
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    return lookup.result()


async def _run(query: ValueQuery[V], node: Node) -> list[Node] | Found[V] | None:
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
    paths: int = 1,
    path_k: int | None = None,
    done: Callable[[], bool] | None = None,
    stall: float = float("inf"),
    clock: Clock | None = None,
    group_of: Callable[[str], str | None] | None = None,
    group_cap: int = 0,
) -> list[Node]:
    """:func:`disjoint_lookup` for nodes only: up to ``k`` nodes that answered,
    closest first. ``query(node)`` returns the nodes it listed, or None."""
    result: LookupResult[None] = await disjoint_lookup(
        target,
        seeds,
        query,
        self_id=self_id,
        k=k,
        alpha=alpha,
        timeout=timeout,
        max_queries=max_queries,
        paths=paths,
        path_k=path_k,
        done=done,
        stall=stall,
        clock=clock,
        group_of=group_of,
        group_cap=group_cap,
    )
    return result.closest
