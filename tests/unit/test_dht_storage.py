"""Bounded value and provider stores and the rate limiter, stepped with a FakeClock."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import pytest

from p2pnode.clock import FakeClock
from p2pnode.dht.codec import MessageError
from p2pnode.dht.config import VALUE_OVERHEAD
from p2pnode.dht.records import (
    ImmutableRecord,
    ProviderRecord,
    immutable_key,
    mutable_key,
    sign_mutable,
    sign_provider_record,
    to_value,
)
from p2pnode.dht.storage import ProviderStore, ValueStore
from p2pnode.identity import Identity
from p2pnode.ratelimit import RateLimiter

NOW = 1_700_000_000.0


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
    """A 100 s ttl; records (``announce``) live longer, so the ttl decides."""
    limits = {"max_per_key": 3, "max_per_sender": 4, "max_keys": 5, "max_records": 8}
    limits.update(kw)
    return ProviderStore(clock, ttl=100.0, max_record_ttl=10_000.0, **limits)


@functools.cache
def peer(i: int) -> Identity:
    return Identity.from_seed(i.to_bytes(32, "big"))


def pid(i: int) -> bytes:
    return peer(i).node_id


_SEQ = itertools.count(1)


def announce(
    store: ProviderStore, k: bytes, i: int, host: str, port: int, sender: str | None
) -> bool:
    """Peer ``i``'s signed record for ``k`` at host:port (a newer seq each time)."""
    record = sign_provider_record(peer(i), k, [(host, port)], next(_SEQ), int(NOW + 10_000))
    return store.add_record(record, sender)


def test_provider_records_expire_and_refresh() -> None:
    clock = FakeClock(NOW)
    store = provider_store(clock)
    assert announce(store, key(1), 100, "10.0.0.1", 4001, sender="10.0.0.1")
    clock.advance(50)
    assert announce(store, key(1), 101, "10.0.0.2", 4002, sender="10.0.0.2")
    assert [e.node_id for e in store.get(key(1))] == [pid(101), pid(100)]  # newest first
    clock.advance(50)
    assert [e.node_id for e in store.get(key(1))] == [pid(101)]
    assert announce(store, key(1), 101, "10.0.0.3", 4003, sender="10.0.0.3")  # refresh
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
    clock = FakeClock(NOW)
    store = provider_store(clock, max_per_key=4, max_records=100, max_per_sender=100)
    assert announce(store, key(1), 100, "10.0.0.1", 1, sender="10.0.0.1")
    clock.advance(1)
    assert announce(store, key(1), 101, "10.9.0.1", 1, sender="10.9.0.1")
    clock.advance(1)
    assert announce(store, key(1), 102, "10.9.0.2", 1, sender="10.9.0.2")
    clock.advance(1)
    assert announce(store, key(1), 103, "10.9.0.2", 1, sender="10.9.0.2")
    clock.advance(1)
    # Full: the subnet holding most (10.9.0.0/24), its top address, its oldest record.
    assert announce(store, key(1), 104, "10.5.0.1", 1, sender="10.5.0.1")
    assert {e.node_id for e in store.get(key(1))} == {pid(100), pid(101), pid(103), pid(104)}
    clock.advance(1)
    assert announce(store, key(1), 105, "10.6.0.1", 1, sender="10.6.0.1")  # 10.9/24 again
    assert {e.node_id for e in store.get(key(1))} == {pid(100), pid(103), pid(104), pid(105)}
    # All in different subnets: the oldest goes.
    assert announce(store, key(1), 106, "10.7.0.1", 1, sender="10.7.0.1")
    assert pid(100) not in {e.node_id for e in store.get(key(1))}
    assert store.stats["evicted.key_full"] == 3
    # Our own records are never evicted; a key full of them refuses (counted).
    for i in range(4):
        assert announce(store, key(2), 200 + i, "127.0.0.1", 1, sender=None)
    assert not announce(store, key(2), 300, "10.0.0.1", 1, sender="10.0.0.1")
    assert store.stats["refused.key_full"] == 1
    assert len(store.get(key(2))) == 4


def test_provider_quotas_evict_the_holders_own_records() -> None:
    clock = FakeClock(NOW)
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
    assert announce(store, key(1), 100, honest, 1, sender=honest)
    for i in range(64):  # attack 2: one address, one key, random ids
        assert announce(store, key(1), 1000 + i, "10.0.0.2", 9, sender="10.0.0.2")
        clock.advance(0.01)
    records = store.get(key(1))
    assert [e.node_id for e in records if e.sender == "10.0.0.2"] == [pid(1063), pid(1062)]
    assert pid(100) in {e.node_id for e in records}
    assert store.stats["evicted.key_sender_quota"] == 62
    # Per subnet and key: a third address of the /24 evicts from the top one.
    assert announce(store, key(1), 101, "10.0.0.3", 1, sender="10.0.0.3")
    assert store.stats["evicted.key_subnet_quota"] == 1
    assert pid(100) in {e.node_id for e in store.get(key(1))}
    # Per sender over all keys, per subnet over all keys.
    for i in range(30):
        assert announce(store, key(10 + i), 2000 + i, "10.0.0.2", 9, sender="10.0.0.2")
    assert store.sender_count("10.0.0.2") == 10
    assert store.stats["evicted.sender_quota"] > 0
    for i in range(30):
        assert announce(store, key(50 + i), 3000 + i, "10.0.0.4", 9, sender="10.0.0.4")
    assert store.stats["evicted.subnet_quota"] > 0
    assert pid(100) in {e.node_id for e in store.get(key(1))}  # the lone honest record


def test_provider_totals_evict_from_the_heaviest_user() -> None:
    clock = FakeClock(NOW)
    store = provider_store(clock, max_per_key=64, max_per_sender=100, max_keys=4, max_records=6)
    assert announce(store, key(1), 100, "10.0.0.1", 1, sender="10.0.0.1")
    for i in range(5):
        assert announce(store, key(2 + i % 2), 200 + i, "10.9.0.1", 1, sender="10.9.0.1")
    assert announce(store, key(1), 101, "10.8.0.1", 1, sender="10.8.0.1")  # records full
    assert store.stats["evicted.full"] == 1
    assert announce(store, key(4), 102, "10.8.0.1", 1, sender="10.8.0.1")
    assert announce(store, key(5), 103, "10.8.0.1", 1, sender="10.8.0.1")  # keys full
    assert store.key_count <= 4 and len(store) <= 6
    assert store.stats["evicted.keys_full"] >= 1
    assert pid(100) in {e.node_id for e in store.get(key(1))}
    # Bytes: records with long hosts cost more.
    small = provider_store(
        clock, max_per_key=64, max_per_sender=100, max_keys=100, max_records=100, max_bytes=450
    )
    for i in range(4):
        assert announce(small, key(1), i, "2001:db8::1", 1, sender="2001:db8::1")
    assert small.bytes_used <= 450 and len(small) == 2


def test_provider_answers_are_a_fair_sample() -> None:
    clock = FakeClock(NOW)
    store = provider_store(clock, max_per_key=100, max_records=100, max_per_sender=100)
    announce(store, key(1), 1, "10.0.0.1", 1, sender="10.0.0.1")
    for i in range(10):
        clock.advance(1)
        announce(store, key(1), 100 + i, "10.0.0.2", 1, sender="10.0.0.2")
    clock.advance(1)
    announce(store, key(1), 2, "10.0.0.3", 1, sender="10.0.0.3")
    answer = store.get(key(1), limit=4)
    # One per address, freshest address first, then second records.
    assert [e.node_id for e in answer] == [pid(2), pid(109), pid(1), pid(108)]
    assert len(store.get(key(1), limit=2)) == 2
    store.remove(key(1), pid(2))
    store.remove(key(1), pid(77))
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


# -- signed records -----------------------------------------------------------------------

ALICE = Identity.generate()
MALLORY = Identity.generate()
NAME_KEY = mutable_key(ALICE.node_id, "greeting")


def signed(
    value: object = "hello", seq: int = 1, expires: float = NOW + 3000, **kw: object
) -> bytes:
    identity = kw.get("identity", ALICE)
    name = kw.get("name", "greeting")
    return to_value(sign_mutable(identity, name, value, seq, int(expires)))  # type: ignore[arg-type]


def record_store(clock: FakeClock, **kw: int) -> ValueStore:
    limits: dict[str, int] = {"max_values": 100}
    limits.update(kw)
    return ValueStore(clock, ttl=3600.0, max_value_bytes=4096, **limits)


def flip_last_byte(value: bytes) -> bytes:
    return value[:-1] + bytes([value[-1] ^ 1])


def test_an_envelope_is_stored_only_if_it_verifies_for_its_key() -> None:
    clock = FakeClock(NOW)
    store = record_store(clock)
    hostile = {
        "bad_signature": (NAME_KEY, flip_last_byte(signed())),
        "wrong_key": (mutable_key(ALICE.node_id, "other"), signed()),
        "expired": (NAME_KEY, signed(expires=NOW)),
        "too_far_future": (NAME_KEY, signed(expires=NOW + 3600 + 61)),
        "bad_record": (NAME_KEY, signed()[:-3]),
    }
    for reason, (k, value) in hostile.items():
        assert not store.put(k, value, sender="10.0.0.1")
        assert store.stats[f"invalid_record.{reason}"] == 1
        assert store.last_refused == "invalid_record"
        assert not store.put(k, value)  # not even our own
    assert store.stats["refused.invalid_record"] == 2 * len(hostile)
    assert len(store) == 0
    # Another publisher's record under Alice's name: the wrong key.
    assert not store.put(NAME_KEY, signed(identity=MALLORY), sender="10.0.0.1")
    assert store.put(NAME_KEY, signed(), sender="10.0.0.1")
    assert store.record(NAME_KEY).value == "hello"  # type: ignore[union-attr]
    immutable = ImmutableRecord(b"data")
    assert store.put(immutable_key(immutable), to_value(immutable), sender="10.0.0.1")
    assert not store.put(immutable_key(ImmutableRecord(b"x")), to_value(immutable), "10.0.0.1")
    assert store.stats["invalid_record.wrong_key"] == 4


def test_a_mutable_record_is_replaced_only_by_a_higher_seq() -> None:
    clock = FakeClock(NOW)
    store = record_store(clock)
    v1, v2, v3 = signed("one", 1), signed("two", 2), signed("three", 3)
    assert store.put(NAME_KEY, v2, sender="10.0.0.1")
    assert not store.put(NAME_KEY, v1, sender="10.0.0.2")  # replay of an older record
    assert not store.put(NAME_KEY, signed("other two", 2), sender="10.0.0.2")  # equal seq
    assert store.stats["refused.stale_seq"] == 2 and store.last_refused == "stale_seq"
    assert store.get(NAME_KEY) == v2
    assert store.put(NAME_KEY, v3, sender="10.0.0.2")
    assert store.get(NAME_KEY) == v3
    # Huge seqs are fine; the bound is the format's.
    top = signed("top", 2**63 - 1)
    assert store.put(NAME_KEY, top, sender="10.0.0.2")
    assert not store.put(NAME_KEY, signed("after top", 5), sender="10.0.0.2")


def test_the_same_record_refreshes_its_ttl_but_never_past_its_expiry() -> None:
    clock = FakeClock(NOW)
    store = record_store(clock, max_record_ttl=10_000)  # records may outlive the ttl
    value = signed(expires=NOW + 5000)
    assert store.put(NAME_KEY, value, sender="10.0.0.1")
    clock.advance(3000)
    assert store.put(NAME_KEY, value, sender="10.0.0.2")  # a refresh: same bytes
    clock.advance(1000)
    assert store.get(NAME_KEY) == value  # 4000 s after the first store: ttl restarted
    clock.advance(999)
    assert store.get(NAME_KEY) == value
    clock.advance(1)  # its own expiry, before the ttl runs out
    assert store.get(NAME_KEY) is None
    assert len(store) == 0 and store.bytes_used == 0
    # An early expiry also goes behind fresher entries in refresh order.
    assert store.put(key(1), "plain", sender="10.0.0.1")
    clock.advance(1)
    short = signed(expires=clock.now() + 10, seq=9)
    assert store.put(NAME_KEY, short, sender="10.0.0.1")
    assert store.put(key(2), "plain", sender="10.0.0.1")
    clock.advance(10)
    assert store.get(NAME_KEY) is None
    assert [k for k, _ in store.items()] == [key(1), key(2)]
    assert store.newest(10) == [(key(2), "plain"), (key(1), "plain")]


def test_unsigned_never_replaces_signed_but_signed_replaces_unsigned() -> None:
    clock = FakeClock(NOW)
    store = record_store(clock)
    assert store.put(NAME_KEY, "pwned", sender="10.0.0.9")  # squatting before the record
    assert store.put(NAME_KEY, signed(), sender="10.0.0.1")
    assert store.get(NAME_KEY) == signed()
    for plain in ("pwned", b"pwned", 1):
        assert not store.put(NAME_KEY, plain, sender="10.0.0.9")
        assert not store.put(NAME_KEY, plain)
    assert store.stats["refused.unsigned_over_signed"] == 6
    assert store.get(NAME_KEY) == signed()
    immutable = ImmutableRecord("data")
    ikey = immutable_key(immutable)
    assert store.put(ikey, to_value(immutable), sender="10.0.0.1")
    assert not store.put(ikey, "pwned", sender="10.0.0.9")
    assert store.put(ikey, to_value(immutable), sender="10.0.0.2")  # a refresh


def test_own_records_keep_the_own_value_rule() -> None:
    clock = FakeClock(NOW)
    store = record_store(clock)
    v1 = signed("one", 1)
    assert store.put(NAME_KEY, v1)
    assert store.put(NAME_KEY, v1, sender="10.0.0.1")  # an echo of ours
    assert store.is_own(NAME_KEY)
    # Even a newer valid record from elsewhere leaves ours alone (we republish ours).
    assert not store.put(NAME_KEY, signed("two", 2), sender="10.0.0.1")
    assert store.last_refused == "own_value"
    assert store.put(NAME_KEY, signed("two", 2))  # our own newer one
    assert not store.put(NAME_KEY, v1)  # our own stale one
    assert store.stats["refused.stale_seq"] == 1
    # A plain value equal in Python but not in type is not "what we hold".
    assert store.put(key(1), 1)
    assert not store.put(key(1), True, sender="10.0.0.1")


def test_early_expiries_are_bounded_in_memory() -> None:
    clock = FakeClock(NOW)
    store = record_store(clock)
    for seq in range(1, 400):
        assert store.put(NAME_KEY, signed(seq=seq, expires=NOW + 60), sender="10.0.0.1")
    assert len(store) == 1
    assert len(store._deadlines) <= 2 * len(store) + 64 + 1
    clock.advance(60)
    assert len(store) == 0


# -- signed provider records ----------------------------------------------------------------


def provider_record(
    identity: Identity = ALICE,
    host: str = "10.0.0.1",
    seq: int = 1,
    expires: float = NOW + 3000,
    k: bytes = b"",
) -> ProviderRecord:
    return sign_provider_record(identity, k or key(1), [(host, 4001)], seq, int(expires))


def signed_provider_store(clock: FakeClock, **kw: int) -> ProviderStore:
    limits = {"max_per_key": 8, "max_per_sender": 100, "max_keys": 100, "max_records": 100}
    limits.update(kw)
    return ProviderStore(clock, ttl=3600.0, **limits)


def test_provider_records_are_verified_inside_the_store() -> None:
    clock = FakeClock(NOW)
    store = signed_provider_store(clock)
    good = provider_record()
    hostile = {
        "bad_signature": dataclasses.replace(good, signature=flip_last_byte(good.signature)),
        "id_mismatch": dataclasses.replace(good, peer_id=MALLORY.node_id),
        "expired": provider_record(expires=NOW),
        "too_far_future": provider_record(expires=NOW + 3600 + 61),
    }
    wrong_key = dataclasses.replace(good, key=key(2))  # replayed under another key
    for reason, record in hostile.items():
        assert not store.add_record(record, "10.0.0.1")
        assert store.stats[f"invalid_record.{reason}"] == 1
        assert store.last_refused == "invalid_record"
    assert not store.add_record(wrong_key, None)
    assert store.stats["invalid_record.bad_signature"] == 2
    assert len(store) == 0 and store.get_records(key(1), 10) == []
    assert store.add_record(good, "10.0.0.1")
    assert store.get_records(key(1), 10) == [good]


def test_a_newer_provider_record_replaces_the_older() -> None:
    clock = FakeClock(NOW)
    store = signed_provider_store(clock)
    first = provider_record(seq=5)
    assert store.add_record(first, "10.0.0.1")
    assert not store.add_record(provider_record(seq=4, host="10.0.0.66"), "10.0.0.66")
    assert not store.add_record(provider_record(seq=5, host="10.0.0.66"), "10.0.0.66")
    assert store.stats["refused.stale_seq"] == 2
    clock.advance(10)
    assert store.add_record(first, "10.0.0.1")  # the same record: a refresh
    newer = provider_record(seq=6, host="10.0.0.2")
    assert store.add_record(newer, "10.0.0.2")
    assert store.get_records(key(1)) == [newer] and len(store) == 1


def test_provider_records_go_at_their_own_expiry() -> None:
    clock = FakeClock(NOW)
    store = signed_provider_store(clock)
    short = provider_record(expires=NOW + 100)
    assert store.add_record(short, "10.0.0.1")
    later = provider_record(MALLORY, "10.0.0.2")
    assert store.add_record(later, "10.0.0.2")
    clock.advance(99)
    assert store.get_records(key(1)) == [later, short]
    clock.advance(1)
    assert store.get_records(key(1)) == [later]
    assert len(store) == 1 and [e.node_id for e in store.get(key(1))] == [MALLORY.node_id]


def test_provider_record_answers_one_per_host_fresh_first_subnets_in_turn() -> None:
    clock = FakeClock(NOW)
    store = signed_provider_store(clock, max_per_key=64, max_per_key_per_sender=64)
    own = provider_record(host="192.0.2.1", k=key(3))
    flood = [Identity.generate() for _ in range(12)]
    honest = [Identity.generate() for _ in range(3)]
    for i, identity in enumerate(flood):
        host = "10.9.0.1" if i < 6 else f"10.9.0.{i}"  # six claim the same host
        assert store.add_record(provider_record(identity, host, k=key(3)), f"10.9.0.{i}")
        clock.advance(1)
    for i, identity in enumerate(honest):
        clock.advance(-10)  # announced before the flood's latest
        assert store.add_record(provider_record(identity, f"10.{i}.1.1", k=key(3)), f"10.{i}.1.1")
        clock.advance(10)
    assert store.add_record(own, None)
    answer = store.get_records(key(3), 8)
    hosts = [r.host for r in answer]
    assert len(set(hosts)) == len(hosts) == 8  # one per host
    assert answer[0] == own  # ours first
    assert {r.peer_id for r in answer} >= {i.node_id for i in honest}  # every subnet a turn
    flood_hosts = [h for h in hosts if h.startswith("10.9.")]
    assert flood_hosts == ["10.9.0.11", "10.9.0.10", "10.9.0.9", "10.9.0.8"]  # fresh first
    assert len(store.get_records(key(3))) == 1 + 3 + 7  # 6 share one host
    assert store.get_records(key(4), 8) == []


def test_a_full_key_of_signed_records_evicts_the_least_deserving() -> None:
    clock = FakeClock(NOW)
    store = signed_provider_store(clock, max_per_key=4)
    people = [Identity.generate() for _ in range(6)]
    clock.advance(1)
    for i in range(4):
        assert store.add_record(provider_record(people[i], f"10.{i}.0.1"), f"10.{i}.0.1")
        clock.advance(1)
    # Full: the oldest goes (all in distinct subnets).
    assert store.add_record(provider_record(people[4], "10.4.0.1"), "10.4.0.1")
    assert people[0].node_id not in {r.peer_id for r in store.get_records(key(1))}
    # A subnet holding two goes before an older lone record (people[2]).
    clock.advance(1)
    assert store.add_record(provider_record(people[5], "10.4.0.2"), "10.4.0.2")
    clock.advance(1)
    newcomer = provider_record(Identity.generate(), "10.7.0.1")
    assert store.add_record(newcomer, "10.7.0.1")
    peers = {r.peer_id for r in store.get_records(key(1))}
    assert peers == {people[2].node_id, people[3].node_id, people[5].node_id, newcomer.peer_id}
    assert store.stats["evicted.key_full"] == 3 and store.stats["refused.key_full"] == 0


def test_a_provider_record_flood_does_not_lock_out_newcomers() -> None:
    """Attack 2 of issue 10 with valid signatures: 64 fresh key pairs from one address."""
    clock = FakeClock(NOW)
    store = signed_provider_store(
        clock, max_per_key=16, max_per_key_per_sender=4, max_per_key_per_subnet=8
    )
    real = provider_record(host="192.0.2.7")
    assert store.add_record(real, "192.0.2.7")
    for i in range(64):
        spam = provider_record(Identity.generate(), f"198.51.100.{i}")
        assert store.add_record(spam, "198.51.100.1")
        clock.advance(1)
    late = provider_record(MALLORY, "203.0.113.5")
    assert store.add_record(late, "203.0.113.5")
    answer = store.get_records(key(1), 16)
    assert answer[0] == late and real in answer[:3]
    assert store.sender_count("198.51.100.1") == 4


def test_our_own_provider_record_is_not_taken_over() -> None:
    clock = FakeClock(NOW)
    store = signed_provider_store(clock)
    ours = provider_record(seq=1)
    assert store.add_record(ours, None)
    assert store.add_record(ours, "10.0.0.9")  # an echo: nothing changes
    assert store.get(key(1))[0].sender is None
    assert not store.add_record(provider_record(seq=2, host="10.0.0.9"), "10.0.0.9")
    assert store.last_refused == "own_value"
    assert store.get_records(key(1)) == [ours]
    clock.advance(3000)  # the same record once it has expired is refused, even ours
    assert not store.add_record(ours, None)
    assert store.stats["invalid_record.expired"] == 1
