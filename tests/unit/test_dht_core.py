"""DhtCore alone: several cores wired to each other in memory, a fake clock, no
sockets, no asyncio. Every datagram a scenario produced is also fed truncated and
bit-flipped to a fresh core: it is dropped and counted, never answered, never raises.

Nodes have identities (``ident(i)``, repeatable) so they can prove their ids; each
sits in its own /24 (``10.0.i.1``) so the routing table's per-subnet caps stay out
of the way unless a test wants them. Where XOR distances matter, ids are picked
among known identities (``pick_ids``). Stock kademlia nodes are cores that never
answer (nor send) our own RPCs (``Net.add(..., stock=True)``).
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Callable
from dataclasses import replace

import pytest
from kademlia.node import Node

from p2pnode.clock import FakeClock
from p2pnode.dht import codec, proof
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
from p2pnode.dht.records import ProviderRecord, sign_provider_record
from p2pnode.dht.rpc_schema import EXTRA_RPCS, FoundValue, IdentifyAnswer
from p2pnode.errors import DhtClosed, UsageError
from p2pnode.identity import Identity

Address = tuple[str, int]
CONFIG = DhtConfig(ksize=4, rpc_timeout=1.0, request_rate=1000.0, request_burst=1000.0)


@functools.cache
def ident(i: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"test_dht_core %d" % i).digest())


def nid(i: int) -> bytes:
    """The node id of identity ``i``."""
    return ident(i).node_id


def kid(i: int) -> bytes:
    """A DHT key (not a node's id)."""
    return bytes([i]) + bytes(19)


def bit(node_id: bytes, index: int) -> int:
    return (int.from_bytes(node_id, "big") >> (159 - index)) & 1


def shared_bits(x: bytes, y: bytes) -> int:
    return 160 - (int.from_bytes(x, "big") ^ int.from_bytes(y, "big")).bit_length()


def pick_ids(count: int, fits: Callable[[list[bytes]], bool], start: int = 1) -> list[int]:
    """The first identity indices (from ``start``, in order) such that ``fits``
    holds for each prefix of the ids chosen: ids with a wanted XOR layout."""
    chosen: list[int] = []
    i = start
    while len(chosen) < count:
        if fits([nid(c) for c in chosen] + [nid(i)]):
            chosen.append(i)
        i += 1
        assert i < start + 10_000, "no identity fits"
    return chosen


def table_changes(events: list[Event]) -> list[tuple[str, bytes]]:
    return [
        ("added" if isinstance(e, ContactAdded) else "removed", e.node.id)
        for e in events
        if isinstance(e, ContactAdded | ContactRemoved)
    ]


def outcomes(events: list[Event]) -> list[Event]:
    return [e for e in events if isinstance(e, CallAnswered | CallFailed)]


def request_name(data: bytes) -> str | None:
    if data[:1] != b"\x00":
        return None
    message = codec.decode_datagram(data, codec.Limits())
    assert isinstance(message, codec.Request)
    return message.name


def take_request(core: DhtCore, name: str) -> tuple[bytes, tuple[object, ...]]:
    """The one ``name`` request ``core`` has to send (others are discarded):
    (message id, args)."""
    found = []
    for data, _ in core.datagrams_to_send():
        message = codec.decode_datagram(data, codec.Limits())
        if isinstance(message, codec.Request) and message.name == name:
            found.append((message.msg_id, message.args))
    assert len(found) == 1, found
    return found[0]


class Net:
    """Cores by address; datagrams delivered by pump(), timers run by run()."""

    def __init__(self, config: DhtConfig = CONFIG) -> None:
        self.clock = FakeClock()
        self.config = config
        self.cores: dict[Address, DhtCore] = {}
        self.events: dict[Address, list[Event]] = {}
        self.wire: list[tuple[bytes, Address, Address]] = []  # every datagram sent
        self.stock: set[Address] = set()  # nodes that speak only kademlia's RPCs

    def add(
        self, i: int, config: DhtConfig | None = None, *, stock: bool = False, host: str = ""
    ) -> Address:
        addr = (host or f"10.0.{i}.1", 4000 + i)
        self.cores[addr] = DhtCore(
            ident(i), config or self.config, clock=self.clock, rng=random.Random(i)
        )
        self.events[addr] = []
        if stock:
            self.stock.add(addr)
        return addr

    def _lost(self, data: bytes, src: Address, to: Address) -> bool:
        """A stock node neither answers nor sends our own RPCs."""
        if to not in self.stock and src not in self.stock:
            return False
        name = request_name(data)
        if to in self.stock and name in EXTRA_RPCS:
            return True
        return src in self.stock and name == "identify"

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
                    if dest is not None and not self._lost(data, addr, to):
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

    def node(self, addr: Address) -> Node:
        return Node(self.id_of(addr), addr[0], addr[1])

    def knows(self, a: Address, b: Address) -> bool:
        return self.cores[a].table.node_for(self.id_of(b)) is not None

    def token(self, a: Address, b: Address) -> bytes:
        """The token ``b`` gave ``a`` (``a`` must have had ``b`` prove its id)."""
        token = self.cores[a].token_from(self.node(b), self.clock.now())
        assert token is not None, "no token: b never proved its id to a"
        return token

    def store(self, a: Address, b: Address, key: bytes, value: object) -> object:
        """``a`` stores at ``b`` with the token ``b`` gave it."""
        return self.answered(a, b, "store", key, value, self.token(a, b))

    def record(
        self, a: Address, key: bytes, port: int, host: str | None = None, seq: int = 1
    ) -> ProviderRecord:
        """A provider record signed by ``a``'s identity (at ``a``'s IP by default)."""
        expires = int(self.clock.now()) + 3600
        core = self.cores[a]
        return sign_provider_record(core.identity, key, [(host or a[0], port)], seq, expires)

    def add_provider(self, a: Address, b: Address, record: ProviderRecord) -> object:
        token = self.token(a, b)
        return self.answered(a, b, "add_provider", record.key, record.to_wire(), token)


@pytest.fixture
def net() -> Net:
    return Net()


# -- the RPCs ----------------------------------------------------------------------


def test_ping_answers_the_node_id_and_admits_the_answerer(net: Net) -> None:
    """The answerer enters a's table at once (unproven), is asked to prove its id
    (identify), and is proven once it did: still one ContactAdded."""
    a, b = net.add(1), net.add(2)
    assert net.answered(a, b, "ping") == nid(2)
    assert net.knows(a, b)  # it answered us
    assert table_changes(net.events[a]) == [("added", nid(2))]
    assert net.cores[a].last_seen(nid(2)) == net.clock.now()
    assert net.cores[a].srtt is not None
    sent = [request_name(d) for d, src, to in net.wire if src == a and to == b]
    assert [n for n in sent if n] == ["ping", "identify"]
    assert net.cores[a].is_proven(net.node(b))
    assert net.cores[a].table.is_proven(nid(2))
    assert net.cores[a].stats["proofs_ok"] == 1
    assert net.cores[b].stats["identify_answered"] >= 1


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
    # ... and then asked to prove its id, which it did.
    assert core_b.stats["rpc_sent.identify"] == 1
    assert core_b.table.is_proven(nid(1))


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
    """A store carries the token b gave a in its identify answer (a asked for it
    when b answered a's ping); without one it is refused (see the token tests)."""
    a, b = net.add(1), net.add(2)
    net.answered(a, b, "ping")
    key = kid(50)
    assert net.store(a, b, key, b"value") is True
    assert net.cores[b].storage.get(key) == b"value"
    assert net.answered(a, b, "find_value", key) == FoundValue(b"value")
    assert isinstance(net.answered(a, b, "find_value", kid(51)), list)  # nodes instead
    assert net.cores[b].stats["stores_accepted"] == 1


def test_add_provider_then_get_providers_gives_the_signed_record(net: Net) -> None:
    """The provider record is signed by a and names a's own IP (the source
    address); get_providers hands it out verified, with a token for the asker."""
    a, b, c = net.add(1), net.add(2), net.add(3)
    net.answered(a, b, "ping")
    key = kid(60)
    record = net.record(a, key, 7001)
    assert net.add_provider(a, b, record) is True
    answer = net.answered(c, b, "get_providers", key)
    assert isinstance(answer, tuple)
    providers, _nodes, token = answer
    assert providers == [record]
    assert [(p.peer_id, p.addrs) for p in providers] == [(nid(1), ((a[0], 7001),))]
    assert net.cores[b].tokens.check(c[0], token, net.clock.now())
    assert net.cores[b].stats["providers_accepted"] == 1


def test_get_providers_leaves_out_the_answering_nodes_own_local_record(net: Net) -> None:
    """A node keeps its own provider record for local use, signed with its
    listening address (127.0.0.1 on a wildcard bind): handed to an asker that
    is not on loopback, it sent downloaders to their own loopback."""
    a, b, c = net.add(1), net.add(2), net.add(3)
    net.answered(a, b, "ping")
    key = kid(61)
    remote = net.record(a, key, 7001)
    assert net.add_provider(a, b, remote) is True
    own = net.record(b, key, 7002, host="127.0.0.1")
    net.cores[b].providers.add_record(own, None, net.clock.now())
    answer = net.answered(c, b, "get_providers", key)
    assert isinstance(answer, tuple)
    assert answer[0] == [remote]


def test_stun_answers_the_source_address(net: Net) -> None:
    a, b = net.add(1), net.add(2)
    assert net.answered(a, b, "stun") == a


# -- failures ----------------------------------------------------------------------


def test_a_call_nobody_answers_times_out_at_its_deadline(net: Net) -> None:
    a = net.add(1)
    core = net.cores[a]
    start = net.clock.now()
    call_id = core.start_call(("10.0.0.99", 5000), "find_node", (kid(5),), start)
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
    call_id = core.start_call(b, "find_node", (kid(7),), net.clock.now(), node_id=nid(2))
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
        event = net.call(a, b, "find_node", kid(9), node_id=nid(2))
        assert event == CallFailed(event.call_id, TIMEOUT)
        assert net.cores[a].failures(nid(2)) == expected
        assert net.cores[a].table.node_for(nid(2)) is not None
    net.cores[b] = core_b  # back: one answer resets the count
    net.answered(a, b, "find_node", kid(9))
    assert net.cores[a].failures(nid(2)) == 0
    del net.cores[b]
    for _ in range(3):
        net.call(a, b, "find_node", kid(9), node_id=nid(2))
    assert net.cores[a].table.node_for(nid(2)) is None
    assert net.cores[a].stats["evictions"] == 1
    assert table_changes(net.events[a]) == [("added", nid(2)), ("removed", nid(2))]


def test_timeouts_of_our_own_rpcs_do_not_evict(net: Net) -> None:
    """identify, get_providers and add_provider: stock nodes never answer them."""
    a, b = net.add(1), net.add(2)
    net.answered(a, b, "ping")
    record = net.record(a, kid(9), 4001)
    token = net.token(a, b)
    del net.cores[b]
    for _ in range(5):
        net.call(a, b, "get_providers", kid(9), node_id=nid(2))
        net.call(a, b, "add_provider", kid(9), record.to_wire(), token, node_id=nid(2))
        net.call(a, b, "identify", node_id=nid(2))
    assert net.cores[a].stats["rpc_timeout.identify"] == 5
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
    take_request(core, "identify")  # it is asked to prove its id (never answers)
    for _ in range(3):
        call_id = core.start_call(peer, "find_node", (kid(5),), 0.0, node_id=nid(2))
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
        core.start_call(("10.0.0.2", 4000), "store", (kid(3), b"x" * 9000, b"t" * 8), 0.0)
    with pytest.raises(UsageError):  # identify must name the id to prove
        core.start_call(("10.0.0.2", 4000), "identify", (), 0.0)
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
    """Requesters from many subnets (one subnet alone is capped lower: next test)."""
    net = Net(replace(CONFIG, verify_queue_max=16, verify_concurrency=4))
    b = net.add(2)
    core = net.cores[b]
    for i in range(1000):
        request = codec.encode_request(b"r" * 20, "ping", [(1000 + i).to_bytes(20, "big")])
        core.receive_datagram(request, (f"10.1.{i % 200}.1", 10_000 + i), 0.0)
    assert core.stats["verify_dropped"] == 1000 - 16
    assert core.stats["verify_dropped_subnet"] == 0
    core.datagrams_to_send()
    core.handle_timer(0.0)
    assert len(core.datagrams_to_send()) == 4  # verify_concurrency in flight
    assert core.next_deadline() == CONFIG.rpc_timeout  # nothing more until one ends
    core.handle_timer(CONFIG.rpc_timeout)  # four time out, four slots free
    core.handle_timer(CONFIG.rpc_timeout)
    assert len(core.datagrams_to_send()) == 4
    assert core.table.all_nodes() == []


def test_one_subnet_holds_only_a_few_places_in_the_verification_queue() -> None:
    """Spoofed sources of one /24 cannot fill the queue: a newcomer from another
    subnet still gets verified."""
    net = Net(replace(CONFIG, verify_queue_max=16, verify_queue_per_subnet=4))
    b = net.add(2)
    core = net.cores[b]
    for i in range(1000):
        request = codec.encode_request(b"r" * 20, "ping", [(1000 + i).to_bytes(20, "big")])
        core.receive_datagram(request, ("10.1.1.1", 10_000 + i), 0.0)
    assert core.snapshot()["verify_queue"] == 4
    assert core.stats["verify_dropped_subnet"] == 1000 - 4
    a = net.add(1)
    net.cores[a].start_call(b, "ping", (), net.clock.now())
    net.run(0)
    assert net.knows(b, a)


def test_welcome_queue_stores_values_on_new_close_nodes_at_its_rate() -> None:
    """Welcome stores carry the token the new node gave us when it proved its id,
    and go only to proven nodes (see test_unproven_nodes_are_not_welcomed)."""
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
    assert net.cores[b].stats["stores_refused_token"] == 0
    net.answered(a, b, "ping")  # welcomed once per node
    assert core.stats["welcome_queued"] == 3


def test_unproven_nodes_are_not_welcomed() -> None:
    """Values go only to nodes that proved their id (a stock node cannot)."""
    net = Net(replace(CONFIG, ksize=20))
    a = net.add(1)
    core = net.cores[a]
    core.storage.put(nid(1)[:19] + b"\x01", "value")
    s = net.add(2, stock=True)
    net.answered(a, s, "ping")
    net.run(CONFIG.rpc_timeout + 0.1)
    assert net.knows(a, s) and not core.table.is_proven(nid(2))
    assert core.stats["welcome_queued"] == 0
    assert len(net.cores[s].storage) == 0


def _head_ping_ids() -> list[int]:
    """me, first, second, third: first and second share exactly 5 leading bits
    (a bucket depth that may not split, 5 % 5 == 0); third is on their side of
    the first bit, me on the other, so once their bucket (without our id) is
    full it pings its head instead of splitting (section 4.2)."""

    def fits(ids: list[bytes]) -> bool:
        me, rest = ids[0], ids[1:]
        if rest and bit(rest[-1], 0) == bit(me, 0):
            return False
        return len(rest) != 2 or shared_bits(rest[0], rest[1]) == 5

    return pick_ids(4, fits)


def test_full_bucket_pings_its_head_and_keeps_it_when_it_answers() -> None:
    net = Net(replace(CONFIG, ksize=2))
    me_i, first_i, second_i, third_i = _head_ping_ids()
    me = net.add(me_i)
    core = net.cores[me]
    first, second, third = (net.add(i) for i in (first_i, second_i, third_i))
    net.answered(me, first, "ping")
    net.answered(me, second, "ping")
    before = len(net.wire)
    net.answered(me, third, "ping")
    assert core.table.node_for(nid(third_i)) is None  # waits in the replacement list
    assert nid(third_i) in core.table.replacement_ids()
    net.run(0)
    # The heads were pinged, answered, and stay.
    pinged = [
        to for data, src, to in net.wire[before:] if src == me and request_name(data) == "ping"
    ]
    # Each time third shows up again (its identify answer, its answer to our
    # verification of its own requests) the bucket's head of the moment is pinged:
    # first, then second once first answered and moved to the tail, then first.
    assert pinged == [third, first, second, third, first]
    assert sorted(n.id for n in core.table.all_nodes()) == sorted([nid(first_i), nid(second_i)])
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
        net.store(a, b, kid(40), 5)
        net.run(1.0)
        return net.wire

    assert scenario() == scenario()


# -- proven ids (identify) ---------------------------------------------------------


def test_identify_is_answered_with_a_proof_and_a_token(net: Net) -> None:
    a, b = net.add(1), net.add(2)
    event = net.call(a, b, "identify", node_id=nid(2))
    assert isinstance(event, CallAnswered)
    answer = event.result
    assert isinstance(answer, IdentifyAnswer)
    assert answer.public_key == ident(2).public_key
    assert answer.observed_host == a[0]  # how b sees us
    now = net.clock.now()
    assert net.cores[b].tokens.check(a[0], answer.token, now)
    assert not net.cores[b].tokens.check("10.0.77.1", answer.token, now)  # a's IP's only
    assert net.cores[b].stats["identify_answered"] >= 1
    assert net.cores[a].is_proven(net.node(b))
    assert net.cores[a].token_from(net.node(b), now) == answer.token
    assert net.knows(a, b) and net.cores[a].table.is_proven(nid(2))


def _identify_answer(kind: str, challenger: bytes, challenge: bytes) -> list[object]:
    """An answer to ``challenger``'s identify of nid(2), genuine or forged."""
    claimed = ident(2)
    public_key = claimed.public_key
    if kind == "genuine":
        signature = proof.prove(claimed, challenger, challenge)
    elif kind == "wrong_signature":
        flipped = bytearray(proof.prove(claimed, challenger, challenge))
        flipped[7] ^= 0x10
        signature = bytes(flipped)
    elif kind == "key_not_hashing_to_the_id":
        # A valid signature of the right message, by a key whose hash is not the id.
        other = ident(3)
        public_key = other.public_key
        signature = other.sign(proof.DOMAIN + challenger + challenge + nid(2))
    elif kind == "replayed_for_another_challenger":
        signature = proof.prove(claimed, nid(4), challenge)
    else:
        assert kind == "replayed_for_another_challenge"
        signature = proof.prove(claimed, challenger, bytes(len(challenge)))
    return [public_key, signature, b"t" * 8, "10.0.1.1"]


FORGERIES = [
    "wrong_signature",
    "key_not_hashing_to_the_id",
    "replayed_for_another_challenger",
    "replayed_for_another_challenge",
]


@pytest.mark.parametrize("kind", ["genuine", *FORGERIES])
def test_identify_answers_are_verified(net: Net, kind: str) -> None:
    a = net.add(1)
    core = net.cores[a]
    peer = ("10.0.2.1", 4002)  # claims nid(2)
    call_id = core.start_call(peer, "identify", (), net.clock.now(), node_id=nid(2))
    msg_id, args = take_request(core, "identify")
    assert args[0] == nid(1)
    challenge = args[1]
    assert isinstance(challenge, bytes) and len(challenge) >= 16
    answer = _identify_answer(kind, nid(1), challenge)
    core.receive_datagram(codec.encode_response(msg_id, answer), peer, net.clock.now())
    [event] = outcomes(core.events())
    node = Node(nid(2), *peer)
    if kind == "genuine":
        assert isinstance(event, CallAnswered)
        assert core.is_proven(node) and core.table.is_proven(nid(2))
        assert core.stats["dropped.bad_proof"] == 0
    else:
        assert event == CallFailed(call_id, MALFORMED)
        assert core.stats["dropped.bad_proof"] == 1
        assert not core.is_proven(node) and core.token_from(node, net.clock.now()) is None
        assert core.table.node_for(nid(2)) is None


@pytest.mark.parametrize("kind", FORGERIES)
def test_a_contact_that_fails_its_proof_stays_unproven_and_is_not_asked_again_soon(
    net: Net, kind: str
) -> None:
    a = net.add(1)
    core = net.cores[a]
    peer = ("10.0.2.1", 4002)
    core.start_call(peer, "ping", (), net.clock.now())
    msg_id, _ = take_request(core, "ping")
    core.receive_datagram(codec.encode_response(msg_id, nid(2)), peer, net.clock.now())
    msg_id, args = take_request(core, "identify")  # asked at once
    answer = _identify_answer(kind, nid(1), args[1])  # type: ignore[arg-type]
    core.receive_datagram(codec.encode_response(msg_id, answer), peer, net.clock.now())
    assert core.stats["dropped.bad_proof"] == 1
    assert core.stats["proofs_failed"] == 1
    assert core.table.node_for(nid(2)) is not None  # a lookup hint ...
    assert not core.table.is_proven(nid(2))  # ... never proven
    for _ in range(2):  # answering again does not start another proof soon
        core.start_call(peer, "ping", (), net.clock.now())
        msg_id, _ = take_request(core, "ping")
        core.receive_datagram(codec.encode_response(msg_id, nid(2)), peer, net.clock.now())
        assert core.datagrams_to_send() == []
        net.clock.advance(300.0)
    core.start_call(peer, "ping", (), net.clock.now())
    msg_id, _ = take_request(core, "ping")
    core.receive_datagram(codec.encode_response(msg_id, nid(2)), peer, net.clock.now())
    take_request(core, "identify")  # after UNPROVABLE_RETRY it may try again


def test_unproven_contacts_are_few_per_bucket_and_admitted_once_proven() -> None:
    net = Net(replace(CONFIG, ksize=20))  # one bucket: no split below 20 contacts
    a = net.add(1)
    core = net.cores[a]
    limit = CONFIG.max_unproven_per_bucket
    assert limit == 2
    stock = [net.add(i, stock=True) for i in range(10, 14)]
    for s in stock:
        net.answered(a, s, "ping")
    net.run(CONFIG.rpc_timeout + 0.1)  # their identify calls time out
    assert [net.knows(a, s) for s in stock] == [True, True, False, False]
    assert core.table.refused["unproven_share"] >= 2
    assert not any(core.table.is_proven(net.id_of(s)) for s in stock)
    assert core.stats["proofs_failed"] == 4
    # Proven nodes are not limited.
    proven = [net.add(i) for i in range(20, 25)]
    for p in proven:
        net.answered(a, p, "ping")
    assert all(core.table.is_proven(net.id_of(p)) for p in proven)
    # A node refused while unproven gets in once it proves its id ...
    late = stock[2]
    net.stock.discard(late)
    assert isinstance(net.answered(a, late, "identify"), IdentifyAnswer)
    assert net.knows(a, late) and core.table.is_proven(net.id_of(late))
    # ... and an unproven contact that proves frees its unproven place.
    net.stock.discard(stock[0])
    net.answered(a, stock[0], "identify")
    assert core.table.is_proven(net.id_of(stock[0]))
    net.answered(a, stock[3], "ping")
    assert net.knows(a, stock[3]) and not core.table.is_proven(net.id_of(stock[3]))
    assert core.table.group_counts()[2] == [limit]
    assert core.table.recount() == core.table.group_counts()


def test_unproven_contacts_are_refused_when_not_accepted() -> None:
    net = Net(replace(CONFIG, accept_unproven_contacts=False))
    a, s, p = net.add(1), net.add(2, stock=True), net.add(3)
    core = net.cores[a]
    net.answered(a, s, "ping")
    net.run(CONFIG.rpc_timeout + 0.1)
    assert not net.knows(a, s)
    assert core.table.refused["unproven_share"] >= 1
    net.answered(a, p, "ping")  # enters once it proved its id
    assert net.knows(a, p) and core.table.is_proven(nid(3))
    assert table_changes(net.events[a]) == [("added", nid(3))]


@pytest.mark.parametrize(
    ("host", "exempt_loopback", "kept"),
    [("10.9.9.{}", True, 2), ("127.0.0.1", True, 4), ("127.0.0.1", False, 2)],
)
def test_one_subnet_holds_few_places_in_a_bucket(
    host: str, exempt_loopback: bool, kept: int
) -> None:
    """Proven nodes of one /24 beyond max_contacts_per_subnet_bucket are refused,
    while another subnet still gets in; loopback is exempt unless told otherwise
    (then each 127.x address is its own group)."""
    config = replace(CONFIG, ksize=20, diversity_exempt_loopback=exempt_loopback)
    net = Net(config)  # ksize 20: one bucket
    a = net.add(1)
    core = net.cores[a]
    same = [net.add(i, host=host.format(i)) for i in range(10, 14)]
    for s in same:
        net.answered(a, s, "ping")
    assert all(core.is_proven(net.node(s)) for s in same)  # proven, and still refused
    assert sum(net.knows(a, s) for s in same) == kept
    assert core.table.refused["subnet_bucket"] >= len(same) - kept
    other = net.add(20)
    net.answered(a, other, "ping")
    assert net.knows(a, other)


# -- tokens and provider records ---------------------------------------------------


def test_stores_need_a_token_issued_to_the_senders_address(net: Net) -> None:
    """Changed: a stock kademlia store (no token), a store from a node that never
    asked us identify (it holds no token, or only one issued to another address),
    a wrong token and an expired one are refused: answered False, counted
    stores_refused_token, nothing stored. A token stays good for one rotation."""
    a, b, c = net.add(1), net.add(2), net.add(3)
    core_b = net.cores[b]
    rotation = CONFIG.token_rotation
    assert net.answered(a, b, "store", kid(1), "v") is False  # stock store, no identify yet
    net.answered(a, b, "ping")  # a asks b to identify: it gets a token
    token = net.token(a, b)
    assert net.answered(a, b, "store", kid(1), "v", bytes(len(token))) is False
    assert net.answered(c, b, "store", kid(1), "v", token) is False  # a's token, c's address
    assert core_b.stats["stores_refused_token"] == 3
    assert core_b.storage.get(kid(1)) is None
    assert net.answered(a, b, "store", kid(1), "v", token) is True
    net.clock.advance(rotation + 1)  # the secret rotated once: the token is still good
    assert net.answered(a, b, "store", kid(2), "w", token) is True
    net.clock.advance(rotation)  # twice: expired
    assert net.answered(a, b, "store", kid(3), "x", token) is False
    assert core_b.stats["stores_refused_token"] == 4
    assert core_b.stats["stores_accepted"] == 2
    assert core_b.storage.get(kid(3)) is None
    assert net.cores[a].token_from(net.node(b), net.clock.now()) is None  # a knows it too


def test_add_provider_needs_a_token_and_a_good_record_at_the_senders_address(
    net: Net,
) -> None:
    a, b, c = net.add(1), net.add(2), net.add(3)
    core_b = net.cores[b]
    net.answered(a, b, "ping")
    token = net.token(a, b)
    key = kid(60)
    good = net.record(a, key, 7001)

    def announce(wire: list[object], with_token: bytes = token) -> object:
        return net.answered(a, b, "add_provider", key, wire, with_token)

    assert announce(good.to_wire(), bytes(len(token))) is False
    assert core_b.stats["providers_refused_token"] == 1
    # A record sending downloaders to another IP (c's), alone or besides a's own.
    assert announce(net.record(a, key, 7001, host=c[0]).to_wire()) is False
    now = int(net.clock.now())
    both = sign_provider_record(ident(1), key, [(a[0], 7001), (c[0], 7001)], 1, now + 3600)
    assert announce(both.to_wire()) is False
    assert core_b.stats["providers_refused_foreign_address"] == 2
    # Records that do not verify: changed after signing, signed for another key,
    # expired, or not a record at all.
    tampered = good.to_wire()
    tampered[2] = [[a[0], 7002]]
    assert announce(tampered) is False
    assert announce(net.record(a, kid(61), 7001).to_wire()) is False
    expired = sign_provider_record(ident(1), key, [(a[0], 7001)], 1, now - 1)
    assert announce(expired.to_wire()) is False
    assert announce([b"junk"]) is False
    assert core_b.stats["providers_refused_bad_record"] == 1
    assert core_b.providers.get_records(key, 10, net.clock.now()) == []
    assert announce(good.to_wire()) is True
    assert core_b.providers.get_records(key, 10, net.clock.now()) == [good]


def test_get_providers_answers_keep_only_records_that_verify(net: Net) -> None:
    a = net.add(1)
    core = net.cores[a]
    peer = ("10.0.2.1", 4002)
    key = kid(70)
    now = net.clock.now()
    expires = int(now) + 3600
    good = sign_provider_record(ident(2), key, [(peer[0], 7001)], 1, expires)
    newer = sign_provider_record(ident(2), key, [(peer[0], 7001)], 2, expires)
    tampered = sign_provider_record(ident(3), key, [("10.0.3.1", 7001)], 1, expires).to_wire()
    tampered[2] = [["10.0.3.1", 7002]]
    other_key = sign_provider_record(ident(4), kid(71), [("10.0.4.1", 7001)], 1, expires)
    expired = sign_provider_record(ident(5), key, [("10.0.5.1", 7001)], 1, int(now) - 1)
    mismatched = sign_provider_record(ident(6), key, [("10.0.6.1", 7001)], 1, expires).to_wire()
    mismatched[0] = nid(7)  # a peer id that is not the key's hash
    wires = [good.to_wire(), tampered, other_key.to_wire(), expired.to_wire(), mismatched]
    wires += [[b"junk"], newer.to_wire()]
    call_id = core.start_call(peer, "get_providers", (key,), now, node_id=nid(2))
    msg_id, _ = take_request(core, "get_providers")
    payload = {"providers": wires, "nodes": [], "token": b"t" * 8}
    core.receive_datagram(codec.encode_response(msg_id, payload), peer, now)
    [event] = outcomes(core.events())
    assert event == CallAnswered(call_id, ([newer], [], b"t" * 8))  # one per peer, highest seq
    dropped = {k: v for k, v in core.stats.items() if k.startswith("provider_records_dropped.")}
    assert dropped == {
        "provider_records_dropped.bad_signature": 2,
        "provider_records_dropped.expired": 1,
        "provider_records_dropped.id_mismatch": 1,
        "provider_records_dropped.bad_record": 1,
    }
    # An answer without a token is malformed.
    call_id = core.start_call(peer, "get_providers", (key,), now, node_id=nid(2))
    msg_id, _ = take_request(core, "get_providers")
    payload = {"providers": [good.to_wire()], "nodes": []}
    core.receive_datagram(codec.encode_response(msg_id, payload), peer, now)
    assert outcomes(core.events()) == [CallFailed(call_id, MALFORMED)]
    assert core.stats["dropped.bad_response"] == 1


# -- every input, also as garbage --------------------------------------------------


def recorded_wire() -> list[tuple[bytes, Address, Address]]:
    net = Net()
    a, b, c = net.add(1), net.add(2), net.add(3)
    net.answered(b, c, "ping")
    net.answered(a, b, "find_node", nid(3))
    net.store(a, b, kid(40), "text")
    net.answered(a, b, "store", kid(43), "stock")  # a stock store, refused
    net.answered(a, b, "find_value", kid(40))
    net.answered(a, b, "find_value", kid(41))
    net.add_provider(a, b, net.record(a, kid(42), 4001))
    net.answered(a, b, "get_providers", kid(42))
    net.answered(a, b, "identify")
    net.answered(a, b, "stun")
    net.run(0.5)
    return net.wire


WIRE = recorded_wire()


def test_the_recorded_scenario_covers_every_rpc() -> None:
    names = set()
    provider_answers = 0
    for data, _, _ in WIRE:
        message = codec.decode_datagram(data, codec.Limits())
        if isinstance(message, codec.Request):
            names.add(message.name)
        elif isinstance(message.payload, dict) and message.payload.get("providers"):
            provider_answers += 1
    assert names == {"ping", "find_node", "store", "find_value", "add_provider"} | {
        "get_providers",
        "stun",
        "identify",
    }
    assert provider_answers == 1  # a get_providers answer with a signed record in it


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


def test_garbled_answers_end_their_call_at_once() -> None:
    """Every recorded answer (identify proofs, signed provider records, tokens
    included), truncated or bit-flipped, fed to a core waiting for an answer to
    the same RPC: the call ends at once, answered or failed, and nothing raises."""
    rng = random.Random(11)
    asked: dict[bytes, tuple[str, tuple[object, ...], Address]] = {}
    for data, _, to in WIRE:
        message = codec.decode_datagram(data, codec.Limits())
        if isinstance(message, codec.Request):
            asked[message.msg_id] = (message.name, message.args, to)
    net = Net()
    core = net.cores[net.add(9)]
    ended = 0
    for data, src, _ in WIRE:
        if data[0] != codec.RESPONSE:
            continue
        name, args, _ = asked[data[1:21]]
        own_args = () if name in ("identify", "stun") else args[1:]
        answerer = nid(int(src[0].split(".")[2]))  # Net.add(i) listens at 10.0.i.1
        garbage = [data[:cut] for cut in range(codec.HEADER_LEN + 1, len(data))]
        for _ in range(20):
            flipped = bytearray(data)
            flipped[rng.randrange(codec.HEADER_LEN, len(data))] ^= 1 << rng.randrange(8)
            garbage.append(bytes(flipped))
        for junk in garbage:
            call_id = core.start_call(src, name, own_args, 0.0, node_id=answerer)
            msg_id, _ = take_request(core, name)
            core.receive_datagram(data[:1] + msg_id + junk[21:], src, 0.0)
            ends = [e for e in outcomes(core.events()) if e.call_id == call_id]
            assert len(ends) == 1, (name, junk)
            ended += 1
            core.datagrams_to_send()  # proofs the answers started
    assert ended > 500


def test_truncated_answers_end_the_call_as_malformed(net: Net) -> None:
    for data, _src, _dst in WIRE:
        if data[0] != codec.RESPONSE:
            continue
        for cut in range(codec.HEADER_LEN + 1, len(data)):
            core = DhtCore(ident(1), CONFIG, clock=net.clock, rng=random.Random(cut))
            peer = ("10.0.0.2", 4002)
            call_id = core.start_call(peer, "find_value", (kid(5),), 0.0)
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
        ping = next(d for d, _ in core_a.datagrams_to_send() if request_name(d) == "ping")
        net.clock.advance(one_way)
        core_b.receive_datagram(ping, a, net.clock.now())
        answer = next(d for d, to in core_b.datagrams_to_send() if to == a)
        net.clock.advance(one_way)
        core_a.receive_datagram(answer, b, net.clock.now())
        core_a.events()
    # 40 ms, then 120 ms smoothed in at a quarter's weight (the identify call a
    # started after the first answer was never delivered)
    assert core_a.rtt(nid(2)) == pytest.approx(0.75 * 0.04 + 0.25 * 0.12)
    assert core_a.rtt(nid(3)) is None
