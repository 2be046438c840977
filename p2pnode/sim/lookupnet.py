"""A Kademlia network in memory for the lookup engine (:mod:`p2pnode.dht.lookup`):
no sockets and no DHT cores, each node's answer computed from its routing table.
Used by the disjoint-path lookup tests and ``benchmarks/bench_lookup_paths.py``.

- ``n`` nodes with random ids; each table holds up to ``bucket`` random nodes of
  each XOR-distance range (built with full knowledge, as after a long uptime).
- Honest nodes answer with the ``k`` closest of their table; dead ones never
  answer. Adversaries are a fraction of the ids, spread uniformly: with ``sybil``
  they answer with ``k`` made-up ids closer to the target than any honest node
  (which answer in turn with more of them), otherwise they collude and answer
  with the ``k`` adversaries closest to the target, never an honest node.
- With ``rtt_range`` every node (made-up ones too) gets a round trip drawn once,
  in ``rtt``, for a caller that waits before answering.

Everything is drawn from one generator seeded by ``seed``, in a fixed order, so a
seed gives the same network (and the tests' recorded query orders) every time.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from kademlia.node import Node


class SimNetwork:
    def __init__(
        self,
        n: int,
        *,
        seed: int,
        bucket: int,
        adversarial: float = 0.0,
        dead: float = 0.0,
        sybil: bool = True,
        rtt_range: tuple[float, float] | None = None,
    ) -> None:
        rng = random.Random(seed)
        self.rng = rng  # callers draw their targets from it, after the network
        self.ids = list(dict.fromkeys(rng.getrandbits(160) for _ in range(n)))
        self.nodes = {
            i: Node(i.to_bytes(20, "big"), f"10.{j >> 16 & 255}.{j >> 8 & 255}.{j & 255}", 4000)
            for j, i in enumerate(self.ids)
        }
        self.rtt_range = rtt_range
        self.rtt = {i: rng.uniform(*rtt_range) for i in self.ids} if rtt_range else {}
        shuffled = rng.sample(self.ids, len(self.ids))
        cut = int(len(self.ids) * adversarial)
        self.adversaries = set(shuffled[:cut])
        self.dead = set(shuffled[cut : cut + int(len(self.ids) * dead)])
        self.tables: dict[int, list[int]] = {}
        for i in self.ids:
            ranges: dict[int, list[int]] = {}
            for j in self.ids:
                if j != i:
                    ranges.setdefault((i ^ j).bit_length(), []).append(j)
            self.tables[i] = [
                j
                for r in sorted(ranges)
                for j in rng.sample(ranges[r], min(bucket, len(ranges[r])))
            ]
        self.honest = [i for i in self.ids if i not in self.adversaries and i not in self.dead]
        self.sybil = sybil
        self.sybils: set[int] = set()
        self._colluding: tuple[int, list[int]] = (-1, [])

    @staticmethod
    def closest(pool: Iterable[int], target: int, count: int) -> list[int]:
        return sorted(pool, key=lambda j: j ^ target)[:count]

    def sybils_near(self, asked: int, target: int, k: int) -> list[int]:
        """``k`` made-up ids closer to ``target`` than any honest node (in a network
        of thousands, an id within 2^-20 of the key; ids bound to keys only make
        them cost a key search each), at their own addresses."""
        rng = random.Random(asked ^ target)
        out = []
        for _ in range(k):
            i = target ^ rng.getrandbits(140)
            if i not in self.nodes:
                n = len(self.nodes)
                addr = f"11.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
                self.nodes[i] = Node(i.to_bytes(20, "big"), addr, 4000)
                if self.rtt_range:
                    self.rtt[i] = rng.uniform(*self.rtt_range)
                self.sybils.add(i)
            out.append(i)
        return out

    def answer(self, asked: int, target: int, k: int) -> list[Node] | None:
        """What ``asked`` answers to find_node(``target``), at once; None: dead."""
        if asked in self.dead:
            return None
        if asked in self.sybils or (self.sybil and asked in self.adversaries):
            return [self.nodes[j] for j in self.sybils_near(asked, target, k)]
        if asked in self.adversaries:  # the same list from every adversary
            if self._colluding[0] != target:
                self._colluding = (target, self.closest(self.adversaries, target, k))
            return [self.nodes[j] for j in self._colluding[1]]
        return [self.nodes[j] for j in self.closest(self.tables[asked], target, k)]

    def seeds(self, me: int, target: int, count: int) -> list[Node]:
        """Where ``me`` starts a lookup: the ``count`` closest of its table."""
        return [self.nodes[j] for j in self.closest(self.tables[me], target, count)]
