"""Bounded value and provider stores and the rate limiter, stepped with a FakeClock."""

from __future__ import annotations

import pytest

from p2pnode.clock import FakeClock
from p2pnode.dht.codec import MessageError
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
        assert store.put(key(i), i)
    assert not store.put(key(9), 9)  # full: refused, the old ones stay
    assert store.put(key(0), "updated")  # an existing key can still be refreshed
    assert [k for k, _ in store.items()] == [key(1), key(2), key(0)]
    clock.advance(100)
    assert store.put(key(9), 9)  # expired entries made room
    for bad_key in (b"short", "k" * 20, 5):
        with pytest.raises(MessageError):
            store.put(bad_key, 1)  # type: ignore[arg-type]
    for bad_value in (b"x" * 17, "é" * 9, None, [1], 2**64):
        with pytest.raises(MessageError):
            store.put(key(1), bad_value)


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


def test_provider_limits() -> None:
    clock = FakeClock()
    store = provider_store(clock)
    # per key
    for i in range(3):
        assert store.add(key(1), key(100 + i), "10.0.0.1", 1, sender=f"10.0.1.{i}")
    assert not store.add(key(1), key(200), "10.0.0.1", 1, sender="10.0.2.1")
    assert store.add(key(1), key(100), "10.0.0.9", 2, sender="10.0.1.0")  # refresh ok
    # per sender
    for i in range(4):
        assert store.add(key(10 + i), key(300), "10.9.9.9", 1, sender="10.9.9.9")
    assert not store.add(key(2), key(301), "10.9.9.9", 1, sender="10.9.9.9")
    assert store.sender_count("10.9.9.9") == 4
    # distinct keys (1 + 4 used of 5)
    assert not store.add(key(20), key(400), "10.0.0.4", 1, sender="10.0.0.4")
    assert store.add(key(1 + 10), key(401), "10.0.0.4", 1, sender="10.0.0.4")  # existing key
    # total records: 3 + 4 + 1 = 8
    assert len(store) == 8
    assert not store.add(key(12), key(402), "10.0.0.5", 1, sender="10.0.0.5")
    # our own records (sender None) are not counted per sender
    store.remove(key(12), key(300))
    assert store.add(key(12), key(999), "127.0.0.1", 1, sender=None)
    with pytest.raises(MessageError):
        store.add(key(1), b"short", "10.0.0.1", 1, sender=None)
    with pytest.raises(MessageError):
        store.add(key(1), key(5), "10.0.0.1", 0, sender=None)


def test_provider_get_limit_and_remove() -> None:
    clock = FakeClock()
    store = provider_store(clock, max_per_key=10, max_records=100)
    for i in range(5):
        store.add(key(1), key(i), "10.0.0.1", 1, sender=None)
        clock.advance(1)
    assert [e.node_id for e in store.get(key(1), limit=2)] == [key(4), key(3)]
    store.remove(key(1), key(4))
    store.remove(key(1), key(77))
    assert len(store.get(key(1))) == 4


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
