"""ConnectionCore alone: two cores wired to each other in memory, time a float, no
sockets, no asyncio. Every scenario runs with the bytes delivered whole, one byte
at a time (h11 style) and through the zero-copy ``get_buffer`` path in odd-sized
reads; each must give the same events.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace

import msgpack  # type: ignore[import-untyped]
import pytest

from p2pnode.errors import (
    ChannelAuthError,
    ClosedUnread,
    ConnectionClosed,
    HandshakeError,
    LimitExceeded,
    P2PTimeoutError,
    ProtocolError,
    RemoteError,
    UsageError,
)
from p2pnode.identity import Identity
from p2pnode.net.config import NetLimits
from p2pnode.net.core import (
    CORK_MAX,
    ConnectionCore,
    ConnectionTerminated,
    Event,
    HandshakeCompleted,
    RequestCancelled,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
)
from p2pnode.net.session import Credentials, Session
from p2pnode.wire.messages import (
    DEFAULT_REGISTRY,
    Blob,
    Envelope,
    ErrorCode,
    ErrorReply,
    Kind,
    Message,
    Ping,
    Pong,
    goaway,
    message,
    response,
    wire,
)
from p2pnode.wire.messages import cancel as cancel_envelope


@message(251, registry=None)
@dataclass(frozen=True, slots=True)
class Echoed(Message):
    data: Blob = wire()  # noqa: RUF009 - wire() is a dataclasses.field


@message(250, response=Echoed, registry=None)
@dataclass(frozen=True, slots=True)
class Echo(Message):
    data: bytes = wire()


@message(252, registry=None)
@dataclass(frozen=True, slots=True)
class Unknown(Message):
    """Only the sender knows this one."""


REGISTRY = DEFAULT_REGISTRY.copy()
REGISTRY.register(Echo)
REGISTRY.register(Echoed)
SENDER_REGISTRY = REGISTRY.copy()
SENDER_REGISTRY.register(Unknown)

LIMITS = NetLimits(
    max_frame=1 << 20,
    max_inflight_per_connection=4,
    handshake_timeout=5.0,
    idle_timeout=60.0,
    trim_after=5.0,
    write_stall_timeout=10.0,
    write_buffer_high=64 * 1024,
)
START = 1000.0
CREDS = [Credentials.create(Identity.generate()) for _ in range(3)]
MODES = ["whole", "bytes", "zero-copy"]


class Pair:
    """``a`` dials ``b``; bytes move only when :meth:`pump` (or :meth:`deliver`) says."""

    def __init__(
        self,
        mode: str,
        a_limits: NetLimits = LIMITS,
        b_limits: NetLimits = LIMITS,
        *,
        encrypt: bool = True,
        expected: bytes | None = None,
    ) -> None:
        self.mode = mode
        self.now = START
        a_session = Session(
            CREDS[0],
            initiator=True,
            encrypt=encrypt,
            max_frame=a_limits.max_frame,
            expected_node_id=CREDS[1].node_id if expected is None else expected,
        )
        b_session = Session(
            CREDS[1], initiator=False, encrypt=encrypt, max_frame=b_limits.max_frame
        )
        self.a = ConnectionCore(
            a_session, a_limits, self.now, registry=SENDER_REGISTRY, address="b:1"
        )
        self.b = ConnectionCore(b_session, b_limits, self.now, registry=REGISTRY, address="a:1")
        self.events: dict[ConnectionCore, list[Event]] = {self.a: [], self.b: []}
        self.b.start(self.now)
        self.a.start(self.now)

    @property
    def counters_a(self) -> Counter[str]:
        return self.a.counters

    @property
    def counters_b(self) -> Counter[str]:
        return self.b.counters

    def other(self, core: ConnectionCore) -> ConnectionCore:
        return self.b if core is self.a else self.a

    def feed(self, dst: ConnectionCore, data: bytes) -> None:
        if self.mode == "whole":
            dst.receive_data(data, self.now)
        elif self.mode == "bytes":
            for i in range(len(data)):
                dst.receive_data(data[i : i + 1], self.now)
        else:  # what the shell does: read into get_buffer, odd-sized reads
            pos = 0
            while pos < len(data) and not dst.closing:
                buf = dst.get_buffer()
                n = min(len(buf), len(data) - pos, 7919)
                buf[:n] = data[pos : pos + n]
                pos += n
                dst.receive_data(n, self.now)
        self.events[dst] += dst.take_events()

    def deliver(self, src: ConnectionCore) -> bool:
        """Move what ``src`` has to send to its peer; False if nothing."""
        self.events[src] += src.take_events()
        data = b"".join(bytes(c) for c in src.data_to_send())
        if not data:
            return False
        self.feed(self.other(src), data)
        return True

    def pump(self) -> None:
        while self.deliver(self.a) | self.deliver(self.b):
            pass

    def take(self, core: ConnectionCore) -> list[Event]:
        self.events[core] += core.take_events()
        out, self.events[core] = self.events[core], []
        return out

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def tick(self, core: ConnectionCore) -> None:
        core.handle_timer(self.now)
        self.events[core] += core.take_events()


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


def connected(mode: str, a_limits: NetLimits = LIMITS, b_limits: NetLimits = LIMITS) -> Pair:
    pair = Pair(mode, a_limits, b_limits)
    pair.pump()
    assert pair.take(pair.a) == [HandshakeCompleted(CREDS[1].node_id)]
    assert pair.take(pair.b) == [HandshakeCompleted(CREDS[0].node_id)]
    return pair


def answer_all(pair: Pair, core: ConnectionCore) -> list[int]:
    """Echo every request ``core`` received; their ids, in order."""
    ids = []
    for ev in pair.take(core):
        assert isinstance(ev, RequestReceived)
        assert isinstance(ev.message, Echo)
        core.send_response(ev.request_id, Echoed(ev.message.data), pair.now)
        ids.append(ev.request_id)
    return ids


def responses(events: list[Event]) -> dict[int, Message]:
    out = {}
    for ev in events:
        assert isinstance(ev, ResponseReceived), ev
        out[ev.request_id] = ev.envelope.message
    return out


def terminated(events: list[Event]) -> ConnectionTerminated:
    (ev,) = [e for e in events if isinstance(e, ConnectionTerminated)]
    return ev


# -- handshake -------------------------------------------------------------------


def test_handshake(mode: str) -> None:
    pair = Pair(mode)
    assert pair.a.next_deadline() == START + LIMITS.handshake_timeout
    assert not pair.a.is_open
    with pytest.raises(ConnectionClosed):
        pair.a.send_request(Ping(), pair.now)
    pair.pump()
    assert pair.take(pair.a) == [HandshakeCompleted(CREDS[1].node_id)]
    assert pair.take(pair.b) == [HandshakeCompleted(CREDS[0].node_id)]
    assert pair.a.is_open and pair.b.is_open
    assert pair.a.remote_node_id == CREDS[1].node_id
    # the handshake deadline gave way to the trim/idle check
    assert pair.a.next_deadline() == START + LIMITS.trim_after


def test_handshake_timeout(mode: str) -> None:
    pair = Pair(mode)
    pair.deliver(pair.a)  # msg1 reaches b; b's answer never reaches a
    pair.advance(LIMITS.handshake_timeout - 0.01)
    pair.tick(pair.a)
    assert pair.take(pair.a) == []
    pair.advance(0.01)
    pair.tick(pair.a)
    ev = terminated(pair.take(pair.a))
    assert isinstance(ev.error, P2PTimeoutError) and ev.abort
    assert pair.counters_a["handshake_timeouts"] == 1
    assert pair.a.next_deadline() is None and pair.a.data_to_send() == []


def test_wrong_peer_is_a_handshake_failure(mode: str) -> None:
    pair = Pair(mode, expected=CREDS[2].node_id)
    pair.pump()
    ev = terminated(pair.take(pair.a))
    assert isinstance(ev.error, HandshakeError) and "wrong peer" in str(ev.error)
    assert pair.counters_a["handshake_failures"] == 1
    assert pair.b.is_open is False
    pair.b.connection_lost(None, pair.now)
    ev = terminated(pair.take(pair.b))
    assert isinstance(ev.error, HandshakeError) and ev.abort
    assert pair.counters_b["handshake_failures"] == 1


def test_refused_handshake_still_sends_the_verdict(mode: str) -> None:
    pair = Pair(mode)
    pair.deliver(pair.a)  # msg1
    pair.deliver(pair.b)  # msg2
    msg3 = b"".join(bytes(c) for c in pair.a.data_to_send())
    tampered = msg3[:-1] + bytes([msg3[-1] ^ 1])
    pair.feed(pair.b, tampered)
    ev = terminated(pair.take(pair.b))
    assert isinstance(ev.error, HandshakeError) and not ev.abort  # a verdict to send
    pair.deliver(pair.b)
    assert not pair.a.is_open


# -- requests and answers ----------------------------------------------------------


def test_ping_is_answered_by_the_core(mode: str) -> None:
    pair = connected(mode)
    rid = pair.a.send_request(Ping(), pair.now)
    pair.pump()
    assert pair.take(pair.b) == []
    assert responses(pair.take(pair.a)) == {rid: Pong()}


def test_request_and_answer(mode: str) -> None:
    pair = connected(mode)
    rid = pair.a.send_request(Echo(b"hello"), pair.now)
    assert pair.a.outstanding == 1 and pair.a.busy
    pair.pump()
    assert answer_all(pair, pair.b) == [rid]
    assert pair.b.inflight == 0
    pair.pump()
    assert responses(pair.take(pair.a)) == {rid: Echoed(b"hello")}
    assert pair.a.outstanding == 0 and not pair.a.busy
    assert pair.counters_a["requests_out"] == 1 and pair.counters_b["requests_in"] == 1


def test_large_answer_is_a_view_of_its_frame_body(mode: str) -> None:
    pair = connected(mode)
    blob = os.urandom(40_000)
    rid = pair.a.send_request(Echo(blob), pair.now)
    pair.pump()
    answer_all(pair, pair.b)
    assert pair.b.bulk_pending  # a large frame: the shell writes it at once
    pair.pump()
    (ev,) = pair.take(pair.a)
    assert isinstance(ev, ResponseReceived) and ev.request_id == rid
    data = ev.envelope.message.data  # type: ignore[attr-defined]
    assert bytes(data) == blob
    if mode != "whole":  # assembled in its own body: no copy
        assert isinstance(data, memoryview)


def test_pipelined_answers_in_any_order(mode: str) -> None:
    pair = connected(mode)
    ids = [pair.a.send_request(Echo(bytes([i])), pair.now) for i in range(3)]
    assert len(set(ids)) == 3
    pair.pump()
    received = pair.take(pair.b)
    for ev in reversed(received):
        assert isinstance(ev, RequestReceived) and isinstance(ev.message, Echo)
        pair.b.send_response(ev.request_id, Echoed(ev.message.data), pair.now)
    pair.pump()
    assert responses(pair.take(pair.a)) == {rid: Echoed(bytes([i])) for i, rid in enumerate(ids)}


def test_small_frames_sealed_together_leave_together(mode: str) -> None:
    pair = connected(mode)
    for _ in range(5):
        pair.a.send_request(Ping(), pair.now)
    out = pair.a.data_to_send()
    assert len(out) == 1 and len(out[0]) < CORK_MAX
    pair.feed(pair.b, bytes(out[0]))
    assert len(pair.b.data_to_send()) == 1  # five pongs, one buffer


def test_our_requests_beyond_max_inflight_wait_in_order(mode: str) -> None:
    pair = connected(mode)
    ids = [pair.a.send_request(Echo(bytes([i])), pair.now) for i in range(6)]
    assert pair.counters_a["requests_queued"] == 2
    pair.pump()
    assert answer_all(pair, pair.b) == ids[:4]  # the peer never has to say busy
    pair.pump()  # answers free slots: the last two go out
    assert len(responses(pair.take(pair.a))) == 4
    assert answer_all(pair, pair.b) == ids[4:]
    pair.pump()
    assert set(responses(pair.take(pair.a))) == set(ids[4:])
    assert pair.counters_b["rejected_busy"] == 0


def test_busy_at_max_inflight(mode: str) -> None:
    pair = connected(mode, a_limits=replace(LIMITS, max_inflight_per_connection=8))
    ids = [pair.a.send_request(Echo(b"x"), pair.now) for _ in range(5)]
    pair.pump()
    received = pair.take(pair.b)
    assert [e.request_id for e in received if isinstance(e, RequestReceived)] == ids[:4]
    assert pair.b.inflight == 4 and pair.counters_b["rejected_busy"] == 1
    (failed,) = pair.take(pair.a)
    assert isinstance(failed, RequestFailed) and failed.request_id == ids[4]
    assert isinstance(failed.error, RemoteError) and failed.error.code == ErrorCode.BUSY
    assert pair.counters_a["remote_errors"] == 1


def test_remote_error_reply(mode: str) -> None:
    pair = connected(mode)
    rid = pair.a.send_request(Echo(b"x"), pair.now)
    pair.pump()
    (ev,) = pair.take(pair.b)
    assert isinstance(ev, RequestReceived)
    pair.b.send_response(rid, ErrorReply(ErrorCode.NOT_FOUND, "nope"), pair.now)
    pair.pump()
    (failed,) = pair.take(pair.a)
    assert isinstance(failed, RequestFailed) and isinstance(failed.error, RemoteError)
    assert failed.error.code == ErrorCode.NOT_FOUND


def test_mistyped_answer_fails_that_request(mode: str) -> None:
    pair = connected(mode)
    rid = pair.a.send_request(Echo(b"x"), pair.now)
    pair.pump()
    pair.take(pair.b)
    pair.b.send_response(rid, Pong(), pair.now)
    pair.pump()
    (failed,) = pair.take(pair.a)
    assert isinstance(failed, RequestFailed) and isinstance(failed.error, ProtocolError)
    assert "expected Echoed" in str(failed.error)
    assert pair.counters_a["bad_messages"] == 1 and pair.a.is_open


def test_unsendable_messages_raise_and_leave_no_trace(mode: str) -> None:
    pair = connected(mode)
    with pytest.raises(LimitExceeded):
        pair.a.send_request(Echo(bytes(LIMITS.max_frame)), pair.now)
    with pytest.raises(UsageError):
        pair.a.send_request(Echo("text"), pair.now)  # type: ignore[arg-type]
    assert pair.a.outstanding == 0 and pair.a.data_to_send() == []
    rid = pair.a.send_request(Echo(b"ok"), pair.now)
    pair.pump()
    (ev,) = pair.take(pair.b)
    assert isinstance(ev, RequestReceived)
    with pytest.raises(LimitExceeded):  # the request stays in flight: answer again
        pair.b.send_response(rid, Echoed(bytes(LIMITS.max_frame)), pair.now)
    assert pair.b.inflight == 1
    pair.b.send_response(rid, ErrorReply(ErrorCode.INTERNAL, "too large"), pair.now)
    assert pair.b.inflight == 0


def test_cancel_crossing_the_answer_is_dropped_quietly(mode: str) -> None:
    pair = connected(mode)
    rid = pair.a.send_request(Echo(b"x"), pair.now)
    pair.pump()
    pair.a.cancel_request(rid, pair.now)  # the answer is already made when it arrives
    answer_all(pair, pair.b)
    pair.pump()
    assert pair.take(pair.a) == [] and pair.take(pair.b) == []
    assert pair.counters_a["cancels_sent"] == 1 and pair.counters_a["answers_after_cancel"] == 1
    assert pair.counters_a["unexpected_responses"] == 0  # no strike: it crossed the cancel
    assert pair.counters_b["cancels_too_late"] == 1 and pair.counters_b["cancels_received"] == 0
    assert pair.a.is_open and pair.b.is_open


def test_cancel_stops_a_request_being_handled(mode: str) -> None:
    pair = connected(mode)
    rid = pair.a.send_request(Echo(b"x"), pair.now)
    other = pair.a.send_request(Echo(b"y"), pair.now)
    pair.pump()
    assert len(pair.take(pair.b)) == 2
    pair.a.cancel_request(rid, pair.now)
    pair.pump()
    assert pair.take(pair.b) == [RequestCancelled(rid)]
    assert pair.b.inflight == 1 and pair.b.stopping == 1  # its slot is free at once
    assert pair.counters_b["cancels_received"] == 1
    pair.b.send_response(rid, Echoed(b"x"), pair.now)  # a handler that finished anyway
    assert pair.b.data_to_send() == []  # no answer
    pair.b.handler_stopped(rid)
    assert pair.b.stopping == 0
    pair.b.send_response(other, Echoed(b"y"), pair.now)
    pair.pump()
    assert responses(pair.take(pair.a)) == {other: Echoed(b"y")}
    assert pair.counters_a["unexpected_responses"] == pair.counters_a["answers_after_cancel"] == 0


def test_cancel_drops_a_held_request_and_a_held_answer(mode: str) -> None:
    pair = connected(mode)
    first = pair.a.send_request(Echo(b"1"), pair.now)
    pair.pump()
    pair.b.pause_writing(LIMITS.write_buffer_high, pair.now)
    assert answer_all(pair, pair.b) == [first]  # held: the transport is paused
    assert pair.b.held_bytes > 0
    second = pair.a.send_request(Echo(b"2"), pair.now)
    pair.pump()  # accepted, its event held
    pair.a.cancel_request(first, pair.now)
    pair.a.cancel_request(second, pair.now)
    pair.pump()
    assert pair.take(pair.b) == []  # nothing for the shell to stop
    assert pair.b.inflight == 0 and pair.b.stopping == 0
    assert pair.b.held_bytes == 0 and not pair.b.has_held_answers
    assert pair.counters_b["cancels_received"] == 2
    pair.b.resume_writing(pair.now)
    assert pair.take(pair.b) == [] and pair.b.data_to_send() == []  # neither sent


def test_cancelled_ids_are_remembered_a_while(mode: str) -> None:
    limits = replace(LIMITS, max_inflight_per_connection=1)
    pair = connected(mode, a_limits=limits)
    ids = []
    for _ in range(5):  # 4 x the in-flight limit are remembered
        ids.append(pair.a.send_request(Echo(b"x"), pair.now))
        pair.deliver(pair.a)
        answer_all(pair, pair.b)  # answered, not yet delivered
        pair.a.cancel_request(ids[-1], pair.now)
    pair.pump()
    assert pair.counters_a["answers_after_cancel"] == 4
    assert pair.counters_a["unexpected_responses"] == 1  # the oldest was forgotten


def test_cancel_storm_costs_its_sender(mode: str) -> None:
    """Each request earns one cancel: cancels of unknown ids within that are
    ignored, more are strikes, then the connection is dropped."""
    limits = replace(LIMITS, max_strikes=3, strike_decay=0.0)
    pair = connected(mode, b_limits=limits)
    rid = pair.a.send_request(Echo(b"honest"), pair.now)
    pair.a.send_request(Ping(), pair.now)
    pair.pump()
    pair.take(pair.a)
    (received,) = pair.take(pair.b)
    assert isinstance(received, RequestReceived)
    for bogus in (rid + 1000, rid + 1001):  # two requests earned two cancels
        pair.a.send_envelope(cancel_envelope(bogus), pair.now)
    pair.pump()
    assert pair.counters_b["cancels_too_late"] == 2 and pair.b.inflight == 1
    assert pair.take(pair.b) == [] and pair.b.is_open
    for bogus in range(3):  # none left: strikes
        pair.a.send_envelope(cancel_envelope(bogus), pair.now)
    pair.pump()
    assert pair.counters_b["cancels_bogus"] == 3 and pair.b.is_open
    pair.b.send_response(rid, Echoed(b"honest"), pair.now)  # still answered
    pair.pump()
    assert responses(pair.take(pair.a)) == {rid: Echoed(b"honest")}
    pair.a.send_envelope(cancel_envelope(rid), pair.now)
    pair.pump()
    ev = terminated(pair.take(pair.b))
    assert isinstance(ev.error, ProtocolError) and pair.counters_b["closed_misbehaving"] == 1


def test_stopping_handlers_count_against_new_requests(mode: str) -> None:
    """A cancel frees its request's slot at once (an honest requester that cancels
    and asks again is never refused), but handlers still stopping count too: in
    flight plus stopping stay under twice the limit."""
    pair = connected(mode)
    limit = LIMITS.max_inflight_per_connection
    cancelled = []
    for _ in range(2):
        ids = [pair.a.send_request(Echo(b"x"), pair.now) for _ in range(limit)]
        pair.pump()
        for rid in ids:
            pair.a.cancel_request(rid, pair.now)
        pair.pump()
        cancelled += ids
    events = pair.take(pair.b)
    assert [e for e in events if isinstance(e, RequestCancelled)] == [
        RequestCancelled(r) for r in cancelled
    ]
    assert pair.b.inflight == 0 and pair.b.stopping == 2 * limit
    assert pair.counters_b["rejected_busy"] == 0
    rid = pair.a.send_request(Echo(b"y"), pair.now)
    pair.pump()
    (failed,) = pair.take(pair.a)
    assert isinstance(failed, RequestFailed) and failed.request_id == rid
    assert isinstance(failed.error, RemoteError) and failed.error.code == ErrorCode.BUSY
    pair.b.handler_stopped(cancelled[0])
    rid = pair.a.send_request(Echo(b"y"), pair.now)
    pair.pump()
    assert pair.take(pair.b) == [RequestReceived(rid, Echo(b"y"))]


def test_a_request_id_in_flight_twice_is_refused(mode: str) -> None:
    pair = connected(mode)
    rid = pair.a.send_request(Echo(b"x"), pair.now)
    pair.pump()
    pair.take(pair.b)
    pair.a.send_envelope(Envelope(Kind.REQUEST, rid, Echo(b"again")), pair.now)
    pair.pump()
    assert pair.take(pair.b) == [] and pair.counters_b["duplicate_requests"] == 1
    (failed,) = pair.take(pair.a)  # the refusal takes the id's answer
    assert isinstance(failed, RequestFailed) and failed.request_id == rid
    assert pair.b.inflight == 1


@pytest.mark.parametrize("seed", range(4))
def test_random_requests_cancels_and_pauses(mode: str, seed: int) -> None:
    """Random sends, cancels, answers, pauses and stops, delivered at random
    moments: every request of ``a`` ends once (answered, refused busy while
    cancelled handlers are slow to stop, or cancelled), a request
    cancelled before its answer was made is never answered, no strike is ever
    counted and both sides' counters agree."""
    rng = random.Random(seed)
    pair = connected(mode)
    a, b = pair.a, pair.b
    open_ids: set[int] = set()  # a's requests neither answered nor cancelled
    cancelled: set[int] = set()
    pending_b: list[int] = []  # requests b's "shell" is handling
    stopping: list[int] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.3 and len(open_ids) < 12:
            open_ids.add(
                a.send_request(Echo(rng.randbytes(rng.choice((1, 1, 1, CORK_MAX + 1)))), pair.now)
            )
        elif op < 0.45 and open_ids:
            rid = rng.choice(sorted(open_ids))
            a.cancel_request(rid, pair.now)
            open_ids.discard(rid)
            cancelled.add(rid)
        elif op < 0.65 and pending_b:
            rid = pending_b.pop(rng.randrange(len(pending_b)))
            b.send_response(rid, Echoed(b"r"), pair.now)
        elif op < 0.7 and stopping:
            b.handler_stopped(stopping.pop())
        elif op < 0.75:
            if b.paused:
                b.resume_writing(pair.now)
            else:
                b.pause_writing(LIMITS.write_buffer_high, pair.now)
        elif op < 0.8 and b.has_held_answers and not b.paused:
            b.release_held(pair.now)
        else:
            pair.deliver(rng.choice((a, b)))
        for ev in pair.take(b):
            if isinstance(ev, RequestReceived):
                pending_b.append(ev.request_id)
            elif isinstance(ev, RequestCancelled):
                pending_b.remove(ev.request_id)
                stopping.append(ev.request_id)
        for ev in pair.take(a):
            if isinstance(ev, RequestFailed):  # handlers slow to stop: refused busy
                assert isinstance(ev.error, RemoteError) and ev.error.code == ErrorCode.BUSY
            else:
                assert isinstance(ev, ResponseReceived), ev
            assert ev.request_id in open_ids and ev.request_id not in cancelled
            open_ids.discard(ev.request_id)
    if b.paused:
        b.resume_writing(pair.now)
    for _ in range(100):  # settle: answer everything, deliver everything
        for rid in pending_b:
            b.send_response(rid, Echoed(b"r"), pair.now)
        pending_b.clear()
        while b.has_held_answers:
            b.release_held(pair.now)
        pair.pump()
        for ev in pair.take(b):
            if isinstance(ev, RequestReceived):
                pending_b.append(ev.request_id)
        for ev in pair.take(a):
            assert isinstance(ev, ResponseReceived) and ev.request_id not in cancelled
            open_ids.discard(ev.request_id)
        if not pending_b and not open_ids:
            break
    assert not open_ids and a.outstanding == 0 and b.inflight == 0
    ca, cb = pair.counters_a, pair.counters_b
    assert ca["unexpected_responses"] == cb["unexpected_responses"] == 0
    assert cb["cancels_bogus"] == cb["duplicate_requests"] == 0
    assert ca["cancels_sent"] == cb["cancels_received"] + cb["cancels_too_late"]
    assert ca["answers_after_cancel"] == cb["cancels_too_late"]
    assert a.is_open and b.is_open


def test_cancelled_queued_request_is_never_sent(mode: str) -> None:
    pair = connected(mode)
    ids = [pair.a.send_request(Echo(bytes([i])), pair.now) for i in range(5)]
    pair.a.cancel_request(ids[4], pair.now)
    pair.pump()
    assert answer_all(pair, pair.b) == ids[:4]
    pair.pump()
    assert pair.take(pair.b) == [] and pair.a.outstanding == 0


# -- misbehaviour ------------------------------------------------------------------


def raw(pair: Pair, src: ConnectionCore, payload: bytes) -> None:
    """Seal an arbitrary payload as one frame from ``src``."""
    src._out.extend(src.session.seal([payload], len(payload)))


def test_unknown_message_type_is_answered_unsupported(mode: str) -> None:
    pair = connected(mode)
    rid = pair.a.send_request(Unknown(), pair.now)
    pair.pump()
    (failed,) = pair.take(pair.a)
    assert isinstance(failed, RequestFailed) and failed.request_id == rid
    assert isinstance(failed.error, RemoteError) and failed.error.code == ErrorCode.UNSUPPORTED
    assert pair.counters_b["unknown_messages"] == 1


def test_bad_messages(mode: str) -> None:
    pair = connected(mode)
    raw(pair, pair.a, msgpack.packb([0, 7, Ping.TYPE_CODE, "extra"]))  # bad fields
    raw(pair, pair.a, b"\xc1")  # not msgpack: dropped
    raw(pair, pair.a, msgpack.packb([9, 1, 1]))  # bad kind: dropped
    pair.pump()
    assert pair.take(pair.b) == []
    assert pair.counters_b["bad_messages"] == 3
    # the one with a readable id was answered bad_request; a never asked it
    assert pair.take(pair.a) == []
    assert pair.counters_a["unexpected_responses"] == 1
    assert pair.b.is_open


def test_bad_answer_fails_only_that_request(mode: str) -> None:
    pair = connected(mode)
    rid = pair.a.send_request(Echo(b"x"), pair.now)
    other = pair.a.send_request(Echo(b"y"), pair.now)
    pair.pump()
    pair.take(pair.b)
    raw(pair, pair.b, msgpack.packb([1, rid, Echoed.TYPE_CODE, 5]))  # data not bin
    pair.b.send_response(other, Echoed(b"y"), pair.now)
    pair.pump()
    events = pair.take(pair.a)
    assert isinstance(events[0], RequestFailed) and events[0].request_id == rid
    assert isinstance(events[0].error, ProtocolError)
    assert responses(events[1:]) == {other: Echoed(b"y")}


def test_unexpected_responses_are_strikes(mode: str) -> None:
    limits = replace(LIMITS, max_strikes=3, strike_decay=1.0)
    pair = connected(mode, b_limits=limits)
    for i in range(3):
        pair.a.send_envelope(response(100 + i, Pong()), pair.now)
    pair.pump()
    assert pair.counters_b["unexpected_responses"] == 3 and pair.b.is_open
    pair.advance(1.0)  # one strike faded
    pair.a.send_envelope(response(200, Pong()), pair.now)
    pair.pump()
    assert pair.b.is_open
    pair.a.send_envelope(response(201, Pong()), pair.now)
    pair.pump()
    ev = terminated(pair.take(pair.b))
    assert isinstance(ev.error, ProtocolError) and ev.abort
    assert pair.counters_b["closed_misbehaving"] == 1


def test_rate_limit_answers_busy_then_strikes_close(mode: str) -> None:
    limits = replace(LIMITS, request_rate=1.0, request_burst=2.0, max_strikes=4)
    pair = connected(mode, b_limits=limits)
    ids = [pair.a.send_request(Ping(), pair.now) for _ in range(4)]
    pair.pump()
    events = pair.take(pair.a)
    assert [e.request_id for e in events if isinstance(e, ResponseReceived)] == ids[:2]
    busy = [e for e in events if isinstance(e, RequestFailed)]
    assert [e.request_id for e in busy] == ids[2:]
    assert all(isinstance(e.error, RemoteError) and e.error.code == "busy" for e in busy)
    assert pair.counters_b["rate_limited"] == 2
    pair.advance(1.0)  # one token back
    rid = pair.a.send_request(Ping(), pair.now)
    pair.pump()
    assert responses(pair.take(pair.a)) == {rid: Pong()}
    # a flood: busy answers, strikes, then dropped past max_strikes
    for _ in range(5):
        pair.a.send_request(Ping(), pair.now)
        pair.pump()
    ev = terminated(pair.take(pair.b))
    assert isinstance(ev.error, ProtocolError) and ev.abort
    assert pair.counters_b["closed_misbehaving"] == 1


def test_tampered_chunk_closes_with_an_abort(mode: str) -> None:
    pair = connected(mode)
    pair.a.send_request(Ping(), pair.now)
    data = bytearray(b"".join(bytes(c) for c in pair.a.data_to_send()))
    data[5] ^= 0x40
    pair.feed(pair.b, bytes(data))
    ev = terminated(pair.take(pair.b))
    assert isinstance(ev.error, ChannelAuthError) and ev.abort
    assert pair.counters_b["tampered_chunks"] == 1
    assert pair.b.data_to_send() == []


def test_oversized_frame_closes(mode: str) -> None:
    pair = connected(mode, a_limits=replace(LIMITS, max_frame=1 << 21))
    pair.a.send_request(Echo(bytes(LIMITS.max_frame + 10)), pair.now)
    pair.pump()
    ev = terminated(pair.take(pair.b))
    assert isinstance(ev.error, LimitExceeded)
    assert pair.counters_b["oversized_frames"] == 1


# -- backpressure --------------------------------------------------------------------


def test_paused_transport_holds_requests_answers_and_handling(mode: str) -> None:
    pair = connected(mode)
    rid = pair.a.send_request(Echo(b"1"), pair.now)
    pair.pump()
    pair.b.pause_writing(LIMITS.write_buffer_high, pair.now)
    assert answer_all(pair, pair.b) == [rid]
    assert pair.b.data_to_send() == []  # the answer waits
    pair.b.send_request(Echo(b"ours"), pair.now)
    assert pair.b.data_to_send() == []  # so does our request
    second = pair.a.send_request(Echo(b"2"), pair.now)
    pair.pump()
    assert pair.take(pair.b) == []  # accepted, not handed out while paused
    assert pair.b.inflight == 2  # the held answer's request too
    rid_ping = pair.a.send_request(Ping(), pair.now)
    pair.pump()  # small inline answers still go out
    assert responses(pair.take(pair.a)) == {rid_ping: Pong()}
    pair.b.resume_writing(pair.now)
    received = pair.take(pair.b)
    assert [e.request_id for e in received if isinstance(e, RequestReceived)] == [second]
    pair.pump()  # the held answer, then our held request
    assert pair.take(pair.a) == [
        ResponseReceived(rid, Envelope(Kind.RESPONSE, rid, Echoed(b"1"))),
        RequestReceived(0, Echo(b"ours")),
    ]


def test_held_large_answers_leave_one_at_a_time(mode: str) -> None:
    pair = connected(mode)
    ids = [pair.a.send_request(Echo(bytes([i])), pair.now) for i in range(3)]
    pair.pump()
    pair.b.pause_writing(LIMITS.write_buffer_high, pair.now)
    for ev in pair.take(pair.b):
        assert isinstance(ev, RequestReceived)
        pair.b.send_response(ev.request_id, Echoed(bytes(40_000)), pair.now)
    assert pair.b.data_to_send() == [] and pair.b.has_held_answers
    pair.b.resume_writing(pair.now)
    assert pair.b.bulk_pending and len(pair.b.data_to_send()) == 1  # the first only
    pair.b.pause_writing(LIMITS.write_buffer_high, pair.now)  # the transport filled up
    pair.b.release_held(pair.now)
    assert pair.b.data_to_send() == []
    pair.b.resume_writing(pair.now)
    pair.b.release_held(pair.now)
    assert not pair.b.has_held_answers and pair.b.inflight == 0
    pair.b.data_to_send()
    assert len(ids) == 3


def test_paused_transport_of_a_peer_that_keeps_asking_is_dropped(mode: str) -> None:
    pair = connected(mode)
    cap = LIMITS.write_buffer_high + LIMITS.max_frame
    pair.b.pause_writing(LIMITS.write_buffer_high, pair.now)
    pair.b.write_buffered(cap + 1)
    pair.a.send_request(Ping(), pair.now)
    pair.pump()
    ev = terminated(pair.take(pair.b))
    assert isinstance(ev.error, LimitExceeded) and ev.abort
    assert pair.counters_b["closed_slow_reader"] == 1


def test_write_stall_drops_a_peer_that_reads_nothing(mode: str) -> None:
    pair = connected(mode)
    pair.b.pause_writing(100_000, pair.now)
    assert pair.b.next_deadline() == START + LIMITS.trim_after
    pair.advance(LIMITS.trim_after)
    pair.tick(pair.b)
    assert pair.b.next_deadline() == START + LIMITS.write_stall_timeout
    pair.advance(LIMITS.write_stall_timeout - LIMITS.trim_after)
    pair.b.write_buffered(90_000)  # it read something: a slow link, not a stall
    pair.tick(pair.b)
    assert pair.b.is_open and pair.b.next_deadline() == pair.now + LIMITS.write_stall_timeout
    pair.advance(LIMITS.write_stall_timeout)
    pair.tick(pair.b)  # nothing read for a whole write_stall_timeout
    ev = terminated(pair.take(pair.b))
    assert isinstance(ev.error, LimitExceeded) and ev.abort
    assert pair.counters_b["closed_slow_reader"] == 1


def test_resume_disarms_the_stall_check(mode: str) -> None:
    pair = connected(mode)
    pair.b.pause_writing(100_000, pair.now)
    pair.b.resume_writing(pair.now)
    pair.advance(LIMITS.write_stall_timeout)
    pair.tick(pair.b)
    assert pair.b.is_open and pair.counters_b["write_pauses"] == 1


# -- quiet connections ------------------------------------------------------------------


def test_trim_then_idle_close(mode: str) -> None:
    pair = connected(mode)
    trimmed = []
    pair.a.session.trim = lambda: trimmed.append(pair.now)  # type: ignore[method-assign]
    pair.advance(LIMITS.trim_after)
    assert pair.a.next_deadline() == pair.now
    pair.tick(pair.a)
    assert trimmed == [pair.now] and pair.a.is_open
    assert pair.a.next_deadline() == START + LIMITS.idle_timeout
    pair.advance(LIMITS.idle_timeout - LIMITS.trim_after)
    pair.tick(pair.a)
    ev = terminated(pair.take(pair.a))
    assert isinstance(ev.error, ConnectionClosed) and "idle" in str(ev.error)
    assert not ev.abort and pair.counters_a["idle_closed"] == 1
    assert len(trimmed) == 1


def test_traffic_postpones_idle_and_requests_in_flight_prevent_it(mode: str) -> None:
    pair = connected(mode)
    pair.advance(LIMITS.idle_timeout - 1)
    rid = pair.a.send_request(Echo(b"x"), pair.now)
    pair.pump()
    pair.take(pair.b)  # b's handler runs for a long time: a waits, both busy
    for _ in range(5):
        pair.advance(LIMITS.idle_timeout)
        pair.tick(pair.a)
        pair.tick(pair.b)
    assert pair.a.is_open and pair.b.is_open
    pair.b.send_response(rid, Echoed(b"x"), pair.now)
    pair.pump()
    assert responses(pair.take(pair.a)) == {rid: Echoed(b"x")}
    pair.advance(LIMITS.idle_timeout)
    pair.tick(pair.a)
    pair.tick(pair.a)
    assert not pair.a.is_open and pair.counters_a["idle_closed"] == 1


# -- closing -----------------------------------------------------------------------------


def test_graceful_close_sends_what_was_sealed(mode: str) -> None:
    pair = connected(mode)
    rid = pair.a.send_request(Ping(), pair.now)
    pair.a.close(ConnectionClosed("bye"))
    pair.a.close(ConnectionClosed("twice"))  # once only
    ev = terminated(pair.take(pair.a))
    assert str(ev.error) == "bye" and not ev.abort
    pair.pump()  # the ping still leaves; b answers; a ignores it
    assert pair.counters_b["requests_in"] == 1
    assert pair.take(pair.a) == [] and rid == 0
    assert pair.a.next_deadline() is None
    with pytest.raises(ConnectionClosed, match="bye"):
        pair.a.send_request(Ping(), pair.now)


def test_requests_queued_when_the_connection_ends_are_unread(mode: str) -> None:
    """Requests queued behind the in-flight limit never left: however the connection
    ends (here an abort), they fail as ClosedUnread, which the host sends again on
    another connection; the ones sent get the connection's own error."""
    pair = connected(mode)
    ids = [pair.a.send_request(Echo(bytes([i])), pair.now) for i in range(6)]
    assert pair.a.outstanding == 6  # 4 sent, 2 queued (in-flight limit 4)
    pair.a.close(ConnectionClosed("reset"), abort=True)
    events = pair.take(pair.a)
    failed = {e.request_id: e.error for e in events if isinstance(e, RequestFailed)}
    assert sorted(failed) == ids[4:]
    assert all(type(error) is ClosedUnread for error in failed.values())
    assert str(terminated(events).error) == "reset"


# -- goaway: a graceful close names what it read -------------------------------------------


def test_idle_close_sends_a_goaway_and_a_request_crossing_it_is_unread(mode: str) -> None:
    pair = connected(mode)
    pair.advance(LIMITS.idle_timeout)
    # a asks just as b's idle timer fires: the request is on the wire when b closes
    ids = [pair.a.send_request(Echo(bytes([i])), pair.now) for i in range(5)]
    assert pair.a.outstanding == 5  # 4 sent, 1 queued (in-flight limit 4)
    pair.tick(pair.b)
    ev = terminated(pair.take(pair.b))
    assert "idle" in str(ev.error) and not ev.abort
    assert pair.counters_b["idle_closed"] == 1 and pair.counters_b["goaways_sent"] == 1
    pair.pump()  # a's requests reach a closed b (never read); b's goaway reaches a
    assert pair.counters_b["requests_in"] == 0
    events = pair.take(pair.a)
    failed = [e for e in events if isinstance(e, RequestFailed)]
    assert [e.request_id for e in failed] == ids
    assert all(type(e.error) is ClosedUnread for e in failed)  # safe to send again
    ev = terminated(events)
    assert isinstance(ev.error, ClosedUnread) and ev.abort  # it reads nothing now
    assert events[-1] == ev
    assert pair.counters_a["goaways_received"] == 1
    assert not pair.a.is_open and pair.a.outstanding == 0
    with pytest.raises(ClosedUnread):  # nothing more is asked on it
        pair.a.send_request(Ping(), pair.now)
    assert pair.a.data_to_send() == []  # a sends no goaway back


def test_goaway_names_the_requests_read_and_not_answered(mode: str) -> None:
    pair = connected(mode)
    answered = pair.a.send_request(Echo(b"1"), pair.now)
    handling = pair.a.send_request(Echo(b"2"), pair.now)
    pair.pump()
    received = pair.take(pair.b)
    assert [e.request_id for e in received if isinstance(e, RequestReceived)] == [
        answered,
        handling,
    ]
    pair.b.send_response(answered, Echoed(b"1"), pair.now)
    pair.pump()
    pair.b.pause_writing(LIMITS.write_buffer_high, pair.now)
    held = pair.a.send_request(Echo(b"3"), pair.now)
    pair.pump()  # accepted by b's core, never handed to a handler (paused)
    assert pair.take(pair.b) == [] and pair.b.inflight == 2
    crossing = pair.a.send_request(Echo(b"4"), pair.now)
    pair.a.data_to_send()  # on the wire, lost with the connection
    pair.b.close(ConnectionClosed("host closing"))  # an orderly close
    assert pair.counters_b["goaways_sent"] == 1
    pair.pump()
    events = pair.take(pair.a)
    assert events[0] == ResponseReceived(answered, Envelope(Kind.RESPONSE, answered, Echoed(b"1")))
    failed = {e.request_id: e.error for e in events if isinstance(e, RequestFailed)}
    assert set(failed) == {handling, held, crossing}
    # b read `handling` (it may have acted on it): a plain ConnectionClosed, never resent
    assert type(failed[handling]) is ConnectionClosed
    assert type(failed[held]) is ClosedUnread and type(failed[crossing]) is ClosedUnread
    assert isinstance(terminated(events).error, ClosedUnread)


def test_answers_and_goaways_after_a_goaway_are_dropped(mode: str) -> None:
    pair = connected(mode)
    rid = pair.a.send_request(Echo(b"x"), pair.now)
    pair.pump()
    pair.take(pair.b)
    # a hostile b: claims to have read nothing, then answers anyway, then again
    pair.b.send_envelope(goaway(), pair.now)
    pair.b.send_response(rid, Echoed(b"x"), pair.now)
    for _ in range(50):
        pair.b.send_envelope(goaway(), pair.now)
    pair.pump()
    events = pair.take(pair.a)
    assert events[0] == RequestFailed(rid, events[0].error)  # type: ignore[union-attr]
    assert type(events[0].error) is ClosedUnread  # type: ignore[union-attr]
    assert len(events) == 2 and isinstance(events[1], ConnectionTerminated)
    assert not any(isinstance(e, ResponseReceived) for e in events)
    assert pair.counters_a["goaways_received"] == 1
    if mode != "bytes":  # fed one byte at a time, nothing after the goaway is decoded
        assert pair.counters_a["frames_after_goaway"] == 51
    assert pair.counters_a["unexpected_responses"] == 0  # dropped unread, no strike needed
    assert not pair.a.is_open and pair.a.next_deadline() is None


def test_malformed_or_unknown_goaways_are_strikes_and_ignored(mode: str) -> None:
    pair = connected(mode)
    rid = pair.a.send_request(Echo(b"x"), pair.now)
    pair.pump()
    pair.take(pair.b)
    raw(pair, pair.b, msgpack.packb([4, 0, 5, "not a list"]))
    raw(pair, pair.b, msgpack.packb([4, 0, Ping.TYPE_CODE]))  # a goaway must carry a GoAway
    raw(pair, pair.b, msgpack.packb([5, 0, 5, []]))  # a kind from the future
    pair.pump()
    assert pair.counters_a["bad_messages"] == 3 and pair.counters_a["goaways_received"] == 0
    assert pair.take(pair.a) == [] and pair.a.is_open
    pair.b.send_response(rid, Echoed(b"x"), pair.now)
    pair.pump()
    assert responses(pair.take(pair.a)) == {rid: Echoed(b"x")}


def test_no_goaway_on_abort_or_before_the_handshake(mode: str) -> None:
    pair = Pair(mode)
    pair.a.close(ConnectionClosed("bye"))
    assert pair.counters_a["goaways_sent"] == 0
    pair = connected(mode)
    pair.a.close(ConnectionClosed("bye"), abort=True)
    assert pair.counters_a["goaways_sent"] == 0 and pair.a.data_to_send() == []


def test_abort_drops_what_was_sealed(mode: str) -> None:
    pair = connected(mode)
    pair.a.send_request(Ping(), pair.now)
    pair.a.close(ConnectionClosed("bye"), abort=True)
    assert terminated(pair.take(pair.a)).abort
    assert pair.a.data_to_send() == []


def test_eof_and_connection_lost(mode: str) -> None:
    pair = connected(mode)
    pair.a.eof_received(pair.now)
    ev = terminated(pair.take(pair.a))
    assert isinstance(ev.error, ConnectionClosed) and not ev.abort
    pair.a.connection_lost(None, pair.now)  # after our close: nothing more
    assert pair.take(pair.a) == []
    pair.b.connection_lost(OSError("reset"), pair.now)
    ev = terminated(pair.take(pair.b))
    assert isinstance(ev.error, ConnectionClosed) and "reset" in str(ev.error)
    pair.b.receive_data(b"late bytes", pair.now)
    pair.b.handle_timer(pair.now + 1000)
    assert pair.take(pair.b) == [] and pair.b.data_to_send() == []


def test_eof_in_the_middle_of_a_frame(mode: str) -> None:
    pair = connected(mode)
    pair.a.send_request(Echo(os.urandom(1000)), pair.now)
    data = b"".join(bytes(c) for c in pair.a.data_to_send())
    pair.feed(pair.b, data[:-10])
    pair.b.eof_received(pair.now)
    ev = terminated(pair.take(pair.b))
    assert isinstance(ev.error, ProtocolError) and "middle of a frame" in str(ev.error)


def test_plaintext_mode(mode: str) -> None:
    pair = Pair(mode, encrypt=False)
    pair.pump()
    pair.take(pair.a)
    pair.take(pair.b)
    blob = os.urandom(30_000)
    rid = pair.a.send_request(Echo(blob), pair.now)
    pair.pump()
    answer_all(pair, pair.b)
    pair.pump()
    (ev,) = pair.take(pair.a)
    assert isinstance(ev, ResponseReceived) and ev.request_id == rid
    assert bytes(ev.envelope.message.data) == blob  # type: ignore[attr-defined]


def test_send_envelope_is_sealed_as_is(mode: str) -> None:
    pair = connected(mode)
    pair.a.send_envelope(Envelope(Kind.REQUEST, 77, Ping()), pair.now)
    pair.pump()
    assert pair.counters_a["unexpected_responses"] == 1  # the pong for an id a never gave
