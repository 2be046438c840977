"""The routing table: kademlia's k-buckets, with time as an input. Pure: no I/O.

Built from ``kademlia.routing.KBucket`` (its range, contacts and replacement list)
by composition. Unlike ``kademlia.routing.RoutingTable`` it never starts a ping by
itself: a full bucket that may not split reports its head, and the caller (the
DHT core) decides whether to ping it. Bucket freshness (``last_updated``) is the
``now`` given, not the wall clock, so refresh decisions follow virtual time too.

Two limits keep one cheap host from filling the table (all off by default):

- diversity: at most ``max_per_group_bucket`` contacts of one address group (an
  IPv4 /24 or IPv6 /64, see ``diversity_group``) in a bucket, and at most
  ``max_per_group_table`` in the whole table;
- unproven share: at most ``max_unproven_per_bucket`` contacts of a bucket that
  did not prove their id (stock kademlia nodes), which are lookup hints only.

A node over a limit is refused outright: not added and not queued as a
replacement, so one subnet cannot crowd honest newcomers out of the replacement
list either. ``refused`` counts refusals by reason.
"""

from __future__ import annotations

import functools
import ipaddress
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable
from operator import itemgetter

from kademlia.node import Node
from kademlia.routing import KBucket

from p2pnode.subnets import subnet_of

ID_SPACE = 2**160
_first = itemgetter(0)

# Why add_contact refused a node (the keys of RoutingTable.refused).
SUBNET_BUCKET = "subnet_bucket"  # its group already has the most a bucket may hold
SUBNET_TABLE = "subnet_table"  # its group already has the most the table may hold
UNPROVEN_SHARE = "unproven_share"  # its bucket already holds the most unproven contacts
UNPROVEN_MOVE = "unproven_move"  # an unproven claim to move a proven contact elsewhere


@functools.lru_cache(maxsize=16384)  # a few µs each; asked once per new contact
def diversity_group(ip: str, exempt_loopback: bool) -> str | None:
    """The address group ``ip`` counts in for routing-table diversity: its IPv4 /24
    or IPv6 /64 (IPv4-mapped counts as IPv4); None when exempt. A loopback address
    is exempt when asked, else its own group: on one machine distinct 127.x
    addresses stand for distinct hosts (tests, simulations)."""
    parts = ip.split(".")
    if len(parts) == 4 and all(_octet(p) for p in parts):
        # Plain dotted IPv4, most addresses: 5x cheaper than ipaddress's parser.
        if parts[0] == "127":
            return None if exempt_loopback else ip
        return f"{parts[0]}.{parts[1]}.{parts[2]}.0/24"
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return subnet_of(ip)  # not an address: the text itself
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback:
        return None if exempt_loopback else str(addr)
    return subnet_of(str(addr))


def _octet(text: str) -> bool:
    """A decimal octet as ipaddress accepts it (no sign, no leading zero)."""
    return (
        0 < len(text) <= 3
        and text.isascii()
        and text.isdigit()
        and int(text) <= 255
        and (text[0] != "0" or text == "0")
    )


def _loopback_exempt_group(ip: str) -> str | None:
    return diversity_group(ip, True)


def _bucket_depth(bucket: KBucket) -> int:
    """The bits all of ``bucket``'s contacts share (kademlia's ``KBucket.depth``,
    which builds 160-character bit strings per contact: 95% of add_contact's cost).
    The ids' common prefix is that of the smallest and largest."""
    ids = [n.long_id for n in bucket.nodes.values()]
    return 160 - (min(ids) ^ max(ids)).bit_length()


class RoutingTable:
    def __init__(
        self,
        node: Node,
        ksize: int,
        now: float,
        *,
        max_per_group_bucket: int | None = None,
        max_per_group_table: int | None = None,
        max_unproven_per_bucket: int | None = None,
        group_of: Callable[[str], str | None] = _loopback_exempt_group,
    ) -> None:
        """``max_*`` None: no limit. ``group_of(ip)``: the diversity group of an
        address, None for exempt (default: ``diversity_group`` with loopback
        exempt)."""
        self.node = node
        self.ksize = ksize
        self.max_per_group_bucket = max_per_group_bucket
        self.max_per_group_table = max_per_group_table
        self.max_unproven_per_bucket = max_unproven_per_bucket
        self._group_of = group_of
        # Without group caps nobody needs the groups: skip computing them.
        self._grouping = max_per_group_bucket is not None or max_per_group_table is not None
        first = KBucket(0, ID_SPACE, ksize)
        first.last_updated = now
        self.buckets: list[KBucket] = [first]
        # Upper bounds of the buckets' ranges, for a bisect instead of a scan.
        self._uppers: list[int] = [ID_SPACE]
        # The group of each contact not exempt (a replacement's is worked out when
        # it is promoted), and the ids, contacts or replacements, not proven.
        self._group: dict[bytes, str] = {}
        self._unproven: set[bytes] = set()
        # Counts over the buckets' contacts (replacements do not count): per bucket
        # (parallel to self.buckets) and in the whole table.
        self._bucket_groups: list[Counter[str]] = [Counter()]
        self._bucket_unproven: list[int] = [0]
        self._table_groups: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    # -- lookups ---------------------------------------------------------------------

    def get_bucket_for(self, node: Node) -> int:
        # kademlia's rule: the first bucket whose upper bound exceeds the id.
        return bisect_right(self._uppers, node.long_id)

    def node_for(self, node_id: bytes) -> Node | None:
        """The contact with this id, or None."""
        bucket = self.buckets[bisect_right(self._uppers, int.from_bytes(node_id, "big"))]
        found: Node | None = bucket.nodes.get(node_id)
        return found

    def contains(self, node: Node) -> bool:
        """Whether ``node`` is a contact (not a replacement) at its address: after
        ``add_contact``, False means refused or queued as a replacement."""
        known = self.node_for(node.id)
        return known is not None and known.ip == node.ip and known.port == node.port

    def is_proven(self, node_id: bytes) -> bool:
        """Whether ``node_id`` is a contact (not a replacement) that proved its id."""
        return self.node_for(node_id) is not None and node_id not in self._unproven

    def is_new_node(self, node: Node) -> bool:
        return bool(self.buckets[self.get_bucket_for(node)].is_new_node(node))

    def all_nodes(self) -> list[Node]:
        return [node for bucket in self.buckets for node in bucket.nodes.values()]

    def replacement_ids(self) -> set[bytes]:
        return {node_id for b in self.buckets for node_id in b.replacement_nodes}

    def closest_to(
        self,
        key: bytes,
        k: int,
        now: float,
        exclude: bytes | None = None,
        proven_only: bool = False,
    ) -> list[Node]:
        """The ``k`` contacts closest to ``key``, exactly (kademlia's find_neighbors
        approximates, and leaves out a contact whose id *is* the key); only those
        that proved their id if ``proven_only``. Marks the key's bucket as looked
        up at ``now``."""
        goal = int.from_bytes(key, "big")
        self.buckets[bisect_right(self._uppers, goal)].last_updated = now
        # A sort in C beats heapq.nsmallest's Python loop at routing-table sizes.
        if proven_only:
            unproven = self._unproven
            scored = [
                (n.long_id ^ goal, n)
                for b in self.buckets
                for n in b.nodes.values()
                if n.id != exclude and n.id not in unproven
            ]
        else:
            scored = [
                (n.long_id ^ goal, n)
                for b in self.buckets
                for n in b.nodes.values()
                if n.id != exclude
            ]
        scored.sort(key=_first)
        return [n for _, n in scored[:k]]

    def lonely_buckets(self, cutoff: float) -> list[KBucket]:
        """Buckets not looked up since ``cutoff``."""
        return [b for b in self.buckets if b.last_updated <= cutoff]

    def group_counts(self) -> tuple[list[Counter[str]], Counter[str], list[int]]:
        """Copies of the counts kept (per bucket, whole table, unproven per bucket),
        for tests and metrics."""
        return (
            [Counter(c) for c in self._bucket_groups],
            Counter(self._table_groups),
            list(self._bucket_unproven),
        )

    def __len__(self) -> int:
        return sum(len(b.nodes) for b in self.buckets)

    # -- the limits ------------------------------------------------------------------

    def _group_for(self, node: Node) -> str | None:
        if not self._grouping or node.ip is None:
            return None
        return self._group_of(node.ip)

    def refusal(self, node: Node, proven: bool = True) -> str | None:
        """Why ``add_contact(node, proven=proven)`` would refuse ``node`` against the
        buckets as they are (add_contact asks after any split it makes), or None.
        A refresh at the same address is always allowed."""
        index = bisect_right(self._uppers, node.long_id)
        known = self.buckets[index].nodes.get(node.id)
        return self._refusal(index, node, proven, known, self._group_for(node))

    def _refusal(
        self, index: int, node: Node, proven: bool, known: Node | None, group: str | None
    ) -> str | None:
        if known is not None:
            if known.ip == node.ip and known.port == node.port:
                return None
            if not proven and known.id not in self._unproven:
                return UNPROVEN_MOVE
            if self._group.get(known.id) == group:
                return None  # a move within its group leaves every count as it is
        if group is not None:
            cap = self.max_per_group_bucket
            if cap is not None and self._bucket_groups[index][group] >= cap:
                return SUBNET_BUCKET
            cap = self.max_per_group_table
            if cap is not None and self._table_groups[group] >= cap:
                return SUBNET_TABLE
        if not proven and known is None:
            cap = self.max_unproven_per_bucket
            if cap is not None and self._bucket_unproven[index] >= cap:
                return UNPROVEN_SHARE
        return None

    # -- changes ---------------------------------------------------------------------

    def _count(self, index: int, node_id: bytes, sign: int) -> None:
        """Count (+1) or uncount (-1) contact ``node_id`` of bucket ``index``."""
        group = self._group.get(node_id)
        if group is not None:
            per_bucket = self._bucket_groups[index]
            per_bucket[group] += sign
            self._table_groups[group] += sign
            if per_bucket[group] == 0:
                del per_bucket[group]
            if self._table_groups[group] == 0:
                del self._table_groups[group]
        if node_id in self._unproven:
            self._bucket_unproven[index] += sign

    def _note(self, node_id: bytes, group: str | None, proven: bool) -> None:
        """Remember a contact's group (None: a replacement's, or exempt)."""
        if group is None:
            self._group.pop(node_id, None)
        else:
            self._group[node_id] = group
        if proven:
            self._unproven.discard(node_id)
        else:
            self._unproven.add(node_id)

    def _forget(self, node_id: bytes) -> None:
        self._group.pop(node_id, None)
        self._unproven.discard(node_id)

    def split_bucket(self, index: int, now: float) -> None:
        """Split bucket ``index`` in two halves; a half with room takes in the
        replacements that fit the limits."""
        old = self.buckets[index]
        low, high = old.range
        mid = (low + high) // 2
        one, two = KBucket(low, mid, self.ksize), KBucket(mid + 1, high, self.ksize)
        one.last_updated = two.last_updated = now
        for n in old.nodes.values():
            (one if n.long_id <= mid else two).nodes[n.id] = n
        for n in old.replacement_nodes.values():
            (one if n.long_id <= mid else two).replacement_nodes[n.id] = n
        for n in old.nodes.values():  # the table's counts do not change
            self._count(index, n.id, -1)
        self.buckets[index : index + 1] = [one, two]
        # An id equal to mid goes to the lower half, as KBucket.split does.
        self._uppers[index : index + 1] = [mid + 1, self._uppers[index]]
        self._bucket_groups[index : index + 1] = [Counter(), Counter()]
        self._bucket_unproven[index : index + 1] = [0, 0]
        for at in (index, index + 1):
            for node_id in self.buckets[at].nodes:
                self._count(at, node_id, +1)
            # Oldest first, as KBucket.split does (so no limits: no change).
            self._promote(at, newest_first=False)

    def _promote(self, index: int, newest_first: bool = True) -> Node | None:
        """Move replacements that fit the limits into bucket ``index`` while it has
        room, most recently seen first (or oldest first); the last one moved."""
        bucket = self.buckets[index]
        promoted = None
        while len(bucket.nodes) < self.ksize and bucket.replacement_nodes:
            waiting = bucket.replacement_nodes.values()
            for candidate in reversed(waiting) if newest_first else list(waiting):
                proven = candidate.id not in self._unproven
                group = self._group_for(candidate)
                if self._refusal(index, candidate, proven, None, group):
                    continue
                del bucket.replacement_nodes[candidate.id]
                bucket.nodes[candidate.id] = candidate
                self._note(candidate.id, group, proven)
                self._count(index, candidate.id, +1)
                promoted = candidate
                break
            else:
                break  # none fits
        return promoted

    def add_contact(self, node: Node, now: float, proven: bool = True) -> Node | None:
        """Add or refresh ``node`` (``proven``: it proved its id). When its bucket is
        full and may not split, the node waits in the replacement list and the
        bucket's head is returned: the least recently seen contact, which the
        caller should ping. A node over a limit is refused (counted in
        ``refused``); tell the cases apart with ``contains(node)`` afterwards."""
        group = self._group_for(node)
        while True:
            index = bisect_right(self._uppers, node.long_id)
            bucket = self.buckets[index]
            known = bucket.nodes.get(node.id)
            # Section 4.2 of the paper: a full bucket splits if it has our own id in
            # its range or if its depth is not congruent to 0 mod 5.
            if (
                known is None
                and len(bucket.nodes) >= self.ksize
                and (bucket.has_in_range(self.node) or _bucket_depth(bucket) % 5 != 0)
            ):
                if node.id in bucket.replacement_nodes:
                    # Seen again: the newest replacement when the halves fill up (as
                    # KBucket.add_node would have made it before the split).
                    bucket.replacement_nodes.move_to_end(node.id)
                self.split_bucket(index, now)
                continue
            why = self._refusal(index, node, proven, known, group)
            if why is not None:
                self.refused[why] += 1
                return None
            if known is not None:
                # kademlia's rule: the contact moves to the tail, at the address given
                # (a proven add also proves it; an unproven one never unproves it).
                self._count(index, node.id, -1)
                self._note(node.id, group, proven or node.id not in self._unproven)
                del bucket.nodes[node.id]
                bucket.nodes[node.id] = node
                self._count(index, node.id, +1)
                return None
            if node.id in bucket.replacement_nodes:
                del bucket.replacement_nodes[node.id]
            if len(bucket.nodes) < self.ksize:
                bucket.nodes[node.id] = node
                self._note(node.id, group, proven)
                self._count(index, node.id, +1)
                return None
            self._note(node.id, None, proven)
            bucket.replacement_nodes[node.id] = node
            while len(bucket.replacement_nodes) > bucket.max_replacement_nodes:
                dropped, _ = bucket.replacement_nodes.popitem(last=False)
                self._forget(dropped)
            head: Node = next(iter(bucket.nodes.values()))
            return head

    def remove_contact(self, node: Node) -> Node | None:
        """Remove ``node`` (by id, contact or replacement); the replacement promoted
        in its place, if any: the most recently seen that fits the limits."""
        index = bisect_right(self._uppers, node.long_id)
        bucket = self.buckets[index]
        if node.id in bucket.replacement_nodes:
            del bucket.replacement_nodes[node.id]
            self._forget(node.id)  # an id is a contact or a replacement, never both
            return None
        if node.id not in bucket.nodes:
            return None
        self._count(index, node.id, -1)
        del bucket.nodes[node.id]
        self._forget(node.id)
        return self._promote(index)

    def recount(self) -> tuple[list[Counter[str]], Counter[str], list[int]]:
        """The counts ``group_counts`` should hold, recomputed from the contacts
        (slow: for tests)."""
        per_bucket: list[Counter[str]] = []
        unproven: list[int] = []
        table: Counter[str] = Counter()
        for bucket in self.buckets:
            groups = _groups(self._group_for(n) for n in bucket.nodes.values())
            per_bucket.append(groups)
            table.update(groups)
            unproven.append(sum(1 for i in bucket.nodes if i in self._unproven))
        return per_bucket, table, unproven


def _groups(groups: Iterable[str | None]) -> Counter[str]:
    return Counter(g for g in groups if g is not None)
