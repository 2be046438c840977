"""Who holds how much of a store, by sender address and subnet, so that a full store
evicts from the heaviest user instead of refusing newcomers. Pure: no I/O, no time.

A sender is a source IP. Its subnet is its IPv4 /24 or IPv6 /64 (an IPv4-mapped
IPv6 address counts as IPv4): one host, or one customer of a provider, rarely holds
more than that, so quotas per subnet bound what one cheap attacker can take.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from p2pnode.subnets import subnet_of

K = TypeVar("K", bound=Hashable)


class _Heaviest:
    """Weights by name with the heaviest found in O(log n): a max-heap whose stale
    entries (the weight changed since) are skipped lazily and purged when they
    outnumber the live ones."""

    def __init__(self) -> None:
        self.weight: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def set(self, name: str, weight: int) -> None:
        if weight <= 0:
            self.weight.pop(name, None)
        else:
            self.weight[name] = weight
            heapq.heappush(self._heap, (-weight, name))
        if len(self._heap) > 2 * len(self.weight) + 64:
            self._heap = [(-w, n) for n, w in self.weight.items()]
            heapq.heapify(self._heap)

    def top(self) -> str | None:
        heap = self._heap
        while heap:
            weight, name = heap[0]
            if self.weight.get(name) == -weight:
                return name
            heapq.heappop(heap)
        return None

    def __bool__(self) -> bool:
        return bool(self.weight)


class Ledger(Generic[K]):
    """Entries (any hashable) of each sender, oldest first, with their weights (bytes),
    and totals per sender and per subnet; the heaviest subnet, and the heaviest
    sender in a subnet, in O(log n)."""

    def __init__(self) -> None:
        self._entries: dict[str, OrderedDict[K, int]] = {}
        self._subnet: dict[str, str] = {}  # sender -> subnet
        self._senders: dict[str, _Heaviest] = {}  # subnet -> its senders' weights
        self._subnets = _Heaviest()
        self._subnet_count: Counter[str] = Counter()

    def add(self, sender: str, entry: K, weight: int) -> None:
        entries = self._entries.get(sender)
        if entries is None:
            entries = self._entries[sender] = OrderedDict()
            self._subnet[sender] = subnet_of(sender)
        subnet = self._subnet[sender]
        old = entries.pop(entry, 0)
        entries[entry] = weight
        self._shift(sender, subnet, weight - old, 0 if old else 1)

    def remove(self, sender: str, entry: K) -> None:
        entries = self._entries.get(sender)
        if entries is None or entry not in entries:
            return
        weight = entries.pop(entry)
        subnet = self._subnet[sender]
        self._shift(sender, subnet, -weight, -1)
        if not entries:
            del self._entries[sender], self._subnet[sender]
        if not self._subnet_count[subnet]:
            del self._subnet_count[subnet], self._senders[subnet]

    def _shift(self, sender: str, subnet: str, weight: int, count: int) -> None:
        senders = self._senders.get(subnet)
        if senders is None:
            senders = self._senders[subnet] = _Heaviest()
        senders.set(sender, senders.weight.get(sender, 0) + weight)
        self._subnets.set(subnet, self._subnets.weight.get(subnet, 0) + weight)
        self._subnet_count[subnet] += count

    def count(self, sender: str) -> int:
        entries = self._entries.get(sender)
        return 0 if entries is None else len(entries)

    def subnet_count(self, subnet: str) -> int:
        return self._subnet_count.get(subnet, 0)

    def oldest(self, sender: str) -> K | None:
        entries = self._entries.get(sender)
        return next(iter(entries)) if entries else None

    def heaviest_in(self, subnet: str) -> str | None:
        senders = self._senders.get(subnet)
        return None if senders is None else senders.top()

    def heaviest(self) -> str | None:
        """The heaviest sender of the heaviest subnet: a flood from many addresses of
        one subnet pays before a lone address beside it does."""
        subnet = self._subnets.top()
        return None if subnet is None else self.heaviest_in(subnet)

    def __len__(self) -> int:
        return sum(len(e) for e in self._entries.values())
