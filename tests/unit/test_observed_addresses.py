"""Observed-address voting (p2pnode/nat/observed.py): pure."""

from __future__ import annotations

import pytest

from p2pnode.errors import UsageError
from p2pnode.nat.observed import TCP, UDP, ObservedAddress, ObservedAddresses


def oid(i: int) -> bytes:
    return bytes([i]) * 20


def test_one_observer_confirms_nothing_two_on_distinct_ips_do() -> None:
    seen = ObservedAddresses(min_votes=2)
    seen.observe(oid(1), "198.51.100.1", "203.0.113.5", 0.0)
    assert seen.confirmed(0.0) == []
    # the same observer again, or another observer on the same IP: still one vote
    seen.observe(oid(1), "198.51.100.1", "203.0.113.5", 1.0)
    seen.observe(oid(2), "198.51.100.1", "203.0.113.5", 1.0)
    assert seen.confirmed(1.0) == []
    seen.observe(oid(3), "198.51.100.3", "203.0.113.5", 2.0)
    assert seen.confirmed(2.0) == [ObservedAddress("203.0.113.5", None, UDP, 2)]
    assert seen.best_ip(2.0) == "203.0.113.5"


def test_one_lying_observer_cannot_set_our_address() -> None:
    seen = ObservedAddresses(min_votes=2)
    seen.observe(oid(1), "198.51.100.1", "203.0.113.5", 0.0)
    seen.observe(oid(2), "198.51.100.2", "203.0.113.5", 0.0)
    for i in range(5):  # a liar repeating itself counts once, by IP and by id
        seen.observe(oid(9), "192.0.2.9", "192.0.2.66", float(i))
    assert [a.ip for a in seen.confirmed(5.0)] == ["203.0.113.5"]


def test_only_the_last_report_of_an_observer_counts() -> None:
    seen = ObservedAddresses(min_votes=2)
    seen.observe(oid(1), "198.51.100.1", "203.0.113.5", 0.0)
    seen.observe(oid(2), "198.51.100.2", "203.0.113.5", 0.0)
    seen.observe(oid(2), "198.51.100.2", "203.0.113.6", 1.0)  # our address changed
    assert seen.confirmed(1.0) == []


def test_ports_need_their_own_votes_and_transports_are_apart() -> None:
    seen = ObservedAddresses(min_votes=2)
    seen.observe(oid(1), "198.51.100.1", "203.0.113.5", 0.0, port=4001, transport=TCP)
    seen.observe(oid(2), "198.51.100.2", "203.0.113.5", 0.0, port=5555, transport=TCP)
    assert seen.confirmed(0.0, TCP) == [ObservedAddress("203.0.113.5", None, TCP, 2)]
    seen.observe(oid(3), "198.51.100.3", "203.0.113.5", 0.0, port=4001, transport=TCP)
    assert seen.confirmed(0.0, TCP)[0].port == 4001
    assert seen.confirmed(0.0, UDP) == []


def test_memory_is_bounded_and_reports_expire() -> None:
    seen = ObservedAddresses(min_votes=2, max_observers=8, ttl=10.0)
    for i in range(100):
        seen.observe(oid(i), f"198.51.100.{i}", "203.0.113.5", 0.0)
    assert len(seen) == 8
    assert seen.stats["observers_forgotten"] == 92
    assert seen.confirmed(10.0)[0].votes == 8
    assert seen.confirmed(10.5) == []


def test_bad_settings_are_refused() -> None:
    with pytest.raises(UsageError):
        ObservedAddresses(min_votes=0)
    with pytest.raises(UsageError):
        ObservedAddresses().observe(oid(1), "a", "b", 0.0, transport="sctp")
