"""The AutoNAT verdict (p2pnode/nat/reachability.py): pure, time passed in."""

from __future__ import annotations

import pytest

from p2pnode.errors import UsageError
from p2pnode.nat.observed import TCP, UDP
from p2pnode.nat.reachability import (
    FAILURE,
    NO_EVIDENCE,
    SUCCESS,
    ReachabilityChanged,
    ReachabilityConfig,
    ReachabilityCore,
)
from p2pnode.nat.types import Reachability

PUBLIC, PRIVATE, UNKNOWN = Reachability.PUBLIC, Reachability.PRIVATE, Reachability.UNKNOWN


def core(**changes: float) -> ReachabilityCore:
    return ReachabilityCore(ReachabilityConfig(**changes), 0.0)  # type: ignore[arg-type]


def test_one_verified_success_makes_public() -> None:
    c = core()
    assert c.verdict(TCP) is UNKNOWN
    c.result(TCP, "198.51.100.1", SUCCESS, 1.5)
    assert c.verdict(TCP) is PUBLIC and c.verdict(UDP) is UNKNOWN
    assert c.events() == [ReachabilityChanged(TCP, UNKNOWN, PUBLIC, 1.5)]
    assert c.time_to_verdict(TCP) == 1.5 and c.time_to_verdict(UDP) is None


def test_private_needs_failures_from_several_server_ips() -> None:
    c = core(failures_for_private=3)
    c.result(UDP, "198.51.100.1", FAILURE, 1.0)
    c.result(UDP, "198.51.100.1", FAILURE, 1.1)  # the same server again: one voice
    c.result(UDP, "198.51.100.2", FAILURE, 1.2)
    c.result(UDP, "198.51.100.3", NO_EVIDENCE, 1.3)  # refused / timed out: nothing
    assert c.verdict(UDP) is UNKNOWN
    c.result(UDP, "198.51.100.3", FAILURE, 1.4)
    assert c.verdict(UDP) is PRIVATE
    assert c.stats["probe_udp_failure"] == 4 and c.stats["probe_udp_no_evidence"] == 1


def test_a_small_network_settles_for_every_server_it_knows() -> None:
    """Two servers known (a lab, a young network): both failing is enough; one
    is never enough, whatever the network's size."""
    c = core(failures_for_private=3)
    servers = [(bytes([i]) * 20, f"198.51.100.{i}", 4001) for i in (1, 2)]
    assert c.pick_servers(servers, 1.0) == [0, 1]
    c.result(TCP, "198.51.100.1", FAILURE, 1.1)
    assert c.verdict(TCP) is UNKNOWN
    c.result(TCP, "198.51.100.2", FAILURE, 1.2)
    assert c.verdict(TCP) is PRIVATE
    lone = core(failures_for_private=3)
    lone.pick_servers(servers[:1], 1.0)
    lone.result(TCP, "198.51.100.1", FAILURE, 1.1)
    assert lone.verdict(TCP) is UNKNOWN


def test_servers_we_cannot_reach_are_not_waited_for() -> None:
    """Three servers known, one of them behind a NAT itself (our probe to it
    gives no evidence): the two that answered both saw us fail."""
    c = core(failures_for_private=3)
    servers = [(bytes([i]) * 20, f"198.51.100.{i}", 4001) for i in (1, 2, 3)]
    assert c.pick_servers(servers, 1.0) == [0, 1, 2]
    c.result(TCP, "198.51.100.1", FAILURE, 1.1)
    c.result(TCP, "198.51.100.2", FAILURE, 1.2)
    assert c.verdict(TCP) is UNKNOWN
    c.result(TCP, "198.51.100.3", NO_EVIDENCE, 1.3)
    assert c.verdict(TCP) is PRIVATE


def test_a_success_in_between_clears_the_failures() -> None:
    c = core(failures_for_private=2)
    c.result(TCP, "198.51.100.1", FAILURE, 1.0)
    c.result(TCP, "198.51.100.2", SUCCESS, 1.0)
    c.result(TCP, "198.51.100.3", FAILURE, 1.0)
    assert c.verdict(TCP) is PUBLIC


def test_hysteresis_public_loses_its_confidence_before_flipping() -> None:
    c = core(failures_for_private=2, max_confidence=3)
    for i in range(4):
        c.result(TCP, f"198.51.100.{i}", SUCCESS, float(i))
    assert c.confidence(TCP) == 3
    flips = []
    for i in range(10, 20):
        c.result(TCP, f"198.51.100.{i}", FAILURE, float(i))
        flips.append(c.verdict(TCP))
    # three failures drain the confidence; the fourth flips it
    assert flips[:3] == [PUBLIC] * 3 and flips[3] is PRIVATE
    c.events()
    # back to public: one verified success (a server cannot fake one)
    c.result(TCP, "198.51.100.50", SUCCESS, 30.0)
    assert c.verdict(TCP) is PUBLIC
    assert [e.new for e in c.events()] == [PUBLIC]


def test_schedule_fast_while_unknown_then_slow() -> None:
    c = core(retry_unknown=2.0, retry_unknown_max=8.0, refresh=600.0, server_cooldown=0.0)
    assert c.probe_due(0.0)
    candidates = [(bytes([i]) * 20, f"198.51.100.{i}", 4001) for i in range(5)]
    assert c.pick_servers(candidates, 0.0) == [0, 1, 2]
    waits = []
    now = 0.0
    for _ in range(4):
        waits.append(c.next_deadline() - now)
        now = c.next_deadline()
        c.pick_servers(candidates, now)
    assert waits == [2.0, 4.0, 8.0, 8.0]  # doubling up to retry_unknown_max
    c.result(TCP, "198.51.100.1", SUCCESS, now)
    c.result(UDP, "198.51.100.1", SUCCESS, now)
    c.pick_servers(candidates, now)
    assert c.next_deadline() == now + 600.0
    c.wake(now + 1)
    assert c.probe_due(now + 1)


def test_servers_are_distinct_ips_and_not_asked_again_too_soon() -> None:
    c = core(probe_servers=3, server_cooldown=30.0)
    candidates = [
        (b"a" * 20, "198.51.100.1", 1),
        (b"b" * 20, "198.51.100.1", 2),  # same IP as the first
        (b"c" * 20, "198.51.100.3", 3),
    ]
    assert c.pick_servers(candidates, 0.0) == [0, 2]
    assert c.pick_servers(candidates, 10.0) == []
    assert c.pick_servers(candidates, 31.0) == [0, 2]


def test_a_mapping_starts_over_and_names_the_port_to_dial() -> None:
    c = core(failures_for_private=1)
    c.result(TCP, "198.51.100.1", FAILURE, 1.0)
    c.result(UDP, "198.51.100.1", FAILURE, 1.0)
    assert c.verdict(TCP) is PRIVATE
    assert c.probe_ports(4001, 4001) == (4001, 4001)
    c.pick_servers([], 1.0)
    c.mapping_changed(("203.0.113.7", 40001), 5.0)
    assert c.verdict(TCP) is UNKNOWN and c.verdict(UDP) is UNKNOWN
    assert c.probe_due(5.0)
    assert c.probe_ports(4001, 4001) == (40001, 40001)
    c.result(TCP, "198.51.100.1", SUCCESS, 6.0)  # a dial-back to the mapping worked
    assert c.verdict(TCP) is PUBLIC
    c.mapping_changed(None, 7.0)
    assert c.verdict(TCP) is UNKNOWN and c.probe_ports(4001, 4001) == (4001, 4001)


def test_bad_input_is_refused() -> None:
    with pytest.raises(UsageError):
        ReachabilityConfig(probe_servers=0)
    with pytest.raises(UsageError):
        core().result("sctp", "x", SUCCESS, 0.0)


def test_a_round_short_of_servers_retries_soon_without_backoff() -> None:
    c = core(retry_unknown=2.0, probe_servers=3, server_cooldown=0.0)
    for now in (0.0, 2.0, 4.0):  # joining: fewer than 3 servers known
        assert c.probe_due(now)
        c.pick_servers([(b"a" * 20, "198.51.100.1", 1)], now)
        assert c.next_deadline() == now + 2.0


def test_a_new_server_while_short_of_them_is_asked_at_once() -> None:
    c = core(probe_servers=3, server_cooldown=30.0)
    one = [(b"a" * 20, "198.51.100.1", 1)]
    c.pick_servers(one, 0.0)
    assert c.short_of_servers
    assert not c.needs_servers(one, 0.5)  # the same server: in its cooldown
    two = [*one, (b"b" * 20, "198.51.100.2", 2)]
    assert c.needs_servers(two, 0.5)
    assert c.pick_servers(two, 0.5) == [1]
