"""Bounded value and provider stores and the rate limiter, stepped with a FakeClock."""

from __future__ import annotations

import pytest

from p2pnode.clock import FakeClock
from p2pnode.dht.codec import MessageError
from p2pnode.dht.config import VALUE_OVERHEAD
from p2pnode.dht.storage import ProviderStore, ValueStore
from p2pnode.ratelimit import RateLimiter


def key(i: int) -> bytes:
    return i.to_bytes(20, "big")


def test_values_expire_after_ttl_since_last_store() -> None:
    clock = FakeClock()
    store = ValueStore(clock, max_values=10, ttl=100.0, max_value_bytes=16)
    assert store.put(key(1), "a")
    clock.advance(60)
    assert store.put(key(2), b"b")
    clock.advance(39)
    assert store.get(key(1)) == "a"
    clock.advance(1)
    assert store.get(key(1)) is None
    assert store.get(key(2)) == b"b"
    assert store.put(key(2), 7)  # a refresh restarts its ttl
    clock.advance(99)
    assert store.get(key(2)) == 7
    assert len(store) == 1
    clock.advance(1)
    assert len(store) == 0


def test_values_bounded_in_count_and_size() -> None:
    clock = FakeClock()
    store = ValueStore(clock, max_values=3, ttl=100.0, max_value_bytes=16)
    for i in range(3):
        assert store.put(key(i), i, sender="10.0.0.1")
    assert store.put(key(9), 9, sender="10.1.0.2")  # full: the heaviest user's oldest goes
    assert store.get(key(0)) is None
    assert store.stats["evicted.full"] == 1
    assert store.put(key(1), "updated", sender="10.0.0.1")  # a refresh moves it last
    assert [k for k, _ in store.items()] == [key(2), key(9), key(1)]
    clock.advance(100)
    assert len(store) == 0
    for bad_key in (b"short", "k" * 20, 5):
        with pytest.raises(MessageError):
            store.put(bad_key, 1)  # type: ignore[arg-type]
    for bad_value in (b"x" * 17, "é" * 9, None, [1], 2**64):
        with pytest.raises(MessageError):
            store.put(key(1), bad_value)


def test_own_values_are_never_evicted_by_remote_writes() -> None:
    clock = FakeClock()
    store = ValueStore(clock, max_values=2, ttl=100.0, max_value_bytes=16)
    assert store.put(key(1), "mine")
    assert store.put(key(2), "mine too")
    assert not store.put(key(3), "x", sender="10.0.0.1")  # only our own values: refused
    assert store.stats["refused.full"] == 1
    # A remote store to our own key never replaces our value (the same value is fine).
    assert not store.put(key(1), "pwned", sender="10.0.0.1")
    assert store.put(key(1), "mine", sender="10.0.0.1")
    assert store.get(key(1)) == "mine" and store.is_own(key(1))
    assert store.stats["refused.own_value"] == 1
    store.remove(key(2))
    assert store.put(key(3), "x", sender="10.0.0.1")
    assert store.put(key(2), "ours again")  # ours evicts a remote value when full
    assert store.get(key(3)) is None


def test_sender_quota_evicts_the_senders_own_oldest() -> None:
    clock = FakeClock()
    store = ValueStore(clock, max_values=100, ttl=100.0, max_value_bytes=16, max_per_sender=3)
    assert store.put(key(50), "honest", sender="10.0.9.9")
    for i in range(10):
        assert store.put(key(i), i, sender="10.0.0.1", now=clock.now() + i)
    assert [k for k, _ in store.items()] == [key(50), key(7), key(8), key(9)]
    assert store.sender_count("10.0.0.1") == 3
    assert store.stats["evicted.sender_quota"] == 7


def test_subnet_quota_makes_its_heaviest_address_pay() -> None:
    clock = FakeClock()
    store = ValueStore(clock, max_values=100, ttl=100.0, max_value_bytes=16, max_per_subnet=4)
    assert store.put(key(50), "lone", sender="10.0.0.200")  # same /24, one value
    for i in range(20):
        assert store.put(key(i), i, sender=f"10.0.0.{1 + i % 2}")
    assert store.get(key(50)) == "lone"
    assert len(store) == 4
    assert store.stats["evicted.subnet_quota"] == 17
    # IPv6: a /64 is one subnet; an IPv4-mapped address is its IPv4 /24.
    assert store.put(key(60), 1, sender="2001:db8::1")
    assert store.put(key(61), 1, sender="2001:db8::2:1")
    assert store.put(key(62), 1, sender="::ffff:10.0.0.9")
    assert store.get(key(62)) == 1  # 10.0.0.0/24 at 4 again: its top user paid
    assert store.get(key(50)) == "lone"
    assert store.stats["evicted.subnet_quota"] == 18


def test_value_byte_budget() -> None:
    clock = FakeClock()
    size = 16 + VALUE_OVERHEAD
    store = ValueStore(clock, max_values=100, ttl=100.0, max_value_bytes=16, max_bytes=3 * size)
    for i in range(3):
        assert store.put(key(i), b"x" * 16, sender="10.0.0.1")
    assert store.bytes_used == 3 * size
    assert store.put(key(9), b"y" * 16, sender="10.1.0.1")
    assert store.bytes_used == 3 * size and store.get(key(0)) is None
    assert store.put(key(10), 5, sender="10.1.0.1")  # small ones fit in what is left
    assert store.stats["evicted.full"] == 2


def test_a_flood_from_many_addresses_does_not_lock_out_new_values() -> None:
    """Attack 5 of issue 10, scaled: 11 addresses each store more than their quota;
    later values from anyone else are still stored, and an earlier one survives."""
    clock = FakeClock()
    store = ValueStore(
        clock,
        max_values=100,
        ttl=24 * 3600.0,
        max_value_bytes=64,
        max_per_sender=10,
        max_per_subnet=40,
        max_bytes=100 * 128,
    )
    assert store.put(key(10_000), "early", sender="127.0.0.1")
    for i in range(1000):
        assert store.put(key(i), "s" * 64, sender=f"127.0.0.{2 + i % 11}")
    clock.advance(3600)
    assert store.put(key(10_001), "late", sender="192.0.2.1")
    assert store.put(key(10_002), "later", sender="127.0.0.1")
    assert store.get(key(10_000)) == "early"
    assert store.get(key(10_001)) == "late"
    assert store.stats["refused.full"] == 0


def provider_store(clock: FakeClock, **kw: int) -> ProviderStore:
    limits = {"max_per_key": 3, "max_per_sender": 4, "max_keys": 5, "max_records": 8}
    limits.update(kw)
    return ProviderStore(clock, ttl=100.0, **limits)


def test_provider_records_expire_and_refresh() -> None:
    clock = FakeClock()
    store = provider_store(clock)
    assert store.add(key(1), key(100), "10.0.0.1", 4001, sender="10.0.0.1")
    clock.advance(50)
    assert store.add(key(1), key(101), "10.0.0.2", 4002, sender="10.0.0.2")
    assert [e.node_id for e in store.get(key(1))] == [key(101), key(100)]  # newest first
    clock.advance(50)
    assert [e.node_id for e in store.get(key(1))] == [key(101)]
    assert store.add(key(1), key(101), "10.0.0.3", 4003, sender="10.0.0.3")  # refresh
    entry = store.get(key(1))[0]
    assert (entry.host, entry.port) == ("10.0.0.3", 4003)
    assert store.sender_count("10.0.0.2") == 0
    assert store.sender_count("10.0.0.3") == 1
    clock.advance(100)
    assert len(store) == 0
    assert store.key_count == 0
    assert store.sender_count("10.0.0.3") == 0
    assert store.bytes_used == 0


def test_a_full_key_evicts_its_least_deserving_record() -> None:
    clock = FakeClock()
    store = provider_store(clock, max_per_key=4, max_records=100, max_per_sender=100)
    assert store.add(key(1), key(100), "10.0.0.1", 1, sender="10.0.0.1")
    clock.advance(1)
    assert store.add(key(1), key(101), "10.9.0.1", 1, sender="10.9.0.1")
    clock.advance(1)
    assert store.add(key(1), key(102), "10.9.0.2", 1, sender="10.9.0.2")
    clock.advance(1)
    assert store.add(key(1), key(103), "10.9.0.2", 1, sender="10.9.0.2")
    clock.advance(1)
    # Full: the subnet holding most (10.9.0.0/24), its top address, its oldest record.
    assert store.add(key(1), key(104), "10.5.0.1", 1, sender="10.5.0.1")
    assert {e.node_id for e in store.get(key(1))} == {key(100), key(101), key(103), key(104)}
    clock.advance(1)
    assert store.add(key(1), key(105), "10.6.0.1", 1, sender="10.6.0.1")  # 10.9/24 again
    assert {e.node_id for e in store.get(key(1))} == {key(100), key(103), key(104), key(105)}
    # All in different subnets: the oldest goes.
    assert store.add(key(1), key(106), "10.7.0.1", 1, sender="10.7.0.1")
    assert key(100) not in {e.node_id for e in store.get(key(1))}
    assert store.stats["evicted.key_full"] == 3
    # Our own records are never evicted; a key full of them refuses (counted).
    for i in range(4):
        assert store.add(key(2), key(200 + i), "127.0.0.1", 1, sender=None)
    assert not store.add(key(2), key(300), "10.0.0.1", 1, sender="10.0.0.1")
    assert store.stats["refused.key_full"] == 1
    assert len(store.get(key(2))) == 4


def test_provider_quotas_evict_the_holders_own_records() -> None:
    clock = FakeClock()
    store = provider_store(
        clock,
        max_per_key=64,
        max_records=1000,
        max_keys=1000,
        max_per_sender=10,
        max_per_key_per_sender=2,
        max_per_key_per_subnet=3,
        max_per_subnet=15,
    )
    honest = "10.0.0.1"
    assert store.add(key(1), key(100), honest, 1, sender=honest)
    for i in range(64):  # attack 2: one address, one key, random ids
        assert store.add(key(1), key(1000 + i), "10.0.0.2", 9, sender="10.0.0.2")
        clock.advance(0.01)
    records = store.get(key(1))
    assert [e.node_id for e in records if e.sender == "10.0.0.2"] == [key(1063), key(1062)]
    assert key(100) in {e.node_id for e in records}
    assert store.stats["evicted.key_sender_quota"] == 62
    # Per subnet and key: a third address of the /24 evicts from the top one.
    assert store.add(key(1), key(101), "10.0.0.3", 1, sender="10.0.0.3")
    assert store.stats["evicted.key_subnet_quota"] == 1
    assert key(100) in {e.node_id for e in store.get(key(1))}
    # Per sender over all keys, per subnet over all keys.
    for i in range(30):
        assert store.add(key(10 + i), key(2000 + i), "10.0.0.2", 9, sender="10.0.0.2")
    assert store.sender_count("10.0.0.2") == 10
    assert store.stats["evicted.sender_quota"] > 0
    for i in range(30):
        assert store.add(key(50 + i), key(3000 + i), "10.0.0.4", 9, sender="10.0.0.4")
    assert store.stats["evicted.subnet_quota"] > 0
    assert key(100) in {e.node_id for e in store.get(key(1))}  # the lone honest record


def test_provider_totals_evict_from_the_heaviest_user() -> None:
    clock = FakeClock()
    store = provider_store(clock, max_per_key=64, max_per_sender=100, max_keys=4, max_records=6)
    assert store.add(key(1), key(100), "10.0.0.1", 1, sender="10.0.0.1")
    for i in range(5):
        assert store.add(key(2 + i % 2), key(200 + i), "10.9.0.1", 1, sender="10.9.0.1")
    assert store.add(key(1), key(101), "10.8.0.1", 1, sender="10.8.0.1")  # records full
    assert store.stats["evicted.full"] == 1
    assert store.add(key(4), key(102), "10.8.0.1", 1, sender="10.8.0.1")
    assert store.add(key(5), key(103), "10.8.0.1", 1, sender="10.8.0.1")  # keys full
    assert store.key_count <= 4 and len(store) <= 6
    assert store.stats["evicted.keys_full"] >= 1
    assert key(100) in {e.node_id for e in store.get(key(1))}
    # Bytes: records with long hosts cost more.
    small = provider_store(
        clock, max_per_key=64, max_per_sender=100, max_keys=100, max_records=100, max_bytes=300
    )
    for i in range(4):
        assert small.add(key(1), key(i), "2001:db8::1", 1, sender="2001:db8::1")
    assert small.bytes_used <= 300 and len(small) == 2
    with pytest.raises(MessageError):
        store.add(key(1), b"short", "10.0.0.1", 1, sender=None)
    with pytest.raises(MessageError):
        store.add(key(1), key(5), "10.0.0.1", 0, sender=None)


def test_provider_answers_are_a_fair_sample() -> None:
    clock = FakeClock()
    store = provider_store(clock, max_per_key=100, max_records=100, max_per_sender=100)
    store.add(key(1), key(1), "10.0.0.1", 1, sender="10.0.0.1")
    for i in range(10):
        clock.advance(1)
        store.add(key(1), key(100 + i), "10.0.0.2", 1, sender="10.0.0.2")
    clock.advance(1)
    store.add(key(1), key(2), "10.0.0.3", 1, sender="10.0.0.3")
    answer = store.get(key(1), limit=4)
    # One per address, freshest address first, then second records.
    assert [e.node_id for e in answer] == [key(2), key(109), key(1), key(108)]
    assert len(store.get(key(1), limit=2)) == 2
    store.remove(key(1), key(2))
    store.remove(key(1), key(77))
    assert len(store.get(key(1))) == 11


def test_rate_limiter_per_source() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock, rate=2.0, burst=3.0, max_keys=2)
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")  # another source has its own bucket
    clock.advance(0.5)
    assert limiter.allow("a")
    assert not limiter.allow("a")
    clock.advance(10)
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]  # capped
    limiter.allow("c")  # forgets the least recently seen ("b")
    assert len(limiter) == 2
