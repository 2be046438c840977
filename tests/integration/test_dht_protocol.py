"""The DHT shell (DhtProtocol over a DhtCore) fed bytes through
``datagram_received`` with a fake transport.

No sockets: the transport records what would be sent. Calls we make are answered
by feeding the response datagram back in. Rules: every bad input is dropped and
counted, gets no reply, and leaves no error in the log. (The core alone, with no
asyncio at all: tests/unit/test_dht_core.py.)

Our node has an identity (its id is the hash of its key); so do the fake peers
that must enter the routing table as proven contacts: ``add_contact`` answers the
ping and then the identify call our node makes, with a real proof. ``nid(i)`` are
plain ids (keys, claimed ids of requesters that never need to prove anything).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import logging
import random
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import msgpack
import pytest
from kademlia.node import Node

from p2pnode.dht import codec, proof
from p2pnode.dht.codec import Limits, Request
from p2pnode.dht.config import DhtConfig
from p2pnode.dht.core import DhtCore
from p2pnode.dht.protocol import DhtProtocol
from p2pnode.dht.records import ProviderRecord, sign_provider_record
from p2pnode.dht.rpc_schema import FoundValue, IdentifyAnswer
from p2pnode.dht.storage import ValueStore
from p2pnode.identity import Identity
from p2pnode.tasks import TaskSet

PEER = ("10.0.0.2", 4002)
LIMITS = Limits(max_datagram=65536, max_array_len=100_000, max_map_len=100)
TOKEN = b"t" * 8  # what our fake peers hand out (only they check it)


@functools.cache
def peer(i: int) -> Identity:
    """A fake peer's identity (repeatable)."""
    return Identity.from_seed(hashlib.sha256(b"test_dht_protocol %d" % i).digest())


def _own() -> Identity:
    """Our node: an identity whose id starts with a 0 bit, so ids starting
    0x81, 0x85, 0x90 are all in the other half of the id space."""
    i = 0
    while True:
        own = Identity.from_seed(hashlib.sha256(b"test_dht_protocol own %d" % i).digest())
        if not own.node_id[0] & 0x80:
            return own
        i += 1


OWN = _own()
OWN_ID = OWN.node_id


def nid(i: int) -> bytes:
    return i.to_bytes(20, "big")


def id_of(i: int) -> bytes:
    return peer(i).node_id


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.protocol: DhtProtocol | None = None

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def close(self) -> None:
        if self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def requests(self, name: str | None = None) -> list[tuple[Request, tuple[str, int]]]:
        out = []
        for data, addr in self.sent:
            message = codec.decode_datagram(data, LIMITS)
            if isinstance(message, Request) and (name is None or message.name == name):
                out.append((message, addr))
        return out

    def responses(self) -> list[tuple[object, tuple[str, int]]]:
        out = []
        for data, addr in self.sent:
            message = codec.decode_datagram(data, LIMITS)
            if isinstance(message, codec.Response):
                out.append((message.payload, addr))
        return out


class SteppedLoopClock:
    """The event loop's time (so call timeouts fire), plus whatever a test adds."""

    def __init__(self) -> None:
        self._offset = 1000.0

    def now(self) -> float:
        return asyncio.get_running_loop().time() + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += seconds


class Harness:
    def __init__(self, config: DhtConfig) -> None:
        self.clock = SteppedLoopClock()
        self.tasks = TaskSet("test")
        self.config = config
        self.storage = ValueStore(
            self.clock,
            max_values=config.max_stored_values,
            ttl=config.value_ttl,
            max_value_bytes=config.max_value_bytes,
        )
        self.core = DhtCore(
            OWN, config, clock=self.clock, rng=random.Random(1), storage=self.storage
        )
        self.proto = DhtProtocol(self.core, self.clock)
        self.transport = FakeTransport()
        self.transport.protocol = self.proto
        self.proto.connection_made(self.transport)

    def feed(self, data: bytes, addr: tuple[str, int] = PEER) -> None:
        self.proto.datagram_received(data, addr)

    def request(self, name: str, *args: object, addr: tuple[str, int] = PEER) -> None:
        self.feed(codec.encode_request(b"r" * 20, name, args), addr)

    async def sent_request(self, addr: tuple[str, int], name: str | None = None) -> Request:
        for _ in range(100):
            for message, to in reversed(self.transport.requests(name)):
                if to == addr:
                    return message
            await asyncio.sleep(0)
        raise AssertionError(f"no request to {addr}")

    async def answered(
        self,
        call: Coroutine[Any, Any, Any],
        addr: tuple[str, int],
        payload: object,
        name: str | None = None,
    ) -> Any:
        task = asyncio.create_task(call)
        self.transport.sent.clear()
        message = await self.sent_request(addr, name)
        self.feed(codec.encode_response(message.msg_id, payload), addr)
        return await task

    def answer(self, message: Request, payload: object, addr: tuple[str, int]) -> None:
        self.feed(codec.encode_response(message.msg_id, payload), addr)

    async def prove(self, identity: Identity, addr: tuple[str, int]) -> None:
        """Answer our node's identify call to ``addr`` as ``identity`` would."""
        message = await self.sent_request(addr, "identify")
        assert message.args[0] == OWN_ID
        challenge = message.args[1]
        assert isinstance(challenge, bytes)
        signature = proof.prove(identity, OWN_ID, challenge)
        self.answer(message, [identity.public_key, signature, TOKEN, "10.0.0.1"], addr)
        for _ in range(3):
            await asyncio.sleep(0)

    async def add_contact(self, identity: Identity, addr: tuple[str, int]) -> None:
        """``identity`` at ``addr`` answers a ping, then proves its id."""
        node_id = identity.node_id
        assert await self.answered(self.proto.ping_address(*addr), addr, node_id) == node_id
        assert self.proto.router.node_for(node_id) is not None
        await self.prove(identity, addr)
        assert self.proto.router.is_proven(node_id)

    def token(self, addr: tuple[str, int] = PEER) -> bytes:
        """The token our node gives ``addr``, earned as a peer does: an identify."""
        self.transport.sent.clear()
        self.request("identify", nid(5), b"c" * 16, addr=addr)
        [(answer, _)] = self.transport.responses()
        assert isinstance(answer, list)
        token = answer[2]
        assert isinstance(token, bytes)
        self.transport.sent.clear()
        return token

    def stat(self, name: str) -> int:
        return self.proto.snapshot().get(name, 0)

    async def close(self) -> None:
        await self.tasks.close()
        await self.proto.close()


FAST = DhtConfig(ksize=4, rpc_timeout=0.05, max_failures=3, request_rate=1000, request_burst=1000)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness(FAST)
    yield h
    await h.close()


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Any:
    caplog.set_level(logging.DEBUG)
    yield
    gc.collect()
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    bad += [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not bad, [r.getMessage() for r in bad]


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


MID = b"q" * 20
BAD_DATAGRAMS: list[tuple[bytes, str]] = [
    (b"", "too_short"),
    (b"\x00" + MID, "too_short"),
    (b"\x00" + MID + b"\x90" * 9000, "oversized"),
    (b"\x07" + MID + pack(1), "bad_type"),
    (b"\x00" + MID + b"\xc1", "undecodable"),
    (b"\x00" + MID + b"\xdd\xff\xff\xff\xff", "undecodable"),
    (b"\x00" + MID + pack(["ping", [OWN_ID]]) + b"x", "undecodable"),
    (b"\x00" + MID + b"\x91" * 2000, "undecodable"),
    (b"\x00" + MID + pack("ping"), "malformed"),
    (b"\x00" + MID + pack(["ping", nid(5), 1]), "malformed"),
    (b"\x00" + MID + pack(["__getattr__", []]), "malformed"),
    (b"\x00" + MID + pack(["shutdown", []]), "unknown_rpc"),
    (b"\x00" + MID + pack(["welcome_if_new", [nid(5)]]), "unknown_rpc"),
    (b"\x00" + MID + pack(["ping", []]), "bad_args"),
    (b"\x00" + MID + pack(["ping", [5]]), "bad_args"),
    (b"\x00" + MID + pack(["ping", ["x" * 20]]), "bad_args"),
    (b"\x00" + MID + pack(["find_node", [nid(5), b"short"]]), "bad_args"),
    (b"\x00" + MID + pack(["find_value", [nid(5), None]]), "bad_args"),
    (b"\x00" + MID + pack(["store", [nid(5), nid(6), [1, 2]]]), "bad_args"),
    (b"\x00" + MID + pack(["store", [nid(5), nid(6), {"v": 1}]]), "bad_args"),
    (b"\x00" + MID + pack(["store", [nid(5), nid(6), b"x" * 4097]]), "bad_args"),
    (b"\x00" + MID + pack(["store", [nid(5), nid(6), None]]), "bad_args"),
    (b"\x00" + MID + pack(["store", [nid(5), b"k", b"v"]]), "bad_args"),
    (b"\x00" + MID + pack(["store", [nid(5), nid(6), b"v", b""]]), "bad_args"),
    (b"\x00" + MID + pack(["store", [nid(5), nid(6), b"v", "token"]]), "bad_args"),
    (b"\x00" + MID + pack(["identify", [nid(5)]]), "bad_args"),
    (b"\x00" + MID + pack(["identify", [nid(5), b"short"]]), "bad_args"),
    (b"\x00" + MID + pack(["identify", [nid(5), "c" * 16]]), "bad_args"),
    (b"\x00" + MID + pack(["add_provider", [nid(5), nid(6), 0]]), "bad_args"),
    (b"\x00" + MID + pack(["add_provider", [nid(5), nid(6), "4001"]]), "bad_args"),
    (b"\x00" + MID + pack(["add_provider", [nid(5), nid(6), 4001, TOKEN]]), "bad_args"),
    (b"\x00" + MID + pack(["add_provider", [nid(5), nid(6), [], b""]]), "bad_args"),
    (b"\x00" + MID + pack(["get_providers", [nid(5)]]), "bad_args"),
    (b"\x00" + MID + pack(["ping", [OWN_ID]]), "self_id"),
    (b"\x01" + MID + pack(OWN_ID), "unsolicited_response"),
    (b"\x01" + MID + b"\xc1", "unsolicited_response"),  # not even decoded
]


@pytest.mark.parametrize(("data", "reason"), BAD_DATAGRAMS)
async def test_bad_datagrams_are_dropped_counted_and_unanswered(
    harness: Harness, data: bytes, reason: str
) -> None:
    harness.feed(data)
    await asyncio.sleep(0)
    assert harness.stat(f"dropped.{reason}") == 1
    assert harness.transport.sent == []
    assert harness.stat("verify_queued") == 0
    assert len(harness.storage) == 0
    assert harness.proto.router.all_nodes() == []


async def test_bad_source_address(harness: Harness) -> None:
    harness.feed(codec.encode_request(MID, "ping", [nid(5)]), ("not-an-ip", 5))
    harness.feed(codec.encode_request(MID, "ping", [nid(5)]), ("10.0.0.1", 0))
    assert harness.stat("dropped.bad_source") == 2
    assert harness.transport.sent == []


async def test_valid_requests_are_answered(harness: Harness) -> None:
    """identify answers a proof of our id and a token for the sender's IP. Changed:
    a stock kademlia store (no token) is now refused (False, counted
    stores_refused_token); the same store with the token is accepted."""
    challenge = b"c" * 16
    harness.request("ping", nid(5))
    harness.request("stun")
    harness.request("identify", nid(5), challenge)
    harness.request("store", nid(5), nid(6), "value")
    assert harness.storage.get(nid(6)) is None
    identified = harness.transport.responses()[2][0]
    assert isinstance(identified, list)
    public_key, signature, token, seen_as, mode = identified
    assert public_key == OWN.public_key and seen_as == PEER[0] and mode == "server"
    assert proof.check_proof(OWN_ID, nid(5), challenge, public_key, signature, "server")
    # the mode is signed: the same signature does not prove "client", nor a v1 proof
    assert not proof.check_proof(OWN_ID, nid(5), challenge, public_key, signature, "client")
    assert not proof.check_proof(OWN_ID, nid(5), challenge, public_key, signature)
    harness.request("store", nid(5), nid(6), "value", token)
    harness.request("find_value", nid(5), nid(6))
    harness.request("find_node", nid(5), nid(6))
    answers = [payload for payload, addr in harness.transport.responses()]
    assert answers == [OWN_ID, list(PEER), identified, False, True, {"value": "value"}, []]
    assert harness.storage.get(nid(6)) == "value"
    assert harness.stat("rpc_received.ping") == 1
    assert harness.stat("rpc_received.identify") == 1
    assert harness.stat("identify_answered") == 1
    assert harness.stat("rpc_received.store") == 2
    assert harness.stat("stores_refused_token") == 1
    assert harness.stat("stores_accepted") == 1
    assert harness.stat("datagrams_received") == 7
    assert harness.stat("datagrams_sent") == 7
    assert harness.stat("bytes_sent") == sum(len(d) for d, _ in harness.transport.sent)


async def test_remote_store_bounded(harness: Harness) -> None:
    h = Harness(DhtConfig(max_stored_values=2, value_ttl=10.0))
    try:
        token = h.token()
        for i in range(3):
            h.request("store", nid(5), nid(100 + i), i, token)
        # Full: the heaviest sender's oldest value is evicted, nothing refused.
        assert [p for p, _ in h.transport.responses()] == [True, True, True]
        assert h.stat("stores_refused") == 0
        assert h.storage.get(nid(100)) is None
        h.clock.advance(10)
        h.request("store", nid(5), nid(103), 3, token)
        assert h.storage.get(nid(103)) == 3
        assert h.storage.get(nid(101)) is None
    finally:
        await h.close()


async def test_requests_rate_limited_per_source_ip() -> None:
    h = Harness(DhtConfig(request_rate=1.0, request_burst=5.0))
    try:
        for _ in range(20):
            h.request("ping", nid(5))
        h.request("ping", nid(6), addr=("10.0.0.3", 1))
        assert h.stat("dropped.rate_limited") == 15
        assert len(h.transport.responses()) == 6
        h.clock.advance(2.0)
        h.request("ping", nid(5))
        h.request("ping", nid(5))
        assert len(h.transport.responses()) == 8
        assert h.stat("dropped.rate_limited") == 15
    finally:
        await h.close()


async def test_loopback_is_not_rate_limited_unless_asked() -> None:
    for limit_loopback, answered in ((False, 20), (True, 10)):
        h = Harness(
            DhtConfig(request_rate=1.0, request_burst=5.0, rate_limit_loopback=limit_loopback)
        )
        try:
            for _ in range(10):
                h.request("ping", nid(5), addr=("127.0.0.1", 4000))
                h.request("ping", nid(6), addr=("127.0.0.2", 4000))
            assert len(h.transport.responses()) == answered
        finally:
            await h.close()


async def test_find_node_answer_excludes_requester_and_is_bounded(harness: Harness) -> None:
    for i in range(1, 9):  # each in its own /24 (at most 2 of one may be in a bucket)
        await harness.add_contact(peer(i), (f"10.1.{i}.1", 5000))
    assert len(harness.proto.router) > FAST.ksize
    harness.transport.sent.clear()
    harness.request("find_node", id_of(1), id_of(2), addr=("10.1.1.1", 5000))
    [(answer, _)] = harness.transport.responses()
    assert isinstance(answer, list)
    assert 0 < len(answer) <= FAST.ksize
    assert all(entry[0] != id_of(1) for entry in answer)


# -- provider RPCs -------------------------------------------------------------------


def record(
    i: int, key: bytes, host: str, port: int = 4001, seq: int = 1, ttl: float = 3600.0
) -> ProviderRecord:
    """Fake peer ``i``'s signed provider record (expiring ``ttl`` from now)."""
    expires = int(asyncio.get_running_loop().time() + 1000.0 + ttl)
    return sign_provider_record(peer(i), key, [(host, port)], seq, expires)


async def test_provider_records_are_signed_and_at_the_source_ip() -> None:
    """add_provider carries a signed record naming the sender's own IP and the
    token that IP earned; get_providers hands records out with a token."""
    h = Harness(DhtConfig(provider_ttl=100.0, max_provider_keys_per_sender=2))
    sender = ("10.0.0.9", 7777)
    try:
        token = h.token(sender)
        first = record(5, nid(50), sender[0], ttl=100.0)
        h.request("add_provider", id_of(5), nid(50), first.to_wire(), token, addr=sender)
        # Refused: another IP in the record (downloaders would dial it), no token.
        elsewhere = record(5, nid(53), "10.0.0.10")
        h.request("add_provider", id_of(5), nid(53), elsewhere.to_wire(), token, addr=sender)
        h.request("add_provider", id_of(5), nid(53), first.to_wire(), b"x" * 8, addr=sender)
        h.request("get_providers", nid(6), nid(50))
        answers = [p for p, _ in h.transport.responses()]
        assert answers[:3] == [True, False, False]
        assert h.stat("providers_refused_foreign_address") == 1
        assert h.stat("providers_refused_token") == 1
        assert isinstance(answers[3], dict)
        assert answers[3]["providers"] == [first.to_wire()]
        assert answers[3]["nodes"] == []
        assert h.core.tokens.check(PEER[0], answers[3]["token"], h.clock.now())
        # per sender (source IP) bound: its oldest record makes room
        second = record(5, nid(51), sender[0], ttl=100.0)
        third = record(7, nid(52), sender[0], ttl=100.0)
        h.request("add_provider", id_of(5), nid(51), second.to_wire(), token, addr=sender)
        other_port = (sender[0], 7778)
        h.request("add_provider", id_of(7), nid(52), third.to_wire(), token, addr=other_port)
        assert [p for p, _ in h.transport.responses()][4:] == [True, True]
        assert h.stat("provider_store.evicted.sender_quota") == 1
        assert h.proto.providers.sender_count("10.0.0.9") == 2
        # expiry
        h.clock.advance(100)
        h.transport.sent.clear()
        h.request("get_providers", nid(6), nid(51))
        answer = h.transport.responses()[0][0]
        assert isinstance(answer, dict)
        assert answer["providers"] == [] and answer["nodes"] == []
        assert h.stat("provider_records") == 0
    finally:
        await h.close()


async def test_get_providers_answer_fits_a_datagram() -> None:
    config = DhtConfig(
        max_datagram=1200,
        max_value_bytes=900,
        max_providers_per_key=64,
        max_providers_per_response=64,
    )
    h = Harness(config)
    try:
        for i in range(60):  # one per host: an answer lists one record per host
            own = record(1000 + i, nid(50), f"2001:db8:{i:x}::1234:5678")
            assert h.proto.providers.add_record(own, None, h.clock.now())
        h.request("get_providers", nid(6), nid(50))
        [(data, _)] = h.transport.sent
        assert len(data) <= 1200
        answer = h.transport.responses()[0][0]
        assert isinstance(answer, dict)
        assert 0 < len(answer["providers"]) < 60
        assert isinstance(answer["token"], bytes)
    finally:
        await h.close()


# -- answers to our calls --------------------------------------------------------------


JUNK_NODE_ANSWERS: list[object] = [
    None,
    5,
    "nodes",
    {"value": 1},
    {"a": [1]},
    [[nid(1), "10.0.0.1", 1]] * 65,
]


@pytest.mark.parametrize("payload", JUNK_NODE_ANSWERS)
async def test_malformed_find_node_answer_is_no_answer(harness: Harness, payload: object) -> None:
    result = await harness.answered(
        harness.proto.call_find_node(Node(nid(1), *PEER), Node(nid(9))), PEER, payload
    )
    assert result is None
    assert harness.stat("dropped.bad_response") == 1
    assert harness.proto.router.node_for(nid(1)) is None


async def test_undecodable_answer_ends_the_call_at_once() -> None:
    h = Harness(DhtConfig(rpc_timeout=30.0))
    try:
        await h.add_contact(peer(1), PEER)
        for call in (
            h.proto.call_find_node(Node(id_of(1), *PEER), Node(nid(9))),
            h.proto.ping_address(*PEER),
        ):
            task = asyncio.create_task(call)
            h.transport.sent.clear()
            message = await h.sent_request(PEER)
            h.feed(b"\x01" + message.msg_id + b"\xc1")
            async with asyncio.timeout(1):
                assert await task is None
        assert h.stat("dropped.undecodable") == 2
        assert h.proto.failures(id_of(1)) == 1  # the find_node; the ping had no id to blame
    finally:
        await h.close()


async def test_invalid_entries_in_a_node_list_are_skipped(harness: Harness) -> None:
    payload = [[nid(2), "10.0.0.3", 1], [b"x", "10.0.0.4", 1], [nid(3), "localhost", 1], "junk"]
    result = await harness.answered(
        harness.proto.call_find_node(Node(nid(1), *PEER), Node(nid(9))), PEER, payload
    )
    assert [(n.id, n.ip, n.port) for n in result] == [(nid(2), "10.0.0.3", 1)]
    assert harness.stat("bad_contacts_skipped") == 3
    assert harness.proto.router.node_for(nid(1)) is not None  # it answered ...
    assert not harness.proto.router.is_proven(nid(1))  # ... but has not proven its id
    assert (await harness.sent_request(PEER, "identify")).args[0] == OWN_ID  # asked to


@pytest.mark.parametrize(
    "payload", [{"value": [1]}, {"value": b"x" * 5000}, {"value": None}, {"v": 1}, 3.5]
)
async def test_malformed_find_value_answer_is_no_answer(harness: Harness, payload: object) -> None:
    call = harness.proto.call_find_value(Node(nid(1), *PEER), Node(nid(9)))
    assert await harness.answered(call, PEER, payload) is None
    assert harness.stat("dropped.bad_response") == 1


async def test_typed_answers(harness: Harness) -> None:
    node = Node(id_of(1), *PEER)
    found = await harness.answered(
        harness.proto.call_find_value(node, Node(nid(9))), PEER, {"value": b"v"}
    )
    assert found == FoundValue(b"v")
    store = harness.proto.call_store(node, nid(9), 1, TOKEN)
    assert await harness.answered(store, PEER, True, "store") is True
    [(sent, _)] = harness.transport.requests("store")
    assert sent.args == (OWN_ID, nid(9), 1, TOKEN)  # the token goes last
    store = harness.proto.call_store(node, nid(9), 1, TOKEN)
    assert await harness.answered(store, PEER, "yes", "store") is None
    listed = record(4, nid(9), "10.0.0.4", 4004)
    answer = await harness.answered(
        harness.proto.call_get_providers(node, nid(9)),
        PEER,
        {
            "providers": [listed.to_wire(), record(6, nid(8), "10.0.0.6").to_wire()],
            "nodes": [[nid(5), "10.0.0.5", 4005]],
            "token": TOKEN,
        },
        "get_providers",
    )
    assert answer is not None
    providers, nodes, token = answer
    assert providers == [listed]  # the record for another key does not verify
    assert [n.id for n in nodes] == [nid(5)]
    assert token == TOKEN
    mine = record(9, nid(9), "10.0.0.1")
    announce = harness.proto.call_add_provider(node, nid(9), mine, TOKEN)
    assert await harness.answered(announce, PEER, True, "add_provider") is True
    [(sent, _)] = harness.transport.requests("add_provider")
    assert sent.args == (OWN_ID, nid(9), mine.to_wire(), TOKEN)


async def test_identify_answers_are_checked(harness: Harness) -> None:
    node = Node(id_of(1), *PEER)
    task = asyncio.create_task(harness.proto.call_identify(node))
    message = await harness.sent_request(PEER, "identify")
    challenge = message.args[1]
    assert isinstance(challenge, bytes)
    good = proof.prove(peer(1), OWN_ID, challenge)
    harness.answer(message, [peer(1).public_key, good, TOKEN, "10.0.0.1"], PEER)
    assert await task == IdentifyAnswer(peer(1).public_key, good, TOKEN, "10.0.0.1")
    assert harness.proto.router.is_proven(id_of(1))
    # Another key's valid signature of the same challenge proves nothing.
    node = Node(id_of(2), "10.0.0.3", 4003)
    task = asyncio.create_task(harness.proto.call_identify(node))
    message = await harness.sent_request(("10.0.0.3", 4003), "identify")
    challenge = message.args[1]
    assert isinstance(challenge, bytes)
    forged = [peer(1).public_key, proof.prove(peer(1), OWN_ID, challenge), TOKEN, "10.0.0.1"]
    harness.answer(message, forged, ("10.0.0.3", 4003))
    assert await task is None
    assert harness.stat("dropped.bad_proof") == 1
    assert harness.proto.router.node_for(id_of(2)) is None


async def test_answer_from_another_address_is_ignored(harness: Harness) -> None:
    task = asyncio.create_task(harness.proto.ping_address(*PEER))
    message = await harness.sent_request(PEER)
    harness.feed(codec.encode_response(message.msg_id, nid(1)), ("10.6.6.6", PEER[1]))
    harness.feed(codec.encode_response(message.msg_id, nid(1)), (PEER[0], PEER[1] + 1))
    assert await task is None
    assert harness.stat("dropped.wrong_source") == 2
    assert harness.proto.router.all_nodes() == []


async def test_rpcudp_getattr_remote_calls_are_gone(harness: Harness) -> None:
    with pytest.raises(AttributeError):
        harness.proto.shutdown  # noqa: B018
    assert harness.transport.sent == []


# -- routing table: eviction and admission ---------------------------------------------


async def test_evicted_after_max_failures_not_after_one(harness: Harness) -> None:
    node = Node(id_of(1), *PEER)
    await harness.add_contact(peer(1), PEER)
    for expected in (1, 2):
        assert await harness.proto.call_find_node(node, Node(nid(9))) is None  # timeout
        assert harness.proto.failures(id_of(1)) == expected
        assert harness.proto.router.node_for(id_of(1)) is not None
    # a success resets the count
    assert await harness.answered(harness.proto.call_find_node(node, Node(nid(9))), PEER, []) == []
    assert harness.proto.failures(id_of(1)) == 0
    for _ in range(2):
        await harness.proto.call_find_node(node, Node(nid(9)))
    assert harness.proto.router.node_for(id_of(1)) is not None
    await harness.proto.call_ping(node)
    assert harness.proto.router.node_for(id_of(1)) is None
    assert harness.stat("evictions") == 1


async def test_malformed_answers_count_as_failures(harness: Harness) -> None:
    node = Node(id_of(1), *PEER)
    await harness.add_contact(peer(1), PEER)
    for _ in range(3):
        await harness.answered(harness.proto.call_find_node(node, Node(nid(9))), PEER, "junk")
    assert harness.proto.router.node_for(id_of(1)) is None


async def test_timeouts_of_our_own_rpcs_do_not_evict(harness: Harness) -> None:
    """identify, get_providers, add_provider: a stock node never answers them."""
    node = Node(id_of(1), *PEER)
    await harness.add_contact(peer(1), PEER)
    mine = record(9, nid(9), "10.0.0.1")
    for _ in range(5):
        assert await harness.proto.call_get_providers(node, nid(9)) is None
        assert await harness.proto.call_add_provider(node, nid(9), mine, TOKEN) is None
        assert await harness.proto.call_identify(node) is None
    assert harness.proto.failures(id_of(1)) == 0
    assert harness.proto.router.node_for(id_of(1)) is not None
    assert harness.stat("rpc_timeout.get_providers") == 5
    assert harness.stat("rpc_timeout.add_provider") == 5
    assert harness.stat("rpc_timeout.identify") == 5


async def test_requesters_are_pinged_before_entering_the_table(harness: Harness) -> None:
    """... then asked to prove their id (identify): proven once they did."""
    harness.request("find_node", id_of(1), nid(9))
    assert harness.proto.router.node_for(id_of(1)) is None
    ping = await harness.sent_request(PEER, "ping")
    assert harness.proto.router.node_for(id_of(1)) is None
    harness.feed(codec.encode_response(ping.msg_id, id_of(1)))
    for _ in range(10):
        await asyncio.sleep(0)
    assert harness.proto.router.node_for(id_of(1)) is not None
    assert not harness.proto.router.is_proven(id_of(1))
    await harness.prove(peer(1), PEER)
    assert harness.proto.router.is_proven(id_of(1))
    assert [m.name for m, _ in harness.transport.requests()] == ["ping", "identify"]


async def test_flood_of_new_requesters_is_bounded() -> None:
    h = Harness(
        DhtConfig(
            rpc_timeout=5.0,
            verify_queue_max=16,
            verify_concurrency=4,
            request_rate=10_000,
            request_burst=10_000,
        )
    )
    try:
        h.storage.put(nid(77), "stored")
        for i in range(1000):  # from many subnets (one alone holds 4 places at most)
            h.request("ping", nid(1000 + i), addr=(f"10.2.{i % 250}.{i // 250 + 1}", 10_000 + i))
        for _ in range(20):
            await asyncio.sleep(0)
        assert h.stat("verify_dropped") >= 1000 - 16 - 4
        assert len(h.transport.requests("ping")) <= 4  # verify_concurrency in flight
        assert h.transport.requests("store") == []
        assert h.proto.router.all_nodes() == []
    finally:
        await h.close()


async def test_flood_of_answering_new_nodes_does_not_burst_stores() -> None:
    """300 new nodes answer our pings and prove their ids (only proven nodes are
    welcomed with values): the welcome stores stay queued, bounded and paced."""
    config = DhtConfig(ksize=20, rpc_timeout=5.0, welcome_queue_max=8, welcome_store_rate=1.0)
    h = Harness(config)
    try:
        for i in range(5):  # keys next to our own id: we are always the closest to them
            h.storage.put(OWN_ID[:19] + bytes([i + 1]), f"value {i}")
        pings = []
        at: dict[tuple[str, int], Identity] = {}
        for i in range(300):
            addr = (f"10.{1 + i // 250}.{i % 250}.1", 4000)  # one per /24
            at[addr] = peer(100 + i)
            pings.append(asyncio.create_task(h.proto.ping_address(*addr)))
        for _ in range(5):
            await asyncio.sleep(0)
        for message, addr in h.transport.requests("ping"):
            h.answer(message, at[addr].node_id, addr)
        await asyncio.gather(*pings)
        for _ in range(5):
            await asyncio.sleep(0)
        proofs = 0
        for message, addr in h.transport.requests("identify"):
            challenge = message.args[1]
            assert isinstance(challenge, bytes)
            signature = proof.prove(at[addr], OWN_ID, challenge)
            h.answer(message, [at[addr].public_key, signature, TOKEN, "10.0.0.1"], addr)
            proofs += 1
        assert proofs > 20
        for _ in range(20):
            await asyncio.sleep(0)
        assert h.stat("proofs_ok") == proofs
        assert h.stat("welcome_dropped") > 0
        assert h.stat("welcome_queue") <= 8
        assert len(h.transport.requests("store")) <= 1  # paced at 1/s
    finally:
        await h.close()


def _head_ping_ids() -> tuple[int, int, int]:
    """Peers whose ids start 0x81.., 0x85.. and 0x90.. (the half of the id space
    without ours): the first two share exactly 5 leading bits."""
    wanted = {0x81: 0, 0x85: 0, 0x90: 0}
    i = 1
    while not all(wanted.values()):
        first = id_of(i)[0]
        if first in wanted and not wanted[first]:
            wanted[first] = i
        i += 1
    return wanted[0x81], wanted[0x85], wanted[0x90]


async def test_full_bucket_pings_its_head_in_an_owned_task() -> None:
    h = Harness(DhtConfig(ksize=2, rpc_timeout=5.0))
    try:
        # 0x81.. and 0x85.. share 5 leading bits: once their bucket (without our id,
        # 0x0.. or 0x7f..) is full it does not split but pings its head (section 4.2).
        i_first, i_second, i_third = _head_ping_ids()
        first, second, third = id_of(i_first), id_of(i_second), id_of(i_third)
        await h.add_contact(peer(i_first), ("10.0.2.1", 5000))
        await h.add_contact(peer(i_second), ("10.0.3.2", 5000))
        await h.answered(h.proto.ping_address("10.0.4.3", 5000), ("10.0.4.3", 5000), third)
        assert h.proto.router.node_for(third) is None  # waits in the replacement list
        head_ping = await h.sent_request(("10.0.2.1", 5000), "ping")
        assert h.stat("head_pings") == 1  # the head ping, a call of the core's own
        # the head answers: it stays, moved to the tail
        h.feed(codec.encode_response(head_ping.msg_id, first), ("10.0.2.1", 5000))
        for _ in range(5):
            await asyncio.sleep(0)
        assert h.stat("head_pings") == 0
        assert [n.id for n in h.proto.router.all_nodes()] == [second, first]
    finally:
        await h.close()
    assert h.stat("head_pings") == 0
    assert h.stat("outstanding_rpcs") == 0


async def test_close_ends_calls_in_flight(harness: Harness) -> None:
    h = Harness(DhtConfig(rpc_timeout=30.0))
    call = asyncio.create_task(h.proto.call_find_node(Node(nid(1), *PEER), Node(nid(2))))
    await h.sent_request(PEER)
    await h.close()
    async with asyncio.timeout(1):
        assert await call is None
    assert len(h.tasks) == 0


async def test_refresh_ids_fall_in_lonely_buckets() -> None:
    h = Harness(DhtConfig(refresh_interval=0.0, rpc_timeout=5.0))
    try:
        for i in range(1, 4):
            await h.add_contact(peer(i), (f"10.0.{i}.3", 5000))
        buckets = h.proto.router.buckets
        ids = h.proto.get_refresh_ids()
        assert len(ids) == len(buckets)
        for rid, bucket in zip(ids, buckets, strict=True):
            assert len(rid) == 20
            assert bucket.range[0] <= int.from_bytes(rid, "big") <= bucket.range[1]
    finally:
        await h.close()
