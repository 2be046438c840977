"""DhtCore alone: several cores wired to each other in memory, a fake clock, no
sockets, no asyncio. Every datagram a scenario produced is also fed truncated and
bit-flipped to a fresh core: it is dropped and counted, never answered, never raises.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from p2pnode.clock import FakeClock
from p2pnode.dht import codec
from p2pnode.dht.config import DhtConfig
from p2pnode.dht.core import (
    CLOSED,
    MALFORMED,
    TIMEOUT,
    UNROUTABLE,
    CallAnswered,
    CallFailed,
    ContactAdded,
    ContactRemoved,
    DhtCore,
    Event,
)
from p2pnode.dht.rpc_schema import FoundValue
from p2pnode.errors import DhtClosed, UsageError

Address = tuple[str, int]
CONFIG = DhtConfig(ksize=4, rpc_timeout=1.0, request_rate=1000.0, request_burst=1000.0)


def nid(i: int) -> bytes:
    return bytes([i]) + bytes(19)


def table_changes(events: list[Event]) -> list[tuple[str, bytes]]:
    return [
        ("added" if isinstance(e, ContactAdded) else "removed", e.node.id)
        for e in events
        if isinstance(e, ContactAdded | ContactRemoved)
    ]


def outcomes(events: list[Event]) -> list[Event]:
    return [e for e in events if isinstance(e, CallAnswered | CallFailed)]


class Net:
    """Cores by address; datagrams delivered by pump(), timers run by run()."""

    def __init__(self, config: DhtConfig = CONFIG) -> None:
        self.clock = FakeClock()
        self.config = config
        self.cores: dict[Address, DhtCore] = {}
        self.events: dict[Address, list[Event]] = {}
        self.wire: list[tuple[bytes, Address, Address]] = []  # every datagram sent

    def add(self, i: int, config: DhtConfig | None = None) -> Address:
        addr = (f"10.0.0.{i}", 4000 + i)
        self.cores[addr] = DhtCore(
            nid(i), config or self.config, clock=self.clock, rng=random.Random(i)
        )
        self.events[addr] = []
        return addr

    def pump(self) -> None:
        """Deliver until nothing is left to send (datagrams to nowhere are lost)."""
        moved = True
        while moved:
            moved = False
            for addr, core in self.cores.items():
                for data, to in core.datagrams_to_send():
                    moved = True
                    self.wire.append((data, addr, to))
                    dest = self.cores.get(to)
                    if dest is not None:
                        dest.receive_datagram(data, addr, self.clock.now())
                self.events[addr].extend(core.events())

    def run(self, seconds: float, step: float = 0.05) -> None:
        """Let time pass: every core's timer fires when due."""
        end = self.clock.now() + seconds
        while True:
            self.pump()
            for core in self.cores.values():
                deadline = core.next_deadline()
                if deadline is not None and deadline <= self.clock.now():
                    core.handle_timer(self.clock.now())
            self.pump()
            if self.clock.now() >= end:
                return
            self.clock.advance(step)

    def call(
        self, src: Address, dst: Address, rpc: str, *args: object, node_id: bytes | None = None
    ) -> Event:
        core = self.cores[src]
        call_id = core.start_call(dst, rpc, args, self.clock.now(), node_id=node_id)
        for _ in range(int(self.config.rpc_timeout / 0.05) + 4):
            self.run(0)
            for event in self.events[src]:
                if isinstance(event, CallAnswered | CallFailed) and event.call_id == call_id:
                    return event
            self.clock.advance(0.05)
        raise AssertionError("the call never ended")

    def answered(self, src: Address, dst: Address, rpc: str, *args: object) -> object:
        event = self.call(src, dst, rpc, *args, node_id=self.id_of(dst))
        assert isinstance(event, CallAnswered), event
        return event.result

    def id_of(self, addr: Address) -> bytes:
        return self.cores[addr].node_id

    def knows(self, a: Address, b: Address) -> bool:
        return self.cores[a].table.node_for(self.id_of(b)) is not None


@pytest.fixture
def net() -> Net:
    return Net()


# -- the RPCs ----------------------------------------------------------------------


def test_ping_answers_the_node_id_and_admits_the_answerer(net: Net) -> None:
    a, b = net.add(1), net.add(2)
    assert net.answered(a, b, "ping") == nid(2)
    assert net.knows(a, b)  # it answered us
    assert table_changes(net.events[a]) == [("added", nid(2))]
    assert net.cores[a].last_seen(nid(2)) == net.clock.now()
    assert net.cores[a].srtt is not None


def test_requesters_enter_the_table_only_after_answering_a_verification_ping(
    net: Net,
) -> None:
    a, b = net.add(1), net.add(2)
    core_b = net.cores[b]
    core_b_id = net.cores[a].start_call(b, "ping", (), net.clock.now())
    net.pump()  # b answered and queued a's address for verification; it waits for its timer
    assert [e.call_id for e in net.events[a] if isinstance(e, CallAnswered)] == [core_b_id]
    assert not net.knows(b, a)
    assert core_b.snapshot()["verify_queue"] == 1
    assert core_b.next_deadline() == net.clock.now()  # due at once
    net.run(0)
    assert net.knows(b, a)
    assert core_b.stats["rpc_sent.ping"] == 1


def test_a_spoofed_requester_never_enters_the_table(net: Net) -> None:
    b = net.add(2)
    spoofed = ("10.9.9.9", 9999)  # nobody there answers the verification ping
    net.cores[b].receive_datagram(
        codec.encode_request(b"m" * 20, "find_node", [nid(9), nid(3)]), spoofed, 0.0
    )
    net.run(CONFIG.rpc_timeout + 0.1)
    assert net.cores[b].table.all_nodes() == []
    assert net.cores[b].stats["rpc_timeout.ping"] == 1


def test_find_node_lists_known_contacts(net: Net) -> None:
    a, b, c = net.add(1), net.add(2), net.add(3)
    net.answered(b, c, "ping")
    found = net.answered(a, b, "find_node", nid(3))
    assert isinstance(found, list)
    assert [(n.id, n.ip, n.port) for n in found] == [(nid(3), *c)]
    listed = net.answered(c, b, "find_node", nid(3))
    assert isinstance(listed, list)
    assert nid(3) not in [n.id for n in listed]  # never the requester itself


def test_store_then_find_value(net: Net) -> None:
    a, b = net.add(1), net.add(2)
    key = nid(50)
    assert net.answered(a, b, "store", key, b"value") is True
    assert net.cores[b].storage.get(key) == b"value"
    assert net.answered(a, b, "find_value", key) == FoundValue(b"value")
    assert isinstance(net.answered(a, b, "find_value", nid(51)), list)  # nodes instead
    assert net.cores[b].stats["stores_accepted"] == 1


def test_add_provider_then_get_providers_uses_the_source_ip(net: Net) -> None:
    a, b, c = net.add(1), net.add(2), net.add(3)
    key = nid(60)
    event = net.call(a, b, "add_provider", key, 7001)
    assert isinstance(event, CallAnswered) and event.result is True
    answer = net.answered(c, b, "get_providers", key)
    assert isinstance(answer, tuple)
    providers, _nodes = answer
    assert [(p.node_id, p.host, p.port) for p in providers] == [(nid(1), a[0], 7001)]


def test_stun_answers_the_source_address(net: Net) -> None:
    a, b = net.add(1), net.add(2)
    assert net.answered(a, b, "stun") == a


# -- failures ----------------------------------------------------------------------


def test_a_call_nobody_answers_times_out_at_its_deadline(net: Net) -> None:
    a = net.add(1)
    core = net.cores[a]
    start = net.clock.now()
    call_id = core.start_call(("10.0.0.99", 5000), "find_node", (nid(5),), start)
    assert core.next_deadline() == start + CONFIG.rpc_timeout
    core.handle_timer(start + CONFIG.rpc_timeout - 0.01)
    assert core.events() == []
    core.handle_timer(start + CONFIG.rpc_timeout)
    assert core.events() == [CallFailed(call_id, TIMEOUT)]
    assert core.stats["rpc_timeout.find_node"] == 1
    assert core.next_deadline() is None


def test_answers_from_another_address_are_ignored(net: Net) -> None:
    a, b = net.add(1), net.add(2)
    core = net.cores[a]
    call_id = core.start_call(b, "ping", (), net.clock.now())
    [(request, _)] = core.datagrams_to_send()
    net.cores[b].receive_datagram(request, a, net.clock.now())
    [(reply, _)] = net.cores[b].datagrams_to_send()
    core.receive_datagram(reply, ("10.6.6.6", b[1]), net.clock.now())
    core.receive_datagram(reply, (b[0], b[1] + 1), net.clock.now())
    assert core.stats["dropped.wrong_source"] == 2
    assert core.events() == []
    core.receive_datagram(reply, b, net.clock.now())  # the right one still counts
    assert outcomes(core.events()) == [CallAnswered(call_id, nid(2))]
    core.receive_datagram(reply, b, net.clock.now())  # ... once
    assert core.stats["dropped.unsolicited_response"] == 1


def test_an_undecodable_answer_ends_the_call_at_once(net: Net) -> None:
    a, b = net.add(1), net.add(2)
    net.answered(a, b, "ping")
    core = net.cores[a]
    call_id = core.start_call(b, "find_node", (nid(7),), net.clock.now(), node_id=nid(2))
    [(request, _)] = core.datagrams_to_send()
    core.receive_datagram(b"\x01" + request[1:21] + b"\xc1", b, net.clock.now())
    assert core.events() == [CallFailed(call_id, MALFORMED)]
    assert core.failures(nid(2)) == 1
    assert core.stats["dropped.undecodable"] == 1


def test_cancelled_calls_are_forgotten(net: Net) -> None:
    a, b = net.add(1), net.add(2)
    core = net.cores[a]
    call_id = core.start_call(b, "ping", (), net.clock.now())
    core.cancel_call(call_id)
    net.run(CONFIG.rpc_timeout + 0.1)
    assert core.stats["dropped.unsolicited_response"] == 1
    assert not [e for e in net.events[a] if isinstance(e, CallAnswered | CallFailed)]
    assert core.stats["rpc_timeout.ping"] == 0


def test_evicted_after_max_failures_not_after_one(net: Net) -> None:
    a, b = net.add(1), net.add(2)
    net.answered(a, b, "ping")
    core_b = net.cores.pop(b)  # b goes silent
    for expected in (1, 2):
        event = net.call(a, b, "find_node", nid(9), node_id=nid(2))
        assert event == CallFailed(event.call_id, TIMEOUT)
        assert net.cores[a].failures(nid(2)) == expected
        assert net.cores[a].table.node_for(nid(2)) is not None
    net.cores[b] = core_b  # back: one answer resets the count
    net.answered(a, b, "find_node", nid(9))
    assert net.cores[a].failures(nid(2)) == 0
    del net.cores[b]
    for _ in range(3):
        net.call(a, b, "find_node", nid(9), node_id=nid(2))
    assert net.cores[a].table.node_for(nid(2)) is None
    assert net.cores[a].stats["evictions"] == 1
    assert table_changes(net.events[a]) == [("added", nid(2)), ("removed", nid(2))]


def test_timeouts_of_our_own_rpcs_do_not_evict(net: Net) -> None:
    a, b = net.add(1), net.add(2)
    net.answered(a, b, "ping")
    del net.cores[b]
    for _ in range(5):
        net.call(a, b, "get_providers", nid(9), node_id=nid(2))
        net.call(a, b, "add_provider", nid(9), 4001, node_id=nid(2))
    assert net.cores[a].failures(nid(2)) == 0
    assert net.cores[a].table.node_for(nid(2)) is not None


def test_malformed_answers_count_as_failures(net: Net) -> None:
    a = net.add(1)
    core = net.cores[a]
    peer = ("10.0.0.2", 4002)
    call_id = core.start_call(peer, "ping", (), 0.0)
    [(request, _)] = core.datagrams_to_send()
    core.receive_datagram(codec.encode_response(request[1:21], nid(2)), peer, 0.0)
    assert outcomes(core.events()) == [CallAnswered(call_id, nid(2))]
    for _ in range(3):
        call_id = core.start_call(peer, "find_node", (nid(5),), 0.0, node_id=nid(2))
        [(request, _)] = core.datagrams_to_send()
        core.receive_datagram(codec.encode_response(request[1:21], "junk"), peer, 0.0)
        assert outcomes(core.events()) == [CallFailed(call_id, MALFORMED)]
    assert core.table.node_for(nid(2)) is None
    assert core.stats["dropped.bad_response"] == 3


def test_unroutable_and_closed(net: Net) -> None:
    a = net.add(1)
    core = net.cores[a]
    call_id = core.start_call(("2001:db8::1", 4000), "ping", (), 0.0)
    assert core.events() == [CallFailed(call_id, UNROUTABLE)]
    call_id = core.start_call(("not-an-ip", 4000), "ping", (), 0.0)
    assert core.events() == [CallFailed(call_id, UNROUTABLE)]
    with pytest.raises(UsageError):
        core.start_call(("10.0.0.2", 4000), "shutdown", (), 0.0)
    with pytest.raises(UsageError):
        core.start_call(("10.0.0.2", 4000), "store", (nid(3), b"x" * 9000), 0.0)
    pending = core.start_call(("10.0.0.2", 4000), "ping", (), 0.0)
    core.close()
    assert core.events() == [CallFailed(pending, CLOSED)]
    assert core.datagrams_to_send() == []
    with pytest.raises(DhtClosed):
        core.start_call(("10.0.0.2", 4000), "ping", (), 0.0)


def test_an_ipv6_socket_sends_to_mapped_ipv4(net: Net) -> None:
    a = net.add(1)
    core = net.cores[a]
    core.ipv6_socket = True
    core.start_call(("10.0.0.2", 4000), "ping", (), 0.0)
    assert core.datagrams_to_send()[0][1] == ("::ffff:10.0.0.2", 4000)
    core.receive_datagram(codec.encode_request(b"r" * 20, "stun", []), ("::ffff:10.0.0.3", 7), 0)
    assert core.datagrams_to_send()[0][1] == ("::ffff:10.0.0.3", 7)


# -- limits and queues -------------------------------------------------------------


def test_requests_are_rate_limited_per_source_ip() -> None:
    net = Net(replace(CONFIG, request_rate=1.0, request_burst=5.0))
    b = net.add(2)
    core = net.cores[b]
    for _ in range(20):
        core.receive_datagram(codec.encode_request(b"r" * 20, "stun", []), ("10.0.0.5", 1), 0.0)
    core.receive_datagram(codec.encode_request(b"r" * 20, "stun", []), ("10.0.0.6", 1), 0.0)
    assert core.stats["dropped.rate_limited"] == 15
    assert len(core.datagrams_to_send()) == 6
    net.clock.advance(2.0)
    for _ in range(3):
        core.receive_datagram(codec.encode_request(b"r" * 20, "stun", []), ("10.0.0.5", 1), 0.0)
    assert len(core.datagrams_to_send()) == 2
    assert core.stats["dropped.rate_limited"] == 16


def test_verification_queue_is_bounded_and_paced() -> None:
    net = Net(replace(CONFIG, verify_queue_max=16, verify_concurrency=4))
    b = net.add(2)
    core = net.cores[b]
    for i in range(1000):
        request = codec.encode_request(b"r" * 20, "ping", [(1000 + i).to_bytes(20, "big")])
        core.receive_datagram(request, ("10.0.1.1", 10_000 + i), 0.0)
    assert core.stats["verify_dropped"] == 1000 - 16
    core.datagrams_to_send()
    core.handle_timer(0.0)
    assert len(core.datagrams_to_send()) == 4  # verify_concurrency in flight
    assert core.next_deadline() == CONFIG.rpc_timeout  # nothing more until one ends
    core.handle_timer(CONFIG.rpc_timeout)  # four time out, four slots free
    core.handle_timer(CONFIG.rpc_timeout)
    assert len(core.datagrams_to_send()) == 4
    assert core.table.all_nodes() == []


def test_welcome_queue_stores_values_on_new_close_nodes_at_its_rate() -> None:
    net = Net(replace(CONFIG, ksize=20, welcome_queue_max=3, welcome_store_rate=2.0))
    a = net.add(1)
    core = net.cores[a]
    for i in range(5):  # keys next to a's own id: a is always the closest to them
        core.storage.put(nid(1)[:19] + bytes([i + 1]), f"value {i}")
    b = net.add(2)
    net.answered(a, b, "ping")
    assert core.stats["welcome_queued"] == 3
    assert core.stats["welcome_dropped"] == 1
    net.run(0)
    assert len(net.cores[b].storage) == 1  # the first at once ...
    net.run(0.45)
    assert len(net.cores[b].storage) == 1
    net.run(0.1)  # ... then one per 1 / welcome_store_rate
    assert len(net.cores[b].storage) == 2
    net.run(1.0)
    assert len(net.cores[b].storage) == 3
    assert core.stats["welcome_sent"] == 3
    net.answered(a, b, "ping")  # welcomed once per node
    assert core.stats["welcome_queued"] == 3


def test_full_bucket_pings_its_head_and_keeps_it_when_it_answers() -> None:
    net = Net(replace(CONFIG, ksize=2))
    me = net.add(0x80)
    core = net.cores[me]
    # 0x81.. and 0x85.. share 5 leading bits: once their bucket (without our id,
    # 0x80 00..) is full it does not split but pings its head (section 4.2).
    first, second, third = (net.add(b) for b in (0x81, 0x85, 0x90))
    net.answered(me, first, "ping")
    net.answered(me, second, "ping")
    net.answered(me, third, "ping")
    assert core.table.node_for(nid(0x90)) is None  # waits in the replacement list
    net.run(0)
    # The head was pinged, answered, and stays (third's own verification of us
    # made third answer again, so the new head was pinged too).
    pinged = [to for data, src, to in net.wire if src == me and b"ping" in data]
    assert pinged[:4] == [first, second, third, first]
    assert sorted(n.id for n in core.table.all_nodes()) == [nid(0x81), nid(0x85)]
    assert core.stats["evictions"] == 0
    assert core.snapshot()["head_pings"] == 0


def test_refresh_ids_fall_in_buckets_not_looked_up(net: Net) -> None:
    a = net.add(1)
    for i in (60, 120, 180):
        net.answered(a, net.add(i), "ping")
    core = net.cores[a]
    assert core.refresh_ids(net.clock.now()) == []
    net.clock.advance(CONFIG.refresh_interval)
    ids = core.refresh_ids(net.clock.now())
    assert len(ids) == len(core.table.buckets)
    for rid, bucket in zip(ids, core.table.buckets, strict=True):
        assert bucket.range[0] <= int.from_bytes(rid, "big") <= bucket.range[1]


def test_same_seed_same_datagrams() -> None:
    def scenario() -> list[tuple[bytes, Address, Address]]:
        net = Net()
        a, b, c = net.add(1), net.add(2), net.add(3)
        net.answered(b, c, "ping")
        net.answered(a, b, "find_node", nid(3))
        net.answered(a, b, "store", nid(40), 5)
        net.run(1.0)
        return net.wire

    assert scenario() == scenario()


# -- every input, also as garbage --------------------------------------------------


def recorded_wire() -> list[tuple[bytes, Address, Address]]:
    net = Net()
    a, b, c = net.add(1), net.add(2), net.add(3)
    net.answered(b, c, "ping")
    net.answered(a, b, "find_node", nid(3))
    net.answered(a, b, "store", nid(40), "text")
    net.answered(a, b, "find_value", nid(40))
    net.answered(a, b, "find_value", nid(41))
    net.call(a, b, "add_provider", nid(42), 4001, node_id=nid(2))
    net.answered(a, b, "get_providers", nid(42))
    net.answered(a, b, "stun")
    net.run(0.5)
    return net.wire


WIRE = recorded_wire()


def test_the_recorded_scenario_covers_every_rpc() -> None:
    names = set()
    for data, _, _ in WIRE:
        message = codec.decode_datagram(data, codec.Limits())
        if isinstance(message, codec.Request):
            names.add(message.name)
    assert names == {"ping", "find_node", "store", "find_value", "add_provider"} | {
        "get_providers",
        "stun",
    }


def test_truncated_and_flipped_datagrams_are_dropped_unanswered() -> None:
    rng = random.Random(7)
    net = Net()
    target = net.add(9)
    core = net.cores[target]
    source = ("10.0.0.1", 4001)
    sent = 0
    for data, _, _ in WIRE:
        garbage = [data[:cut] for cut in range(len(data))]
        for _ in range(20):
            flipped = bytearray(data)
            flipped[rng.randrange(codec.HEADER_LEN, len(data))] ^= 1 << rng.randrange(8)
            garbage.append(bytes(flipped))
        garbage.append(data + b"\x00")
        for junk in garbage:
            before = core.stats["datagrams_received"]
            core.receive_datagram(junk, source, 0.0)
            assert core.stats["datagrams_received"] == before + 1
            sent += len(core.datagrams_to_send())
    dropped = sum(v for k, v in core.stats.items() if k.startswith("dropped."))
    answered = sum(v for k, v in core.stats.items() if k.startswith("rpc_received."))
    # A flipped bit may still leave a valid request (another key, say): those are
    # answered; everything else is dropped and counted.
    assert dropped + answered == core.stats["datagrams_received"]
    assert sent == answered
    assert core.table.all_nodes() == []


def test_truncated_answers_end_the_call_as_malformed(net: Net) -> None:
    for data, _src, _dst in WIRE:
        if data[0] != codec.RESPONSE:
            continue
        for cut in range(codec.HEADER_LEN + 1, len(data)):
            core = DhtCore(nid(1), CONFIG, clock=net.clock, rng=random.Random(cut))
            peer = ("10.0.0.2", 4002)
            call_id = core.start_call(peer, "find_value", (nid(5),), 0.0)
            [(request, _)] = core.datagrams_to_send()
            core.receive_datagram(data[:1] + request[1:21] + data[21:cut], peer, 0.0)
            assert core.events() == [CallFailed(call_id, MALFORMED)]


def test_bad_source_addresses_are_dropped(net: Net) -> None:
    core = net.cores[net.add(1)]
    request = codec.encode_request(b"r" * 20, "ping", [nid(5)])
    for addr in [(), ("not-an-ip", 5), ("10.0.0.1", 0), ("10.0.0.1",), ("0.0.0.0", 5)]:
        core.receive_datagram(request, addr, 0.0)
    assert core.stats["dropped.bad_source"] == 5
    assert core.datagrams_to_send() == []


def test_each_contact_keeps_a_smoothed_round_trip_time(net: Net) -> None:
    a, b = net.add(1), net.add(2)
    core_a, core_b = net.cores[a], net.cores[b]
    for one_way in (0.02, 0.06):
        core_a.start_call(b, "ping", (), net.clock.now(), node_id=nid(2))
        [(ping, _)] = core_a.datagrams_to_send()
        net.clock.advance(one_way)
        core_b.receive_datagram(ping, a, net.clock.now())
        answer = next(d for d, to in core_b.datagrams_to_send() if to == a)
        net.clock.advance(one_way)
        core_a.receive_datagram(answer, b, net.clock.now())
        core_a.events()
    # 40 ms, then 120 ms smoothed in at a quarter's weight
    assert core_a.rtt(nid(2)) == pytest.approx(0.75 * 0.04 + 0.25 * 0.12)
    assert core_a.rtt(nid(3)) is None
