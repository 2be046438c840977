"""The routing table's limits: contacts per address group (IPv4 /24, IPv6 /64) per
bucket and in the whole table, and the unproven contacts' share of a bucket."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from kademlia.node import Node
from kademlia.routing import KBucket

from p2pnode.dht.table import (
    SUBNET_BUCKET,
    SUBNET_TABLE,
    UNPROVEN_MOVE,
    UNPROVEN_SHARE,
    RoutingTable,
    diversity_group,
)

ME = Node(bytes(20), "127.0.0.1", 1)  # id 0: a contact's shared prefix with us is its cpl
_rng = random.Random(7)


def near(cpl: int, prefix: int = 1, width: int = 1) -> bytes:
    """A random id sharing exactly ``cpl`` bits with ours (then ``prefix`` on
    ``width`` bits, starting with a 1)."""
    rest = 160 - cpl - width
    return ((prefix << rest) | _rng.getrandbits(rest)).to_bytes(20, "big")


def node(cpl: int, ip: str, port: int = 4000) -> Node:
    return Node(near(cpl), ip, port)


def deep_table(ksize: int = 20, **limits: int) -> RoutingTable:
    """A table split down to cpl ~130: one empty bucket for each cpl below that."""
    table = RoutingTable(ME, ksize, 0.0, **limits)  # type: ignore[arg-type]  # ints only
    for i in range(ksize + 1):
        table.add_contact(node(130 + i, f"10.250.{i}.1"), 0.0)
    assert len(table.buckets) > 100
    return table


def test_diversity_group_rules() -> None:
    assert diversity_group("10.1.2.3", True) == diversity_group("10.1.2.200", True)
    assert diversity_group("10.1.2.3", True) != diversity_group("10.1.3.3", True)
    assert diversity_group("2001:db8:1:2::1", True) == diversity_group("2001:db8:1:2:ff::9", True)
    assert diversity_group("2001:db8:1:2::1", True) != diversity_group("2001:db8:1:3::1", True)
    # IPv4-mapped IPv6 counts as the IPv4 address.
    assert diversity_group("::ffff:10.1.2.9", True) == diversity_group("10.1.2.3", True)
    # Loopback: exempt, or each address its own group.
    for ip in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.2"):
        assert diversity_group(ip, True) is None
    assert diversity_group("127.0.0.2", False) != diversity_group("127.0.0.3", False)
    assert diversity_group("::ffff:127.0.0.2", False) == diversity_group("127.0.0.2", False)
    assert diversity_group("::1", False) is not None
    # Not an address (leading zero, garbage): the text itself, never a crash.
    assert diversity_group("010.1.2.3", True) == "010.1.2.3"
    assert diversity_group("x", False) == "x"


def test_bucket_cap_refuses_a_third_contact_of_one_subnet() -> None:
    table = RoutingTable(ME, 20, 0.0, max_per_group_bucket=2)
    a, b, c = (node(0, f"10.0.0.{i}") for i in (1, 2, 3))
    assert table.add_contact(a, 0.0) is None and table.add_contact(b, 0.0) is None
    assert table.refusal(c) == SUBNET_BUCKET
    assert table.add_contact(c, 0.0) is None
    assert not table.contains(c) and c.id not in table.replacement_ids()
    assert table.refused == Counter({SUBNET_BUCKET: 1})
    other = node(0, "10.0.1.1")
    table.add_contact(other, 0.0)
    assert table.contains(other)


def test_table_cap_holds_across_buckets() -> None:
    table = deep_table(max_per_group_bucket=2, max_per_group_table=3)
    sybils = [node(cpl, f"10.0.0.{cpl + 1}") for cpl in range(5)]  # one per bucket
    for sybil in sybils:
        table.add_contact(sybil, 0.0)
    assert [table.contains(s) for s in sybils] == [True, True, True, False, False]
    assert table.refused == Counter({SUBNET_TABLE: 2})
    assert table.group_counts()[1]["10.0.0.0/24"] == 3


def test_loopback_is_exempt_by_default() -> None:
    table = RoutingTable(ME, 20, 0.0, max_per_group_bucket=1, max_per_group_table=1)
    nodes = [node(0, "127.0.0.1", 5000 + i) for i in range(10)]
    for n in nodes:
        table.add_contact(n, 0.0)
    assert all(table.contains(n) for n in nodes)


def test_loopback_not_exempt_counts_each_address() -> None:
    table = RoutingTable(
        ME, 20, 0.0, max_per_group_bucket=1, group_of=lambda ip: diversity_group(ip, False)
    )
    first, same_address, next_address = (
        node(0, "127.0.0.2", 5000),
        node(0, "127.0.0.2", 5001),
        node(0, "127.0.0.3", 5000),
    )
    for n in (first, same_address, next_address):
        table.add_contact(n, 0.0)
    assert table.contains(first) and table.contains(next_address)
    assert not table.contains(same_address)


def test_ipv6_groups_by_slash_64() -> None:
    table = RoutingTable(ME, 20, 0.0, max_per_group_bucket=1)
    a, same64, other64 = (
        node(0, "2001:db8:1:2::1"),
        node(0, "2001:db8:1:2:ab::7"),
        node(0, "2001:db8:1:3::1"),
    )
    for n in (a, same64, other64):
        table.add_contact(n, 0.0)
    assert [table.contains(n) for n in (a, same64, other64)] == [True, False, True]


def test_ipv4_mapped_counts_as_ipv4() -> None:
    table = RoutingTable(ME, 20, 0.0, max_per_group_bucket=1)
    plain, mapped = node(0, "10.0.0.1"), node(0, "::ffff:10.0.0.2")
    table.add_contact(plain, 0.0)
    assert table.refusal(mapped) == SUBNET_BUCKET


def test_unproven_share_of_a_bucket() -> None:
    table = RoutingTable(ME, 20, 0.0, max_unproven_per_bucket=2)
    hints = [node(0, f"10.0.{i}.1") for i in range(3)]
    for n in hints:
        table.add_contact(n, 0.0, proven=False)
    assert [table.contains(n) for n in hints] == [True, True, False]
    assert table.refused == Counter({UNPROVEN_SHARE: 1})
    assert hints[2].id not in table.replacement_ids()
    proven = node(0, "10.0.9.1")
    table.add_contact(proven, 0.0)
    assert table.contains(proven) and table.is_proven(proven.id)
    assert not table.is_proven(hints[0].id) and not table.is_proven(hints[2].id)
    # Lookups may use hints; storing must not: proven_only leaves them out.
    everyone = table.closest_to(bytes(20), 20, 0.0)
    assert {n.id for n in everyone} == {hints[0].id, hints[1].id, proven.id}
    assert [n.id for n in table.closest_to(bytes(20), 20, 0.0, proven_only=True)] == [proven.id]


def test_a_proof_frees_the_unproven_share() -> None:
    table = RoutingTable(ME, 20, 0.0, max_unproven_per_bucket=2)
    a, b, c = (node(0, f"10.0.{i}.1") for i in range(3))
    table.add_contact(a, 0.0, proven=False)
    table.add_contact(b, 0.0, proven=False)
    assert table.refusal(c, proven=False) == UNPROVEN_SHARE
    table.add_contact(a, 0.0, proven=True)
    assert table.is_proven(a.id)
    table.add_contact(c, 0.0, proven=False)
    assert table.contains(c)
    # An unproven refresh of a proven contact does not unprove it.
    table.add_contact(a, 0.0, proven=False)
    assert table.is_proven(a.id)
    assert table.group_counts()[2] == table.recount()[2] == [2]


def test_refresh_is_always_allowed_and_moves_to_the_tail() -> None:
    table = RoutingTable(
        ME, 20, 0.0, max_per_group_bucket=2, max_per_group_table=2, max_unproven_per_bucket=1
    )
    a, b = node(0, "10.0.0.1"), node(0, "10.0.0.2")
    table.add_contact(a, 0.0, proven=False)
    table.add_contact(b, 0.0)
    assert table.refusal(a, proven=False) is None
    table.add_contact(Node(a.id, a.ip, a.port), 1.0, proven=False)
    assert [n.id for n in table.buckets[0].nodes.values()] == [b.id, a.id]
    assert not table.refused


def test_address_change_keeps_the_caps() -> None:
    table = RoutingTable(ME, 20, 0.0, max_per_group_bucket=1)
    a, b = node(0, "10.0.0.1"), node(0, "10.0.1.1")
    table.add_contact(a, 0.0)
    table.add_contact(b, 0.0)
    # Within its /24: allowed (kademlia's rule: the new address replaces the old).
    moved = Node(a.id, "10.0.0.77", 4001)
    table.add_contact(moved, 0.0)
    assert table.node_for(a.id) is moved
    # Into a full /24: refused, the old address stays.
    table.add_contact(Node(a.id, "10.0.1.2", 4000), 0.0)
    assert table.node_for(a.id) is moved and table.refused[SUBNET_BUCKET] == 1
    # To a free /24: allowed, the counts follow.
    table.add_contact(Node(a.id, "10.0.2.1", 4000), 0.0)
    assert table.group_counts()[1] == Counter({"10.0.1.0/24": 1, "10.0.2.0/24": 1})
    # An unproven claim cannot move a proven contact; a proven one can.
    assert table.refusal(Node(a.id, "10.0.3.1", 4000), proven=False) == UNPROVEN_MOVE
    table.add_contact(Node(a.id, "10.0.3.1", 4000), 0.0, proven=False)
    assert table.node_for(a.id).ip == "10.0.2.1"  # type: ignore[union-attr]
    assert table.group_counts()[:2] == table.recount()[:2]


def test_replacement_promotion_skips_those_over_a_cap() -> None:
    table = deep_table(ksize=2, max_per_group_table=1)
    # cpl 0, both starting 10000: depth 5, so the full bucket may not split.
    a = Node(near(0, 0b10000_1, 6), "10.0.1.1", 4000)
    b = Node(near(0, 0b10000_0, 6), "10.0.2.1", 4000)
    older, newer = node(0, "10.0.3.1"), node(0, "10.0.4.1")
    table.add_contact(a, 0.0)
    table.add_contact(b, 0.0)
    assert table.add_contact(older, 0.0) is a  # full: queued, the head to ping
    assert table.add_contact(newer, 0.0) is a
    assert {older.id, newer.id} <= table.replacement_ids()
    # newer's /24 reaches the table cap in another bucket.
    elsewhere = node(1, "10.0.4.2")
    table.add_contact(elsewhere, 0.0)
    assert table.contains(elsewhere)
    assert table.remove_contact(b) is older
    assert table.contains(older) and newer.id in table.replacement_ids()
    assert table.group_counts() == table.recount()


def test_no_limits_keeps_plain_kademlia_behaviour() -> None:
    """With no limits, the same contacts and replacements as the table before the
    limits (kademlia's KBucket add_node / split / remove_node, kept here)."""
    rng = random.Random(3)
    me = Node(rng.getrandbits(160).to_bytes(20, "big"))
    new, old = RoutingTable(me, 4, 0.0), _PlainTable(me, 4)
    pool = [rng.getrandbits(160).to_bytes(20, "big") for _ in range(400)]
    for step in range(6000):
        n = Node(rng.choice(pool), f"10.{rng.randrange(4)}.0.{rng.randrange(1, 9)}", 4000)
        if rng.random() < 0.8:
            got, want = new.add_contact(n, 0.0), old.add_contact(n)
            assert (got and got.id) == (want and want.id), step
        else:
            got, want = new.remove_contact(n), old.remove_contact(n)
            assert (got and got.id) == (want and want.id), step
        assert [b.range for b in new.buckets] == [b.range for b in old.buckets]
        assert [list(b.nodes) for b in new.buckets] == [list(b.nodes) for b in old.buckets]
        assert new.replacement_ids() == {i for b in old.buckets for i in b.replacement_nodes}


class _PlainTable:
    """The table as it was (kademlia's KBucket rules, no limits): the reference."""

    def __init__(self, me: Node, ksize: int) -> None:
        self.me, self.buckets = me, [KBucket(0, 2**160, ksize)]

    def _index(self, node: Node) -> int:
        return next(i for i, b in enumerate(self.buckets) if node.long_id <= b.range[1])

    def add_contact(self, node: Node) -> Node | None:
        while True:
            index = self._index(node)
            bucket = self.buckets[index]
            if bucket.add_node(node):
                return None
            if bucket.has_in_range(self.me) or bucket.depth() % 5 != 0:
                self.buckets[index : index + 1] = list(bucket.split())
                continue
            head: Node = bucket.head()
            return head

    def remove_contact(self, node: Node) -> Node | None:
        bucket = self.buckets[self._index(node)]
        promoted = None
        if node.id in bucket.nodes and bucket.replacement_nodes:
            promoted = next(reversed(bucket.replacement_nodes.values()))
        bucket.remove_node(node)
        return promoted


def _check(table: RoutingTable, caps: dict[str, int]) -> None:
    """The kept counts equal a recount; every limit holds; ids are where they say."""
    assert table.group_counts() == table.recount()
    per_bucket, whole, unproven = table.group_counts()
    assert all(n <= caps["max_per_group_bucket"] for c in per_bucket for n in c.values())
    assert all(n <= caps["max_per_group_table"] for n in whole.values())
    assert all(n <= caps["max_unproven_per_bucket"] for n in unproven)
    contacts = [i for b in table.buckets for i in b.nodes]
    replacements = [i for b in table.buckets for i in b.replacement_nodes]
    assert len(set(contacts)) == len(contacts) and not set(contacts) & set(replacements)
    assert set(table._group) <= set(contacts)
    assert table._unproven <= set(contacts) | set(replacements)
    for b, upper in zip(table.buckets, table._uppers, strict=True):
        assert len(b.nodes) <= table.ksize
        assert all(
            b.range[0] <= n.long_id < upper
            for n in (*b.nodes.values(), *b.replacement_nodes.values())
        )


@pytest.mark.parametrize("seed", [1, 2])
def test_random_operations_keep_the_counts_exact(seed: int) -> None:
    rng = random.Random(seed)
    caps = {"max_per_group_bucket": 1, "max_per_group_table": 4, "max_unproven_per_bucket": 1}
    me = Node(rng.getrandbits(160).to_bytes(20, "big"))
    table = RoutingTable(
        me, 4, 0.0, max_per_group_bucket=1, max_per_group_table=4, max_unproven_per_bucket=1
    )
    # Ids mostly in two far buckets (full ones queue replacements), some near ours
    # (deep splits); few subnets, so every cap bites.
    pool = [
        (me.long_id ^ rng.getrandbits(rng.choice([160, 158, 140]))).to_bytes(20, "big")
        for _ in range(300)
    ]
    ips = [f"10.0.{s}.{h}" for s in range(30) for h in (1, 2)]
    ips += ["127.0.0.1", "::ffff:10.0.1.9", "2001:db8::1", "2001:db8::2", "2001:db8:0:1::1"]
    seen: Counter[str] = Counter()
    for _ in range(2500):
        op = rng.random()
        if op < 0.6:  # add (new, refresh, or move to another address)
            n = Node(rng.choice(pool), rng.choice(ips), rng.choice((4000, 4001)))
            proven = rng.random() < 0.7
            why, before = table.refusal(n, proven), len(table.buckets)
            head = table.add_contact(n, 0.0, proven)
            if head is not None:
                seen["head"] += 1
                assert not table.contains(n) and n.id in table.replacement_ids()
            elif table.contains(n):
                assert table.is_proven(n.id) or not proven
            if why is not None and len(table.buckets) == before:
                assert not table.contains(n)  # no split: refusal() gave add's verdict
        elif op < 0.7:  # a contact proves its id
            contacts = table.all_nodes()
            if contacts:
                n = rng.choice(contacts)
                table.add_contact(Node(n.id, n.ip, n.port), 0.0, proven=True)
                assert table.is_proven(n.id)
        elif op < 0.9:  # a contact goes
            contacts = table.all_nodes()
            if contacts:
                n = rng.choice(contacts)
                promoted = table.remove_contact(n)
                assert table.node_for(n.id) is None
                if promoted is not None:
                    seen["promoted"] += 1
                    assert table.contains(promoted)
        else:  # a replacement goes, or an unknown id
            ids = sorted(table.replacement_ids()) or pool
            table.remove_contact(Node(rng.choice(ids)))
        _check(table, caps)
    assert seen["head"] > 20 and seen["promoted"] > 5
    assert all(table.refused[why] > 20 for why in (SUBNET_BUCKET, SUBNET_TABLE))
    assert all(table.refused[why] > 20 for why in (UNPROVEN_SHARE, UNPROVEN_MOVE))


def test_a_trimmed_replacement_is_forgotten() -> None:
    table = deep_table(ksize=2, max_per_group_bucket=1)
    a = Node(near(0, 0b10000_1, 6), "10.0.1.1", 4000)  # depth 5: no split
    b = Node(near(0, 0b10000_0, 6), "10.0.2.1", 4000)
    table.add_contact(a, 0.0)
    table.add_contact(b, 0.0)
    waiting = [node(0, f"10.1.{i}.1") for i in range(15)]
    for n in waiting:
        table.add_contact(n, 0.0, proven=False)
    kept = table.replacement_ids()
    assert kept == {n.id for n in waiting[5:]}  # the 10 newest (5 * ksize)
    caps = {"max_per_group_bucket": 1, "max_per_group_table": 99, "max_unproven_per_bucket": 99}
    _check(table, caps)
