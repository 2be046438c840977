"""The services' pure parts: admission and limits, stream credit, names, values, wire."""

from __future__ import annotations

import random

import msgpack
import pytest

from p2pnode.errors import BadServiceRequest, TooLarge, UsageError
from p2pnode.services.core import (
    Kind,
    NodeServiceLimits,
    Refusal,
    ServiceLimits,
    ServicesCore,
    StreamCredit,
)
from p2pnode.services.messages import Call, ServiceErrorCode, StreamItems
from p2pnode.services.names import is_service_name, service_key, validate_service_name
from p2pnode.services.values import ValueLimits, decode_value, encode_value
from p2pnode.wire.messages import decode_envelope, encode_envelope_bytes, request

A, B = b"a" * 20, b"b" * 20


def core_with(limits: ServiceLimits | None = None, **node: int) -> ServicesCore:
    core = ServicesCore(NodeServiceLimits(**node))  # type: ignore[arg-type]
    core.add("math.add", Kind.UNARY, True, limits or ServiceLimits())
    return core


def code(result: object) -> str | None:
    return result.code if isinstance(result, Refusal) else None


def test_admits_then_finishes_and_counts() -> None:
    core = core_with()
    state = core.admit(A, 1, "math.add", Kind.UNARY, 10, now=0.0)
    assert not isinstance(state, Refusal)
    assert (state.in_flight, core.in_flight) == (1, 1)
    core.finish(A, 1, None, now=0.25)
    assert (state.in_flight, core.in_flight, state.calls) == (0, 0, 1)
    assert state.describe()["p50_ms"] == 250.0
    core.finish(A, 1, None, now=1.0)  # twice: ignored
    assert core.in_flight == 0


def test_refusals_are_typed_and_counted() -> None:
    core = core_with(ServiceLimits(max_request=100, concurrency=1))
    assert code(core.admit(A, 1, "nope", Kind.UNARY, 1, 0.0)) == ServiceErrorCode.NOT_FOUND
    assert code(core.admit(A, 1, "math.add", Kind.STREAM, 1, 0.0)) == "bad_request"
    assert code(core.admit(A, 1, "math.add", Kind.UNARY, 101, 0.0)) == "too_large"
    assert code(core.admit(A, 1, "math.add", Kind.UNARY, 100, 0.0)) is None
    assert code(core.admit(A, 1, "math.add", Kind.UNARY, 1, 0.0)) == "bad_request"  # same id
    assert code(core.admit(B, 2, "math.add", Kind.UNARY, 1, 0.0)) == "overloaded"
    assert core.refused == {"not_found": 1, "bad_request": 2, "too_large": 1, "overloaded": 1}
    assert core.services["math.add"].errors["overloaded"] == 1


def test_rate_per_peer_refills_with_time() -> None:
    core = core_with(ServiceLimits(calls_per_second_per_peer=2, burst_per_peer=2))
    results = [code(core.admit(A, i, "math.add", Kind.UNARY, 1, 0.0)) for i in range(3)]
    assert results == [None, None, "overloaded"]
    assert code(core.admit(B, 9, "math.add", Kind.UNARY, 1, 0.0)) is None  # others unaffected
    assert code(core.admit(A, 5, "math.add", Kind.UNARY, 1, 0.5)) is None  # one token back


def test_node_wide_and_per_peer_limits() -> None:
    core = core_with(max_concurrent=3, max_concurrent_per_peer=2)
    assert code(core.admit(A, 1, "math.add", Kind.UNARY, 1, 0.0)) is None
    assert code(core.admit(A, 2, "math.add", Kind.UNARY, 1, 0.0)) is None
    assert code(core.admit(A, 3, "math.add", Kind.UNARY, 1, 0.0)) == "overloaded"  # per peer
    assert code(core.admit(B, 1, "math.add", Kind.UNARY, 1, 0.0)) is None
    assert code(core.admit(B, 2, "math.add", Kind.UNARY, 1, 0.0)) == "overloaded"  # node
    core.finish(A, 1, "handler_error", 1.0)
    assert code(core.admit(B, 2, "math.add", Kind.UNARY, 1, 1.0)) is None
    assert core.services["math.add"].errors["handler_error"] == 1


def test_calls_in_random_order_keep_the_counts_exact() -> None:
    rng = random.Random(7)
    core = core_with(ServiceLimits(concurrency=5, calls_per_second_per_peer=0), max_concurrent=8)
    running: set[tuple[bytes, int]] = set()
    peers = [bytes([i]) * 20 for i in range(4)]
    for step in range(5000):
        now = step * 0.001
        if running and rng.random() < 0.5:
            peer, cid = rng.choice(sorted(running))
            running.discard((peer, cid))
            core.finish(peer, cid, rng.choice([None, "handler_error"]), now)
        else:
            peer, cid = rng.choice(peers), rng.randrange(10)
            result = core.admit(peer, cid, "math.add", Kind.UNARY, 1, now)
            if not isinstance(result, Refusal):
                running.add((peer, cid))
        state = core.services["math.add"]
        assert core.in_flight == state.in_flight == len(running) <= 5
        for peer in peers:
            assert core.peer_in_flight(peer) == sum(1 for p, _ in running if p == peer)


def test_unserved_while_running_finishes_cleanly() -> None:
    core = core_with()
    core.admit(A, 1, "math.add", Kind.UNARY, 1, 0.0)
    assert core.remove("math.add")
    core.finish(A, 1, None, 1.0)
    assert core.in_flight == 0 and core.peer_in_flight(A) == 0


def test_stream_credit_limits_production() -> None:
    credit = StreamCredit(max_credit=4)
    assert not credit.may_produce()  # nothing granted: the producer waits
    assert credit.grant(10) == 4  # never more than max_credit ahead
    for i in range(4):
        credit.push(bytes([i]))
    assert not credit.may_produce()
    with pytest.raises(ValueError):
        credit.push(b"x")
    assert credit.take(3) == [b"\x00", b"\x01", b"\x02"]
    assert credit.grant(10) == 3
    assert credit.take(10, max_bytes=1) == [b"\x03"]
    credit.end()
    assert credit.finished and not credit.may_produce()


def test_stream_credit_random_events_keep_invariants() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        max_credit = rng.randint(1, 16)
        credit = StreamCredit(max_credit)
        sent = received = 0
        for _ in range(2000):
            event = rng.random()
            if event < 0.3:
                credit.grant(rng.randint(0, 20))
            elif event < 0.7 and credit.may_produce():
                credit.push(sent.to_bytes(4, "big"))
                sent += 1
            elif event < 0.99:
                for item in credit.take(rng.randint(0, 20)):
                    assert int.from_bytes(item, "big") == received  # in order, none lost
                    received += 1
            else:
                credit.end()
            assert credit.buffered <= credit.outstanding <= max_credit
            assert credit.delivered <= credit.produced <= credit.granted
            assert credit.buffered == sent - received
            if credit.ended:
                assert not credit.may_produce()


def test_service_names() -> None:
    for good in ("math.add", "text.upper", "a", "a-b.c9", "x" * 64):
        assert validate_service_name(good) == good
    for bad in ("", "Math", "a..b", ".a", "a.", "-a", "a-", "a_b", "x" * 65, "é", 5, "a b"):
        assert not is_service_name(bad)
        with pytest.raises(UsageError):
            validate_service_name(bad)
    assert len(service_key("math.add")) == 20
    assert service_key("math.add") != service_key("math.sub")


def test_values_round_trip_and_strict_decoding() -> None:
    value = {"a": [1, -2, 2**63, 1.5, None, True, "s", b"b"], "n": {"x": {}}}
    assert decode_value(encode_value(value)) == value
    assert decode_value(encode_value((1, 2))) == [1, 2]
    with pytest.raises(BadServiceRequest):
        encode_value({1: 2})
    with pytest.raises(BadServiceRequest):
        encode_value({1, 2})
    with pytest.raises(TooLarge):
        encode_value(b"x" * 100, ValueLimits(max_size=50))
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(BadServiceRequest):
        encode_value(deep)
    with pytest.raises(BadServiceRequest):
        decode_value(msgpack.packb(deep))
    hostile = [
        b"\xc1",  # never used
        msgpack.packb({1: 2}),
        msgpack.packb(msgpack.ExtType(1, b"x")),
        msgpack.packb(1) + b"\x00",  # trailing bytes
        b"\xdd\xff\xff\xff\xff",  # a huge array header
        b"\x92\x01",  # truncated
    ]
    for data in hostile:
        with pytest.raises(BadServiceRequest):
            decode_value(data)
    rng = random.Random(3)
    for _ in range(2000):  # fuzz: only typed errors
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        try:
            decode_value(data)
        except (BadServiceRequest, TooLarge):
            pass


def test_messages_round_trip() -> None:
    for msg in (Call(1, "math.add", 500, b"\x80"), StreamItems(3, (b"a", b"b"), True)):
        env = decode_envelope(encode_envelope_bytes(request(7, msg)))
        assert env.message == msg


def test_memory_full_refuses_new_calls() -> None:
    core = core_with()
    assert code(core.admit(A, 1, "math.add", Kind.UNARY, 1, 0.0, memory_full=True)) == "overloaded"
    assert code(core.admit(A, 1, "nope", Kind.UNARY, 1, 0.0, memory_full=True)) == "not_found"
    assert core.in_flight == 0


async def test_request_routes_dispatch_by_type() -> None:
    from p2pnode.net.dispatch import RequestRoutes
    from p2pnode.services.messages import StreamClose, StreamClosed
    from p2pnode.wire.messages import ErrorReply, Message, Ping

    routes = RequestRoutes()
    seen: list[Message] = []

    async def close(remote: bytes, msg: Message) -> Message:
        seen.append(msg)
        return StreamClosed(False)

    routes.route((StreamClose,), close)
    assert await routes(A, StreamClose(5)) == StreamClosed(False)
    answer = await routes(A, Ping())
    assert isinstance(answer, ErrorReply) and answer.code == "unsupported"
    routes.unroute((StreamClose,))
    assert isinstance(await routes(A, StreamClose(5)), ErrorReply)
    assert seen == [StreamClose(5)]


def test_stream_pulls_see_items_then_the_end_or_the_error_once() -> None:
    """Pulls and producer events in random order: every item in order, then exactly
    one end (with or without an error); the error never overtakes an item."""
    for seed in range(200):
        rng = random.Random(seed)
        credit = StreamCredit(max_credit=rng.randint(1, 8))
        produced = delivered = 0
        failed: Refusal | None = None
        outcome: tuple[bool, Refusal | None] | None = None
        for _ in range(300):
            event = rng.random()
            if event < 0.4 and credit.may_produce():
                credit.push(produced.to_bytes(4, "big"))
                produced += 1
            elif event < 0.45 and not credit.ended:
                if rng.random() < 0.5:
                    failed = Refusal(ServiceErrorCode.HANDLER_ERROR, "boom")
                    credit.fail(failed)
                else:
                    credit.end()
            elif event < 0.5:
                credit.fail(Refusal(ServiceErrorCode.CANCELLED, "late"))  # the first error wins
                failed = failed or credit.error
            else:
                credit.grant(rng.randint(0, 4))
                items, over = credit.collect(rng.randint(1, 4))
                for item in items:
                    assert int.from_bytes(item, "big") == delivered
                    delivered += 1
                if over:  # the error comes alone, after the last item
                    assert credit.closed and not (items and credit.error is not None)
                    outcome = (credit.error is None, credit.error)
            if outcome is not None:
                break
        if outcome is not None:
            assert delivered == produced  # nothing produced was lost
            assert outcome[1] is failed
            assert credit.collect(5) == ([], True)


@pytest.mark.parametrize("mode", ["whole", "bytes", "zero-copy"])
def test_a_call_and_a_stream_over_two_cores_fed_one_byte_at_a_time(mode: str) -> None:
    """The services' messages through two ConnectionCores (no asyncio): a call, its
    reply, a cancelled call (no answer), a stream opened, pulled and closed; the
    bytes delivered whole, one at a time, or in odd-sized reads give the same events."""
    from p2pnode.net.core import RequestCancelled, RequestReceived, ResponseReceived
    from p2pnode.services.messages import (
        Reply,
        StreamClose,
        StreamClosed,
        StreamOpen,
        StreamOpened,
        StreamPull,
        register,
    )
    from tests.unit.test_net_core import LIMITS, REGISTRY, SENDER_REGISTRY, Pair

    register(REGISTRY), register(SENDER_REGISTRY)  # (copied before the services imported)
    pair = Pair(mode, LIMITS, LIMITS)
    pair.pump()
    pair.take(pair.a), pair.take(pair.b)
    call = pair.a.send_request(Call(1, "math.add", 500, encode_value({"a": 1})), pair.now)
    gone = pair.a.send_request(Call(2, "slow.job", 500, encode_value(None)), pair.now)
    opened = pair.a.send_request(StreamOpen(3, "logs.tail", 500, encode_value(2)), pair.now)
    pair.pump()
    received = pair.take(pair.b)
    assert [type(e.message) for e in received if isinstance(e, RequestReceived)] == [
        Call,
        Call,
        StreamOpen,
    ]
    pair.a.cancel_request(gone, pair.now)  # the caller gives up call 2
    pair.pump()
    assert pair.take(pair.b) == [RequestCancelled(gone)]
    pair.b.handler_stopped(gone)
    pair.b.send_response(call, Reply(1, encode_value(2)), pair.now)
    pair.b.send_response(opened, StreamOpened(3, 8), pair.now)
    pair.pump()
    answers = {
        e.request_id: e.envelope.message
        for e in pair.take(pair.a)
        if isinstance(e, ResponseReceived)
    }
    assert answers == {call: Reply(1, encode_value(2)), opened: StreamOpened(3, 8)}
    pull = pair.a.send_request(StreamPull(3, 8), pair.now)
    pair.pump()
    (got,) = pair.take(pair.b)
    assert isinstance(got, RequestReceived) and got.message == StreamPull(3, 8)
    items = (encode_value(0), encode_value(1))
    pair.b.send_response(pull, StreamItems(3, items, False), pair.now)
    close = pair.a.send_request(StreamClose(3), pair.now)
    pair.pump()
    (got,) = pair.take(pair.b)
    assert isinstance(got, RequestReceived) and got.message == StreamClose(3)
    pair.b.send_response(close, StreamClosed(True), pair.now)
    pair.pump()
    answers = {
        e.request_id: e.envelope.message
        for e in pair.take(pair.a)
        if isinstance(e, ResponseReceived)
    }
    assert answers == {pull: StreamItems(3, items, False), close: StreamClosed(True)}
    assert pair.a.outstanding == 0 and pair.b.inflight == 0 and pair.b.stopping == 0
