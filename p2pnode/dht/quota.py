"""Who holds how much of a store, by sender address and subnet, so that a full store
evicts from the heaviest user instead of refusing newcomers. Pure: no I/O, no time.

A sender is a source IP. Its subnet is its IPv4 /24 or IPv6 /64 (an IPv4-mapped
IPv6 address counts as IPv4): one host, or one customer of a provider, rarely holds
more than that, so quotas per subnet bound what one cheap attacker can take.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


def subnet_of(ip: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) holding ``ip``; ``ip`` itself if unparsable."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return str(ipaddress.IPv4Network((int(addr) & ~0xFF, 24)))
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))


class Ledger(Generic[K]):
    """Entries (any hashable) of each sender, oldest first, with their weights (bytes),
    and totals per sender and per subnet. Finding the heaviest user scans the users
    (bounded by the number of entries); stores call it only when a limit is hit."""

    def __init__(self) -> None:
        self._entries: dict[str, OrderedDict[K, int]] = {}
        self._weight: Counter[str] = Counter()  # per sender
        self._subnet: dict[str, str] = {}  # sender -> subnet
        self._subnet_senders: dict[str, set[str]] = {}
        self._subnet_weight: Counter[str] = Counter()
        self._subnet_count: Counter[str] = Counter()

    def add(self, sender: str, entry: K, weight: int) -> None:
        entries = self._entries.get(sender)
        if entries is None:
            entries = self._entries[sender] = OrderedDict()
            subnet = self._subnet[sender] = subnet_of(sender)
            self._subnet_senders.setdefault(subnet, set()).add(sender)
        subnet = self._subnet[sender]
        entries[entry] = weight
        self._weight[sender] += weight
        self._subnet_weight[subnet] += weight
        self._subnet_count[subnet] += 1

    def remove(self, sender: str, entry: K) -> None:
        entries = self._entries.get(sender)
        if entries is None or entry not in entries:
            return
        weight = entries.pop(entry)
        subnet = self._subnet[sender]
        self._weight[sender] -= weight
        self._subnet_weight[subnet] -= weight
        self._subnet_count[subnet] -= 1
        if not entries:
            del self._entries[sender], self._weight[sender], self._subnet[sender]
            senders = self._subnet_senders[subnet]
            senders.discard(sender)
            if not senders:
                del self._subnet_senders[subnet]
                del self._subnet_weight[subnet], self._subnet_count[subnet]

    def count(self, sender: str) -> int:
        entries = self._entries.get(sender)
        return 0 if entries is None else len(entries)

    def subnet_count(self, subnet: str) -> int:
        return self._subnet_count.get(subnet, 0)

    def oldest(self, sender: str) -> K | None:
        entries = self._entries.get(sender)
        return next(iter(entries)) if entries else None

    def heaviest_in(self, subnet: str) -> str | None:
        senders = self._subnet_senders.get(subnet)
        return max(senders, key=self._weight.__getitem__) if senders else None

    def heaviest(self) -> str | None:
        """The heaviest sender of the heaviest subnet: a flood from many addresses of
        one subnet pays before a lone address beside it does."""
        if not self._subnet_weight:
            return None
        subnet = max(self._subnet_weight, key=self._subnet_weight.__getitem__)
        return self.heaviest_in(subnet)

    def __len__(self) -> int:
        return sum(len(e) for e in self._entries.values())
