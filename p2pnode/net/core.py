"""One peer connection without I/O: the request mux, its limits and its deadlines.

:class:`ConnectionCore` wraps a :class:`~p2pnode.net.session.Session` (Noise +
framing) and the envelope codec, in the shape of aioquic's ``QuicConnection``.
Bytes and times go in, bytes, events and one deadline come out; it never reads
a clock and imports no asyncio, so two cores can be wired to each other in
memory (``tests/unit/test_net_core.py``) or run over a simulated network.

- inputs: :meth:`~ConnectionCore.receive_data` (or the zero-copy
  :meth:`~ConnectionCore.get_buffer` + ``receive_data(nbytes, now)``),
  :meth:`~ConnectionCore.handle_timer`, :meth:`~ConnectionCore.eof_received`,
  :meth:`~ConnectionCore.connection_lost`, the transport's
  :meth:`~ConnectionCore.pause_writing` / :meth:`~ConnectionCore.resume_writing`,
  and the API: :meth:`~ConnectionCore.send_request` (returns a request id),
  :meth:`~ConnectionCore.send_response`, :meth:`~ConnectionCore.cancel_request`,
  :meth:`~ConnectionCore.handler_stopped`, :meth:`~ConnectionCore.close`;
- outputs: :meth:`~ConnectionCore.data_to_send`,
  :meth:`~ConnectionCore.take_events` and :meth:`~ConnectionCore.next_deadline`.

Rules
-----
- Handshake: :meth:`~ConnectionCore.start` begins it (the initiator's first
  message) and sets its deadline, ``handshake_timeout``; it ends with
  :class:`HandshakeCompleted`. Handshake, framing and authentication failures
  end the connection (the stream cannot be resynchronised).
- Requests from the peer: at most ``max_inflight_per_connection`` are being
  answered at once (from :class:`RequestReceived` until
  :meth:`~ConnectionCore.send_response`); one more is answered ``busy`` at once
  (``rejected_busy``). ``Ping`` is answered here. With ``request_rate`` set,
  requests past the per-connection token bucket are answered ``busy`` too
  (``rate_limited``) and count as strikes.
- Our requests: ids from a per-connection counter; at most
  ``max_inflight_per_connection`` are outstanding (a peer with the same limits
  never has to answer busy); more wait here, in order (``requests_queued``).
  Answers are matched by id: :class:`ResponseReceived` for a good one,
  :class:`RequestFailed` for an ``ErrorReply`` (``RemoteError``), a mistyped or
  malformed one (``ProtocolError``). An answer to no outstanding request is
  counted (``unexpected_responses``) and is a strike, unless it answers one
  of the last requests we cancelled (it crossed our cancel:
  ``answers_after_cancel``, no strike).
- Cancels (``Kind.CANCEL``, HTTP/2's RST_STREAM): :meth:`~ConnectionCore.cancel_request`
  gives up one of our requests; if it was sent, a cancel envelope follows it
  (``cancels_sent``) and its id is remembered a while (``4 x
  max_inflight_per_connection`` ids) so its answer, if already on its way, is
  dropped quietly. A cancel from the peer for one of its requests in flight
  here frees that request's in-flight slot at once and means no answer is
  sent (``cancels_received``): a request still held (paused transport) or its
  held answer is dropped here; one being handled becomes a
  :class:`RequestCancelled` event, the shell stops the handler and reports
  its end (:meth:`~ConnectionCore.handler_stopped`); meanwhile it counts in
  ``stopping``, and requests are answered ``busy`` while in flight plus
  stopping reach twice the in-flight limit (a request/cancel storm cannot
  pile up handlers). A cancel for an id not in flight (answered already, or
  never asked) is ignored (``cancels_too_late``). Every request received
  earns one cancel (up to ``CANCEL_CREDIT``); a cancel beyond what was earned
  is ``cancels_bogus`` and a strike, so a cancel storm costs its sender
  requests (or its connection) and costs us a set lookup per cancel.
- A payload whose envelope cannot be read is dropped; a request of an unknown
  type or with bad fields is answered ``unsupported`` / ``bad_request``: each
  is a strike. Strikes fade at ``strike_decay`` per second; past
  ``max_strikes`` the connection is dropped (``closed_misbehaving``).
- Writes while the transport is paused: requests and answers wait here, and a
  request the peer sends meanwhile is accepted (it counts as in flight) but
  its :class:`RequestReceived` waits too, so a peer that does not read cannot
  make us read pieces for it. On resume, held answers leave up to one large
  one at a time (:meth:`~ConnectionCore.release_held`: the transport may pause
  again after each). Small replies made here (busy, pong, errors) are
  still written; past ``write_buffer_high + max_frame`` buffered (reported by
  the shell, :meth:`~ConnectionCore.write_buffered`), the connection is dropped
  (``closed_slow_reader``), as it is when the buffer has not shrunk for
  ``write_stall_timeout`` (the peer reads nothing; a slow reader is fine).
- Quiet for ``trim_after``: the session gives back its buffers; idle (nothing
  in flight either way) for ``idle_timeout``: closed (``idle_closed``).
- Goaway (``Kind.GOAWAY``, HTTP/2's GOAWAY; wire/messages.py): a graceful
  :meth:`~ConnectionCore.close` of an open connection (idle, evicted, an
  AutoNAT dial-back done, a host closing) seals a last envelope naming the
  peer's requests read here and not answered (``GoAway.read``: in flight,
  less those still held, which no handler saw); a request crossing it on the
  wire was never read, as nothing is read after a close (``goaways_sent``; more
  than ``GOAWAY_MAX_READ`` in flight: no goaway). Received (``goaways_received``):
  each of our requests outstanding fails at once, with ``ConnectionClosed``
  if the peer named it (it may have been handled), else with
  :class:`~p2pnode.errors.ClosedUnread` (safe to send again: the host does,
  once), queued ones too (never sent); then the connection ends gracefully
  with ``ClosedUnread``, so nothing more is asked on it and whatever the peer
  sent after its goaway (answers, more goaways) is dropped
  (``frames_after_goaway``). A peer that lies (names fewer than it read)
  gets each request at most twice (the host retries once); a malformed
  goaway is a strike and ignored.
- Output keeps the order frames were sealed in (the Noise nonces). Small
  frames are corked: everything sealed between two :meth:`data_to_send` calls
  leaves as one buffer. A large frame sets :attr:`ConnectionCore.bulk_pending`
  so the shell writes it at once.
- Closing ends with one :class:`ConnectionTerminated` (its error is what every
  outstanding request gets); a graceful close still hands out what was sealed
  before it (a rejected handshake's verdict, a last error reply), an abort
  drops it. After that, inputs are ignored and nothing more is produced.
- Counters go to the ``counters`` mapping given (the host's), by name.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from p2pnode.errors import (
    ChannelAuthError,
    ClosedUnread,
    ConnectionClosed,
    HandshakeError,
    LimitExceeded,
    P2PError,
    P2PTimeoutError,
    ProtocolError,
    RemoteError,
)
from p2pnode.identity import peer_id_to_str
from p2pnode.net.config import NetLimits
from p2pnode.net.session import Session
from p2pnode.ratelimit import TokenBucket
from p2pnode.wire.buffers import Buffer
from p2pnode.wire.messages import (
    DEFAULT_REGISTRY,
    GOAWAY_MAX_READ,
    SCATTER_MIN,
    DecodeLimits,
    Envelope,
    ErrorCode,
    ErrorReply,
    GoAway,
    Kind,
    Message,
    MessageDecodeError,
    MessageRegistry,
    Ping,
    Pong,
    UnknownMessageType,
    cancel,
    decode_envelope,
    encode_envelope,
    goaway,
    response,
)

log = logging.getLogger(__name__)

# Sealed frames up to this size are corked (joined with their neighbours).
CORK_MAX = 16 * 1024
# Cancels a peer may have earned and not spent (one per request it sent): at most
# this many, or 4 x the in-flight limit if more. An honest peer cancels a request
# at most once, and only one it sent, so it never runs out.
CANCEL_CREDIT = 1024


# -- events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    remote_node_id: bytes


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """Answer it with :meth:`ConnectionCore.send_response` (it is in flight until then)."""

    request_id: int
    message: Message


@dataclass(frozen=True, slots=True)
class RequestCancelled:
    """The peer gave up its request: stop its handler, send no answer, then call
    :meth:`ConnectionCore.handler_stopped`."""

    request_id: int


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """A well-typed answer to one of our requests (``envelope.kind`` is RESPONSE)."""

    request_id: int
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """One of our requests failed: ``RemoteError`` or ``ProtocolError``."""

    request_id: int
    error: P2PError


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The connection is over; ``abort``: drop the transport at once (with a RST)."""

    error: P2PError
    abort: bool


Event = (
    HandshakeCompleted
    | RequestReceived
    | RequestCancelled
    | ResponseReceived
    | RequestFailed
    | ConnectionTerminated
)


class ConnectionCore:
    """One side of a peer connection (see the module rules)."""

    def __init__(
        self,
        session: Session,
        limits: NetLimits,
        now: float,
        *,
        registry: MessageRegistry = DEFAULT_REGISTRY,
        decode_limits: DecodeLimits | None = None,
        counters: Counter[str] | None = None,
        address: str = "?:0",
    ) -> None:
        self.session = session
        self.limits = limits
        self.registry = registry
        self.decode_limits = decode_limits or DecodeLimits(
            max_bin_len=limits.max_frame,
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_array_len,
        )
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.address = address  # "host:port", for messages
        self.error: P2PError | None = None
        self.last_activity = now
        self._closing = False
        self._started = False
        self._goaway_received = False
        self._events: list[Event] = []
        # output, in sealing order; small frames gather in _cork first
        self._out: list[Buffer] = []
        self._cork: list[Buffer] = []
        self.bulk_pending = False
        # our requests, by id: sent (-> the request's type) and waiting to be sent
        # (an insertion-ordered dict is the queue)
        self._pending: dict[int, type[Message]] = {}
        self._waiting: dict[int, tuple[type[Message], list[Buffer], int]] = {}
        self._next_id = 0
        # the peer's requests being answered (ids); their events and our answers
        # held while the transport is paused
        self._inbound: set[int] = set()
        self._held_requests: list[RequestReceived] = []
        self._held_answers: list[tuple[int, list[Buffer], int]] = []
        # cancels: the peer's requests whose handlers are being stopped, the
        # cancels the peer has earned, our last cancelled ids (oldest first)
        self._stopping: set[int] = set()
        self._cancel_credit = 0
        self._credit_max = max(CANCEL_CREDIT, 4 * limits.max_inflight_per_connection)
        self._cancelled: dict[int, None] = {}
        self._cancelled_max = 4 * limits.max_inflight_per_connection
        self._held_bytes = 0
        self._paused = False
        self._buffered = 0  # the transport's write buffer, as last reported
        self._write_cap = limits.write_buffer_high + limits.max_frame
        rate = limits.request_rate
        self._bucket = (
            TokenBucket(rate, max(limits.request_burst or rate, 1.0), now) if rate > 0 else None
        )
        self._strikes = 0.0
        self._strikes_at = now
        # deadlines (None: not armed)
        self._handshake_at: float | None = None
        self._idle_at: float | None = None
        self._stall_at: float | None = None
        self._stall_mark = 0
        self._trimmed_at: float | None = None

    # -- state ---------------------------------------------------------------------

    @property
    def remote_node_id(self) -> bytes | None:
        return self.session.remote_node_id

    @property
    def established(self) -> bool:
        return self.session.established

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def is_open(self) -> bool:
        return self.session.established and not self._closing

    @property
    def inflight(self) -> int:
        """Requests of the peer being answered."""
        return len(self._inbound)

    @property
    def stopping(self) -> int:
        """Handlers of cancelled requests not yet reported stopped."""
        return len(self._stopping)

    @property
    def outstanding(self) -> int:
        """Our requests sent or waiting to be sent, not yet answered."""
        return len(self._pending) + len(self._waiting)

    @property
    def busy(self) -> bool:
        return bool(self._pending or self._waiting or self._inbound)

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def name(self) -> str:
        """``peer-id@host:port`` for messages."""
        node_id = self.session.remote_node_id
        return f"{peer_id_to_str(node_id) if node_id else '?'}@{self.address}"

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must run next (None: nothing armed)."""
        if self._closing:
            return None
        best = self._handshake_at
        for at in (self._idle_at, self._stall_at):
            if at is not None and (best is None or at < best):
                best = at
        return best

    # -- outputs -------------------------------------------------------------------

    @property
    def has_output(self) -> bool:
        """Whether :meth:`data_to_send` or :meth:`take_events` has something (when
        neither has, the last input left :meth:`next_deadline` as it was)."""
        return bool(self._events or self._out or self._cork)

    def data_to_send(self) -> list[Buffer]:
        """What to write to the transport now, in order (the cork joined)."""
        out = self._out
        cork = self._cork
        if cork:
            out.append(cork[0] if len(cork) == 1 else b"".join(cork))
            cork.clear()
        if not out:
            return out
        self._out = []
        self.bulk_pending = False
        return out

    def take_events(self) -> list[Event]:
        events = self._events
        if events:
            self._events = []
        return events

    # -- inputs: the transport -----------------------------------------------------

    def start(self, now: float) -> None:
        """The transport is up: arm the handshake deadline; an initiator speaks first."""
        if self._started or self._closing:
            return
        self._started = True
        self._handshake_at = now + self.limits.handshake_timeout
        if self.session.initiator:
            self.session.initiate()
            self._take_session_output()

    def get_buffer(self) -> memoryview:
        """Where the transport should put the next bytes (the session's buffers)."""
        return self.session.get_buffer()

    def receive_data(self, data: Buffer | int, now: float) -> None:
        """Bytes from the peer: a buffer, or how many were written into the last
        :meth:`get_buffer` (the zero-copy path)."""
        if self._closing:
            return
        if type(data) is int:
            self._received(data, now)
            return
        assert not isinstance(data, int)
        view = memoryview(data).cast("B")
        while view and not self._closing:
            buf = self.session.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self._received(n, now)

    def _received(self, nbytes: int, now: float) -> None:
        counters = self.counters
        counters["bytes_in"] += nbytes
        session = self.session
        was_open = session.established
        try:
            frames = session.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._take_session_output()  # a reject verdict, if the session queued one
            self._protocol_failure(exc, now)
            return
        if not was_open:
            self._take_session_output()
            if session.established:
                self._on_established(now)
        if frames:
            counters["frames_in"] += len(frames)
            self.last_activity = now
            for i, frame in enumerate(frames):
                if self._closing:
                    if self._goaway_received:
                        counters["frames_after_goaway"] += len(frames) - i
                    break
                self._on_frame(frame, now)

    def eof_received(self, now: float) -> None:
        """The peer closed its side."""
        if self._closing:
            return
        try:
            self.session.eof()
        except ProtocolError as exc:
            self._protocol_failure(exc, now)
            return
        self._terminate(ConnectionClosed(f"connection to {self.name} closed by the peer"), False)

    def connection_lost(self, exc: BaseException | None, now: float) -> None:
        """The transport is gone (after a close of ours, or not)."""
        if self._closing:
            return
        why = f": {exc}" if exc else ""
        if not self.session.established:
            self.counters["handshake_failures"] += 1
            error: P2PError = HandshakeError(
                f"connection to {self.name} closed during the handshake{why}"
            )
        else:
            error = ConnectionClosed(f"connection to {self.name} closed{why}")
        self._terminate(error, True)

    def write_buffered(self, size: int) -> None:
        """The transport's write buffer size now (the shell reports it while paused)."""
        self._buffered = size

    def pause_writing(self, buffered: int, now: float) -> None:
        """The transport's buffer passed its high-water mark (``buffered`` bytes)."""
        self.counters["write_pauses"] += 1
        self._paused = True
        self._buffered = buffered
        if self._stall_at is None and not self._closing:
            self._stall_mark = buffered
            self._stall_at = now + self.limits.write_stall_timeout

    def resume_writing(self, now: float) -> None:
        """The transport drained below its low-water mark: what waited goes out."""
        self._paused = False
        self._stall_at = None
        self._buffered = 0
        if self._closing:
            return
        self.release_held(now)
        self._send_queued(now)
        if self._held_requests:
            self._events.extend(self._held_requests)
            self._held_requests = []

    @property
    def held_bytes(self) -> int:
        """Bytes of our answers held while the transport is paused."""
        return self._held_bytes

    @property
    def has_held_answers(self) -> bool:
        return bool(self._held_answers)

    def release_held(self, now: float) -> None:
        """Seal the answers held while paused, up to the first large one: the shell
        writes it (the transport may pause again) before it asks for the next, so
        the transport's buffer stays under ``write_buffer_high + max_frame``."""
        held = self._held_answers
        while held and not self._paused and not self._closing:
            request_id, parts, length = held.pop(0)
            self._held_bytes -= length
            self._inbound.discard(request_id)
            self._seal(parts, length, now)
            if self.bulk_pending:
                return

    def handle_timer(self, now: float) -> None:
        """Run what is due at ``now`` (see :meth:`next_deadline`)."""
        if self._closing:
            return
        limits = self.limits
        if self._handshake_at is not None and now >= self._handshake_at:
            self._handshake_at = None
            if not self.session.established:
                self.counters["handshake_timeouts"] += 1
                self.close(
                    P2PTimeoutError(
                        f"handshake with {self.name} timed out after {limits.handshake_timeout:g}s"
                    ),
                    abort=True,
                )
                return
        if self._stall_at is not None and now >= self._stall_at:
            if self._buffered < self._stall_mark:  # the peer read some: a slow link
                self._stall_mark = self._buffered
                self._stall_at = now + limits.write_stall_timeout
            else:
                self._stall_at = None
                self.counters["closed_slow_reader"] += 1
                self.close(
                    LimitExceeded(
                        f"{self.name} read nothing of our answers for "
                        f"{limits.write_stall_timeout:g}s"
                    ),
                    abort=True,
                )
                return
        if self._idle_at is not None and now >= self._idle_at:
            self._check_idle(now)

    # -- inputs: the API -----------------------------------------------------------

    def send_request(self, msg: Message, now: float) -> int:
        """Queue ``msg`` for the peer; its answer comes as an event with the id returned.

        Raises the connection's error once closing, ``UsageError`` for a message
        we cannot encode and ``LimitExceeded`` for one over ``max_frame``.
        """
        if self._closing or not self.session.established:
            raise self.error or ConnectionClosed(f"connection to {self.name} is not open")
        request_id = self._next_id
        while request_id in self._pending or request_id in self._waiting:
            request_id = (request_id + 1) & 0xFFFFFFFF
        parts, length = self._encode(Envelope(Kind.REQUEST, request_id, msg))
        self._next_id = (request_id + 1) & 0xFFFFFFFF
        self.counters["requests_out"] += 1
        full = len(self._pending) + len(self._waiting) >= self.limits.max_inflight_per_connection
        if full:
            self.counters["requests_queued"] += 1
        if full or self._paused:
            self._waiting[request_id] = (type(msg), parts, length)
        else:
            self._pending[request_id] = type(msg)
            self._seal(parts, length, now)
        return request_id

    def cancel_request(self, request_id: int, now: float) -> None:
        """We give up this request (a timeout, the caller stopped): a sent one is
        followed by a cancel, its answer if already on its way dropped quietly."""
        if request_id in self._waiting:
            del self._waiting[request_id]  # never sent: nothing to tell
            return
        if self._pending.pop(request_id, None) is None:
            return
        if not self._closing:
            parts, length = self._encode(cancel(request_id))
            self._seal(parts, length, now)  # a few bytes, even while paused
            self.counters["cancels_sent"] += 1
            cancelled = self._cancelled
            cancelled[request_id] = None
            if len(cancelled) > self._cancelled_max:
                del cancelled[next(iter(cancelled))]
        self._send_queued(now)

    def handler_stopped(self, request_id: int) -> None:
        """The handler of a :class:`RequestCancelled` request has ended."""
        self._stopping.discard(request_id)

    def send_response(self, request_id: int, reply: Message, now: float) -> None:
        """Answer a :class:`RequestReceived` (an ``ErrorReply`` too); it leaves the
        in-flight count once written. ``UsageError`` / ``LimitExceeded`` for a reply
        we cannot send (the request stays in flight: answer it again)."""
        if self._closing or request_id not in self._inbound:
            return  # closed, or the peer cancelled it: no answer
        parts, length = self._encode(response(request_id, reply))
        self.last_activity = now
        if self._paused:
            self._held_answers.append((request_id, parts, length))
            self._held_bytes += length
            return
        self._inbound.discard(request_id)
        self._seal(parts, length, now)

    def send_envelope(self, envelope: Envelope, now: float) -> None:
        """Seal ``envelope`` as is, now: no ids, limits or queueing (tests, tools)."""
        if self._closing:
            return
        parts, length = self._encode(envelope)
        self._seal(parts, length, now)

    def close(self, error: P2PError, *, abort: bool = False) -> None:
        """End the connection (once); ``error`` is what outstanding requests get.
        Graceful (not ``abort``) and open: a goaway goes last (see the module rules)."""
        if self._closing:
            return
        if not abort and self.session.established:
            self._send_goaway()
        self._terminate(error, abort)

    def _send_goaway(self) -> None:
        inbound = self._inbound
        if len(inbound) > GOAWAY_MAX_READ:
            return  # too many to name: a plain close (they all look read)
        read = inbound
        if self._held_requests:  # accepted, never handed to a handler: unread
            read = inbound - {ev.request_id for ev in self._held_requests}
        try:
            parts, length = self._encode(goaway(tuple(sorted(read))))
        except LimitExceeded:
            return  # over a tiny max_frame: a plain close
        self._seal(parts, length, self.last_activity)  # a few bytes, even while paused
        self.counters["goaways_sent"] += 1

    # -- internals: lifecycle ------------------------------------------------------

    def _terminate(self, error: P2PError, abort: bool) -> None:
        self._closing = True
        self.error = _without_traceback(error)
        self._handshake_at = self._idle_at = self._stall_at = None
        for request_id in self._waiting:  # never sent: safe to send again elsewhere
            self._events.append(
                RequestFailed(
                    request_id,
                    ClosedUnread(f"connection to {self.name} closed before the request left"),
                )
            )
        self._waiting.clear()
        self._inbound.clear()
        self._stopping.clear()
        self._held_requests.clear()
        self._held_answers.clear()
        self._held_bytes = 0
        if abort:
            self._out = []
            self._cork.clear()
        self.bulk_pending = False
        self._events.append(ConnectionTerminated(error, abort))

    def _protocol_failure(self, exc: ProtocolError, now: float) -> None:
        if isinstance(exc, HandshakeError):
            reason = "handshake_failures"
        elif isinstance(exc, ChannelAuthError):
            reason = "tampered_chunks"
        elif isinstance(exc, LimitExceeded):
            reason = "oversized_frames"
        else:
            reason = "protocol_errors"
        self.counters[reason] += 1
        log.debug("closing %s: %s", self.name, exc)
        # a refused handshake leaves its verdict to be sent: no abort
        self.close(exc, abort=not isinstance(exc, HandshakeError))

    def _on_established(self, now: float) -> None:
        self._handshake_at = None
        self.last_activity = now
        self._idle_at = now + min(self.limits.idle_timeout, self.limits.trim_after)
        node_id = self.session.remote_node_id
        assert node_id is not None
        self._events.append(HandshakeCompleted(node_id))

    def _check_idle(self, now: float) -> None:
        limits = self.limits
        idle = limits.idle_timeout
        first = min(idle, limits.trim_after)
        if self._pending or self._waiting or self._inbound:
            self._trimmed_at = None
            self._idle_at = now + first
            return
        elapsed = now - self.last_activity
        if elapsed >= idle:
            self.counters["idle_closed"] += 1
            self.close(ConnectionClosed(f"connection to {self.name} closed: idle"))
            return
        if elapsed >= limits.trim_after and self._trimmed_at != self.last_activity:
            # quiet for a while: give back the read buffers and pooled bodies
            self.session.trim()
            self._trimmed_at = self.last_activity
        if elapsed < limits.trim_after:
            self._idle_at = now + first - elapsed
        else:
            self._idle_at = now + idle - elapsed

    # -- internals: frames in --------------------------------------------------------

    def _on_frame(self, payload: memoryview, now: float) -> None:
        # A large frame in its own buffer: piece data stays a view of it (no copy);
        # the buffer is not reused while a view of it is alive (wire/buffers.py).
        views = len(payload) >= SCATTER_MIN and self.session.stable(payload)
        try:
            env = decode_envelope(payload, self.decode_limits, self.registry, views=views)
        except UnknownMessageType as exc:
            self.counters["unknown_messages"] += 1
            if self._strike(now):
                self._bad_message(exc, ErrorCode.UNSUPPORTED, now)
            return
        except MessageDecodeError as exc:
            self.counters["bad_messages"] += 1
            if self._strike(now):
                self._bad_message(exc, ErrorCode.BAD_REQUEST, now)
            return
        kind = env.kind
        if kind is Kind.REQUEST:
            self._on_request(env.request_id, env.message, now)
            return
        if kind is Kind.CANCEL:
            self._on_cancel(env.request_id, now)
            return
        if kind is Kind.GOAWAY:
            message = env.message
            assert isinstance(message, GoAway)
            self._on_goaway(message.read)
            return
        request_id = env.request_id
        sent = self._pending.pop(request_id, None)
        if sent is None:
            if request_id in self._cancelled:
                del self._cancelled[request_id]
                self.counters["answers_after_cancel"] += 1  # it crossed our cancel
                return
            self.counters["unexpected_responses"] += 1
            self._strike(now)
            return
        if self._waiting:
            self._send_queued(now)
        if env.kind is Kind.ERROR:
            reply = env.message
            assert isinstance(reply, ErrorReply)
            self.counters["remote_errors"] += 1
            self._events.append(RequestFailed(request_id, RemoteError(reply.code, reply.message)))
            return
        expected = sent.RESPONSE_TYPE
        if expected is not None and type(env.message) is not expected:
            self.counters["bad_messages"] += 1
            self._events.append(
                RequestFailed(
                    request_id,
                    ProtocolError(
                        f"{self.name} answered {sent.__name__} with "
                        f"{type(env.message).__name__}, expected {expected.__name__}"
                    ),
                )
            )
            return
        self._events.append(ResponseReceived(request_id, env))

    def _strike(self, now: float) -> bool:
        """Count one misbehaviour; drop the connection past the budget.
        True while the connection stays open."""
        decayed = self._strikes - (now - self._strikes_at) * self.limits.strike_decay
        self._strikes = max(0.0, decayed) + 1.0
        self._strikes_at = now
        if self._strikes <= self.limits.max_strikes:
            return True
        self.counters["closed_misbehaving"] += 1
        self.close(ProtocolError(f"{self.name} sent too many bad messages; dropped"), abort=True)
        return False

    def _bad_message(self, exc: MessageDecodeError, code: str, now: float) -> None:
        log.debug("bad message from %s: %s", self.name, exc)
        if exc.request_id is None:
            return  # unreadable envelope: drop the packet
        if exc.kind == Kind.REQUEST:
            self._reply_inline(exc.request_id, ErrorReply(code, str(exc)[:1024]), now)
            return
        if exc.kind == Kind.CANCEL or exc.kind == Kind.GOAWAY:
            return  # never answered; a malformed goaway is ignored
        if self._pending.pop(exc.request_id, None) is None:
            return
        self._send_queued(now)
        self._events.append(
            RequestFailed(exc.request_id, ProtocolError(f"bad answer from {self.name}: {exc}"))
        )

    def _on_request(self, request_id: int, msg: Message, now: float) -> None:
        counters = self.counters
        counters["requests_in"] += 1
        self._cancel_credit += 1  # (capped when spent)
        bucket = self._bucket
        if bucket is not None and not bucket.take(now):
            counters["rate_limited"] += 1
            if self._strike(now):
                self._reply_inline(
                    request_id, ErrorReply(ErrorCode.BUSY, "request rate limit"), now
                )
            return
        if type(msg) is Ping:
            self._reply_inline(request_id, Pong(), now)
            return
        inbound = self._inbound
        limit = self.limits.max_inflight_per_connection
        n = len(inbound)
        if n >= limit or (self._stopping and n + len(self._stopping) >= 2 * limit):
            counters["rejected_busy"] += 1
            self._reply_inline(
                request_id, ErrorReply(ErrorCode.BUSY, "too many requests in flight"), now
            )
            return
        if request_id in inbound or (self._stopping and request_id in self._stopping):
            counters["duplicate_requests"] += 1  # two answers could not be told apart
            if self._strike(now):
                self._reply_inline(
                    request_id, ErrorReply(ErrorCode.BAD_REQUEST, "request id in flight"), now
                )
            return
        inbound.add(request_id)
        event = RequestReceived(request_id, msg)
        if self._paused:
            self._held_requests.append(event)  # see the module rules
        else:
            self._events.append(event)

    def _on_cancel(self, request_id: int, now: float) -> None:
        """The peer gave up its request ``request_id`` (see the module rules)."""
        counters = self.counters
        credit = min(self._cancel_credit, self._credit_max)
        if credit <= 0:
            counters["cancels_bogus"] += 1  # more cancels than requests
            self._strike(now)
            return
        self._cancel_credit = credit - 1
        if request_id not in self._inbound:
            counters["cancels_too_late"] += 1  # answered already (or never asked)
            return
        self._inbound.discard(request_id)
        counters["cancels_received"] += 1
        for i, event in enumerate(self._held_requests):
            if event.request_id == request_id:
                del self._held_requests[i]  # the shell never saw it
                return
        for i, (held_id, _, length) in enumerate(self._held_answers):
            if held_id == request_id:
                del self._held_answers[i]  # answered, not yet sent: not sent
                self._held_bytes -= length
                return
        self._stopping.add(request_id)
        self._events.append(RequestCancelled(request_id))

    def _on_goaway(self, read: tuple[int, ...]) -> None:
        """The peer is closing and read none of our requests but ``read`` (see
        the module rules)."""
        self._goaway_received = True
        self.counters["goaways_received"] += 1
        name = self.name
        events = self._events
        named = set(read)
        for request_id in self._pending:
            if request_id in named:
                error: P2PError = ConnectionClosed(
                    f"connection to {name} closed by the peer while it handled the request"
                )
            else:
                error = ClosedUnread(
                    f"connection to {name} closed by the peer before it read the request"
                )
            events.append(RequestFailed(request_id, error))
        self._pending.clear()
        # (requests still queued fail as ClosedUnread in _terminate, as on any end)
        # Abort: the peer reads nothing after its goaway, and a peer that then keeps
        # its socket open without reading would hold a graceful close for ever.
        self._terminate(ClosedUnread(f"connection to {name} closed by the peer (goaway)"), True)

    def _reply_inline(self, request_id: int, reply: Message, now: float) -> None:
        """A small answer written even while the transport is paused.

        Our own answers wait while paused, so the transport's buffer stays under
        ``write_buffer_high + max_frame``; beyond that the peer keeps asking but
        does not read its answers: drop it rather than buffer without end.
        """
        if self._paused and self._buffered > self._write_cap:
            self.counters["closed_slow_reader"] += 1
            self.close(
                LimitExceeded(f"{self.name} sends requests but does not read the answers"),
                abort=True,
            )
            return
        parts, length = self._encode(response(request_id, reply))
        self._seal(parts, length, now)

    # -- internals: frames out -------------------------------------------------------

    def _send_queued(self, now: float) -> None:
        waiting = self._waiting
        if not waiting or self._paused or self._closing:
            return
        pending = self._pending
        room = self.limits.max_inflight_per_connection - len(pending)
        while waiting and room > 0:
            request_id = next(iter(waiting))
            cls, parts, length = waiting.pop(request_id)
            pending[request_id] = cls
            self._seal(parts, length, now)
            room -= 1

    def _encode(self, env: Envelope) -> tuple[list[Buffer], int]:
        parts = encode_envelope(env)
        length = 0
        for p in parts:
            length += len(p)
        if length > self.session.max_frame:
            raise LimitExceeded(
                f"{type(env.message).__name__} of {length} bytes exceeds max_frame "
                f"{self.session.max_frame}"
            )
        return parts, length

    def _seal(self, parts: list[Buffer], length: int, now: float) -> None:
        sealed = self.session.seal(parts, length)
        size = 0
        for chunk in sealed:
            size += len(chunk)
        if size <= CORK_MAX:
            self._cork.extend(sealed)
        else:
            cork = self._cork
            if cork:
                self._out.append(cork[0] if len(cork) == 1 else b"".join(cork))
                cork.clear()
            self._out.extend(sealed)
            self.bulk_pending = True
        counters = self.counters
        counters["frames_out"] += 1
        counters["bytes_out"] += size
        self.last_activity = now

    def _take_session_output(self) -> None:
        out = self.session.take_outgoing()
        if out:
            size = 0
            for chunk in out:
                size += len(chunk)
            self.counters["bytes_out"] += size
            self._out.extend(out)


def _without_traceback(error: P2PError) -> P2PError:
    """``error`` and its causes, stripped of their tracebacks: a closed connection
    keeps its error, and a traceback's frames (``self``) would keep the connection
    alive in a reference cycle, freed by the cyclic GC only."""
    exc: BaseException | None = error
    for _ in range(8):  # a chain is short; never loop on a cyclic one
        if exc is None:
            break
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
    return error


__all__ = [
    "ConnectionCore",
    "ConnectionTerminated",
    "Event",
    "HandshakeCompleted",
    "RequestCancelled",
    "RequestFailed",
    "RequestReceived",
    "ResponseReceived",
]
