"""ConnectionBudget and subnet_of: pure, no sockets."""

from __future__ import annotations

from collections import Counter

from p2pnode.net.budget import ConnectionBudget
from p2pnode.net.config import NetLimits
from p2pnode.net.memory import MemoryBudget
from p2pnode.subnets import subnet_of


def test_subnets() -> None:
    assert subnet_of("192.0.2.7") == subnet_of("192.0.2.200") == "192.0.2.0/24"
    assert subnet_of("192.0.3.7") != subnet_of("192.0.2.7")
    assert subnet_of("2001:db8::1") == subnet_of("2001:db8::ffff:1") == "2001:db8::/64"
    assert subnet_of("2001:db8:0:1::1") != subnet_of("2001:db8::1")
    assert subnet_of("::ffff:192.0.2.9") == "192.0.2.0/24"
    assert subnet_of("fe80::1%eth0") == "fe80::/64"
    assert subnet_of("?") == "?"


def test_handshake_budget_evicts_the_oldest() -> None:
    counters: Counter[str] = Counter()
    budget: ConnectionBudget[str] = ConnectionBudget(NetLimits(max_handshakes=2), counters)
    assert budget.admit_inbound("a", "192.0.2.1") == (True, None)
    assert budget.admit_inbound("b", "198.51.100.1") == (True, None)
    assert budget.admit_inbound("c", "203.0.113.1") == (True, "a")
    assert counters["evicted_handshakes"] == 1
    budget.established("b")  # its handshake slot is free again
    assert budget.admit_inbound("d", "203.0.113.2") == (True, None)
    assert (budget.handshaking, budget.inbound) == (2, 3)
    budget.release("a")  # the evicted one's transport goes later: idempotent
    assert budget.inbound == 3


def test_per_subnet_and_per_ip_limits() -> None:
    limits = NetLimits(
        max_connections_per_ip=2, max_handshakes_per_subnet=3, max_connections_per_subnet=4
    )
    counters: Counter[str] = Counter()
    budget: ConnectionBudget[int] = ConnectionBudget(limits, counters)
    assert budget.admit_inbound(1, "192.0.2.1")[0]
    assert budget.admit_inbound(2, "192.0.2.1")[0]
    assert not budget.admit_inbound(3, "192.0.2.1")[0]
    assert counters["rejected_per_ip"] == 1
    assert budget.admit_inbound(4, "192.0.2.2")[0]
    assert not budget.admit_inbound(5, "192.0.2.3")[0]
    assert counters["rejected_handshakes_per_subnet"] == 1
    for conn in (1, 2, 4):
        budget.established(conn)
    assert budget.admit_inbound(6, "192.0.2.3")[0]
    assert not budget.admit_inbound(7, "192.0.2.4")[0]
    assert counters["rejected_per_subnet"] == 1
    assert budget.admit_inbound(8, "198.51.100.1")[0]  # another subnet is unaffected
    for conn in (1, 2, 4, 6, 8):
        budget.release(conn)
    assert (budget.inbound, budget.handshaking) == (0, 0)


def test_total_inbound_and_outbound_apart() -> None:
    counters: Counter[str] = Counter()
    budget: ConnectionBudget[int] = ConnectionBudget(
        NetLimits(max_connections=1, max_outbound=1), counters
    )
    assert budget.admit_inbound(1, "192.0.2.1")[0]
    assert not budget.admit_inbound(2, "198.51.100.1")[0]
    assert counters["rejected_max_connections"] == 1
    assert budget.add_outbound(3)  # inbound being full does not stop a dial
    assert budget.outbound_full
    assert not budget.add_outbound(4)
    assert counters["rejected_max_connections_out"] == 1
    budget.release(3)
    assert budget.add_outbound(4)


def test_memory_budget_system_and_peer_scopes() -> None:
    counters: Counter[str] = Counter()
    memory = MemoryBudget(total=100, per_peer=60, counters=counters)
    assert memory.try_reserve(b"a", 60)
    assert not memory.try_reserve(b"a", 1)  # a's share is used up
    assert memory.try_reserve(b"b", 40)
    assert not memory.try_reserve(b"c", 1)  # the system is full
    assert counters["rejected_memory"] == 2
    memory.track(b"c", 30)  # accounting only (a write buffer): may go over
    assert (memory.used, memory.peak, memory.peer_used(b"c")) == (130, 130, 30)
    memory.release(b"a", 60)
    memory.track(b"c", -30)
    assert not memory.try_reserve(b"b", 21)
    assert memory.try_reserve(b"b", 20)
    memory.release(b"b", 60)
    assert (memory.used, memory.peer_used(b"b"), memory.peak) == (0, 0, 130)
