"""The routing table: kademlia's k-buckets, with time as an input. Pure: no I/O.

Built from ``kademlia.routing.KBucket`` (add, split, replacement list) by
composition. Unlike ``kademlia.routing.RoutingTable`` it never starts a ping by
itself: a full bucket that may not split reports its head, and the caller (the
DHT core) decides whether to ping it. Bucket freshness (``last_updated``) is the
``now`` given, not the wall clock, so refresh decisions follow virtual time too.
"""

from __future__ import annotations

from bisect import bisect_right
from operator import itemgetter

from kademlia.node import Node
from kademlia.routing import KBucket

ID_SPACE = 2**160
_first = itemgetter(0)


class RoutingTable:
    def __init__(self, node: Node, ksize: int, now: float) -> None:
        self.node = node
        self.ksize = ksize
        first = KBucket(0, ID_SPACE, ksize)
        first.last_updated = now
        self.buckets: list[KBucket] = [first]
        # Upper bounds of the buckets' ranges, for a bisect instead of a scan.
        self._uppers: list[int] = [ID_SPACE]

    def get_bucket_for(self, node: Node) -> int:
        # kademlia's rule: the first bucket whose upper bound exceeds the id.
        return bisect_right(self._uppers, node.long_id)

    def split_bucket(self, index: int, now: float) -> None:
        one, two = self.buckets[index].split()
        one.last_updated = two.last_updated = now
        self.buckets[index : index + 1] = [one, two]
        self._uppers[index : index + 1] = [one.range[1], two.range[1]]

    def add_contact(self, node: Node, now: float) -> Node | None:
        """Add or refresh ``node``. When its bucket is full and may not split, the
        node waits in the replacement list and the bucket's head is returned: the
        least recently seen contact, which the caller should ping."""
        while True:
            index = self.get_bucket_for(node)
            bucket = self.buckets[index]
            if bucket.add_node(node):
                return None
            # Section 4.2 of the paper: split if the bucket has our own id in its
            # range or if its depth is not congruent to 0 mod 5.
            if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
                self.split_bucket(index, now)
                continue
            head: Node = bucket.head()
            return head

    def remove_contact(self, node: Node) -> Node | None:
        """Remove ``node``; the replacement promoted in its place, if any."""
        bucket = self.buckets[self.get_bucket_for(node)]
        promoted = None
        if node.id in bucket.nodes and bucket.replacement_nodes:
            promoted = next(reversed(bucket.replacement_nodes.values()))
        bucket.remove_node(node)
        return promoted

    def is_new_node(self, node: Node) -> bool:
        return bool(self.buckets[self.get_bucket_for(node)].is_new_node(node))

    def node_for(self, node_id: bytes) -> Node | None:
        """The contact with this id, or None."""
        bucket = self.buckets[bisect_right(self._uppers, int.from_bytes(node_id, "big"))]
        found: Node | None = bucket.nodes.get(node_id)
        return found

    def all_nodes(self) -> list[Node]:
        return [node for bucket in self.buckets for node in bucket.nodes.values()]

    def replacement_ids(self) -> set[bytes]:
        return {node_id for b in self.buckets for node_id in b.replacement_nodes}

    def closest_to(
        self, key: bytes, k: int, now: float, exclude: bytes | None = None
    ) -> list[Node]:
        """The ``k`` contacts closest to ``key``, exactly (kademlia's find_neighbors
        approximates, and leaves out a contact whose id *is* the key). Marks the
        key's bucket as looked up at ``now``."""
        goal = int.from_bytes(key, "big")
        self.buckets[bisect_right(self._uppers, goal)].last_updated = now
        # A sort in C beats heapq.nsmallest's Python loop at routing-table sizes.
        scored = [
            (n.long_id ^ goal, n) for b in self.buckets for n in b.nodes.values() if n.id != exclude
        ]
        scored.sort(key=_first)
        return [n for _, n in scored[:k]]

    def lonely_buckets(self, cutoff: float) -> list[KBucket]:
        """Buckets not looked up since ``cutoff``."""
        return [b for b in self.buckets if b.last_updated <= cutoff]

    def __len__(self) -> int:
        return sum(len(b.nodes) for b in self.buckets)
