"""The port mapping core: when it tries, renews, retries and gives up (time is
passed in; no sockets)."""

from __future__ import annotations

import math

import pytest

from p2pnode.errors import UsageError
from p2pnode.nat.portmap_core import (
    Action,
    ActionKind,
    Lease,
    Method,
    PortMapConfig,
    PortMapCore,
    Proto,
    behind_another_nat,
)

PORT = 4001
CONFIG = PortMapConfig(lease=100, retry_initial=10.0, retry_max=35.0, renew_retry=5.0)


def lease(proto: Proto, now: float, lifetime: int = 100, port: int = PORT) -> Lease:
    return Lease(proto, Method.NATPMP, PORT, "203.0.113.2", port, lifetime, now)


def mapped_core(now: float = 0.0, lifetime: int = 100) -> PortMapCore:
    core = PortMapCore(CONFIG, PORT)
    core.start(now)
    assert core.due(now) == [Action(ActionKind.ATTEMPT)]
    core.attempt_done(now, [lease(Proto.TCP, now, lifetime), lease(Proto.UDP, now, lifetime)])
    return core


def test_start_asks_for_one_attempt_at_a_time() -> None:
    core = PortMapCore(CONFIG, PORT)
    assert core.due(0.0) == []  # not started
    core.start(5.0)
    assert core.next_deadline() == 5.0
    assert core.due(5.0) == [Action(ActionKind.ATTEMPT)]
    # In flight: nothing more, and nothing to wake up for.
    assert core.due(6.0) == []
    assert core.next_deadline() is None
    assert core.counters["attempts"] == 1


def test_a_mapping_is_renewed_at_half_its_lifetime() -> None:
    core = mapped_core(now=0.0)
    assert core.external_address() == ("203.0.113.2", PORT)
    assert core.next_deadline() == 50.0
    assert core.due(49.9) == []
    renewals = core.due(50.0)
    assert [(a.kind, a.lease.proto if a.lease else None) for a in renewals] == [
        (ActionKind.RENEW, Proto.TCP),
        (ActionKind.RENEW, Proto.UDP),
    ]
    assert core.due(50.5) == []  # in flight
    for proto in (Proto.TCP, Proto.UDP):
        core.renew_done(51.0, lease(proto, 51.0))
    assert core.next_deadline() == 101.0
    assert core.counters["renewals_ok"] == 2


def test_a_failed_renewal_is_retried_until_the_lease_expires_then_a_new_attempt() -> None:
    core = mapped_core(now=0.0)
    now = 50.0
    for _ in range(20):  # bounded: the lease ends at 100
        actions = core.due(now)
        if any(a.kind is ActionKind.ATTEMPT for a in actions):
            break
        for action in actions:
            assert action.kind is ActionKind.RENEW and action.lease is not None
            core.renew_failed(now, action.lease.proto)
        deadline = core.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
    else:
        raise AssertionError("never gave up on the lease")
    # Retries every renew_retry (5 s) from 50 s, then expiry at 100 s.
    assert now == 100.0
    assert core.leases == {}
    assert core.external_address() is None
    assert core.counters["leases_expired"] == 2
    assert core.counters["renewals_failed"] == 2 * 10


def test_a_renewal_retry_never_goes_past_expiry() -> None:
    core = mapped_core(now=0.0)
    core.due(50.0)
    core.renew_failed(98.0, Proto.TCP)
    core.renew_failed(98.0, Proto.UDP)
    assert core.next_deadline() == 100.0  # not 103


def test_failed_attempts_back_off_doubling_up_to_the_cap() -> None:
    core = PortMapCore(CONFIG, PORT)
    core.start(0.0)
    now, waits = 0.0, []
    for _ in range(5):
        assert core.due(now) == [Action(ActionKind.ATTEMPT)]
        core.attempt_done(now, [])  # no router answered
        deadline = core.next_deadline()
        assert deadline is not None
        waits.append(deadline - now)
        now = deadline
    assert waits == [10.0, 20.0, 35.0, 35.0, 35.0]
    assert core.counters["attempts_failed"] == 5
    # A success resets the backoff.
    core.due(now)
    core.attempt_done(now, [lease(Proto.TCP, now)])
    core.leases.clear()
    core._renew_due.clear()
    core.due(now + 1)  # no lease left: a new attempt at once
    core.attempt_failed(now + 1)
    assert core.next_deadline() == now + 1 + 10.0


def test_a_partial_mapping_counts_as_mapped() -> None:
    core = PortMapCore(CONFIG, PORT)
    core.start(0.0)
    core.due(0.0)
    core.attempt_done(0.0, [lease(Proto.UDP, 0.0)])
    assert core.counters["attempts_mapped"] == 1
    assert core.external_address() is None  # TCP is what others dial
    assert list(core.leases) == [Proto.UDP]


def test_a_permanent_mapping_is_never_renewed() -> None:
    core = mapped_core(now=0.0, lifetime=0)
    assert core.next_deadline() is None
    assert core.due(1e9) == []
    assert all(item.expires_at == math.inf for item in core.leases.values())
    assert [row["lease_remaining"] for row in core.snapshot(5.0)] == [None, None]


def test_stop_hands_back_every_lease_and_plans_nothing_more() -> None:
    core = mapped_core(now=0.0)
    removed = core.stop()
    assert sorted(item.proto for item in removed) == [Proto.TCP, Proto.UDP]
    assert core.leases == {}
    assert core.due(1000.0) == []
    assert core.next_deadline() is None
    # An attempt or renewal that ends after stop changes nothing.
    core.attempt_done(1000.0, [lease(Proto.TCP, 1000.0)])
    core.renew_done(1000.0, lease(Proto.TCP, 1000.0))
    assert core.leases == {}


def test_the_router_may_give_another_port_and_address() -> None:
    core = mapped_core(now=0.0)
    core.due(50.0)
    moved = Lease(Proto.TCP, Method.UPNP, PORT, "198.51.100.9", 40001, 100, 50.0)
    core.renew_done(50.0, moved)
    assert core.external_address() == ("198.51.100.9", 40001)


def test_snapshot_shows_what_status_prints() -> None:
    core = mapped_core(now=0.0)
    rows = core.snapshot(30.0)
    assert rows[0] == {
        "protocol": "tcp",
        "method": "natpmp",
        "internal_port": PORT,
        "external": f"203.0.113.2:{PORT}",
        "lease_remaining": 70.0,
    }
    assert rows[1]["protocol"] == "udp"


def test_config_checks_its_fields() -> None:
    assert PortMapConfig(methods=("natpmp",)).methods == (Method.NATPMP,)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="methods"):
        PortMapConfig(methods=("smoke-signals",))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="methods"):
        PortMapConfig(methods=())
    with pytest.raises(UsageError, match="lease"):
        PortMapConfig(lease=0)
    with pytest.raises(UsageError, match="retry_initial"):
        PortMapConfig(retry_initial=-1.0)


@pytest.mark.parametrize(
    ("ip", "inner"),
    [
        ("100.64.0.1", True),  # carrier-grade NAT
        ("192.168.1.1", True),
        ("10.1.2.3", True),
        ("172.31.0.1", True),
        ("203.0.113.2", False),  # the lab's "public" range
        ("8.8.8.8", False),
        ("not an address", False),
    ],
)
def test_a_router_behind_another_nat_is_recognised(ip: str, inner: bool) -> None:
    assert behind_another_nat(ip) is inner
