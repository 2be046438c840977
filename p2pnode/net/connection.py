"""One TCP peer connection: an ``asyncio.BufferedProtocol`` around a :class:`Session`.

Rules
-----
- The socket is read straight into the session's buffers (``get_buffer``);
  frames are decoded synchronously in ``buffer_updated``, so the zero-copy
  views the session hands out never outlive the call.
- Piece data (a large trailing ``Blob``) of a frame received in its own
  buffer is handed out as a view of that buffer, not a copy; the decoder does
  not reuse the buffer while anything references it.
- Requests from the peer run as handler tasks, at most
  ``max_inflight_per_connection`` at once; one more is answered at once with
  ``ErrorReply("busy")`` and counted. ``Ping`` is answered inline. With
  ``request_rate`` set, requests past a per-connection token bucket are
  answered ``busy`` too (counted as ``rate_limited``).
- Our requests get ids from a per-connection counter; answers are matched by
  id, late answers (after a timeout) are counted and dropped. At most
  ``max_inflight_per_connection`` of ours are outstanding per connection (a
  peer with the same limits never has to answer "busy"); more wait locally.
- A payload whose envelope cannot be read is dropped (counted); a request
  with an unknown type or bad fields is answered ``unsupported`` /
  ``bad_request``; an answer with bad fields fails only that request.
  Framing, handshake and authentication failures close the connection (the
  stream cannot be resynchronised).
- Writes: answers and requests wait while the transport is paused
  (``pause_writing``), so a slow reader pushes back on the handlers; a request
  that arrives meanwhile is not even handled until then, so a peer that does
  not read cannot make us read pieces for it and hold them. A transport that
  stays paused for ``write_stall_timeout`` without its buffer shrinking (the
  peer reads nothing) closes the connection (``closed_slow_reader``). Small
  sealed frames are corked until the end of the loop iteration, so requests
  issued together leave in one ``send()``; a large frame first flushes the
  cork (order is kept: the Noise nonces were assigned when sealing).
- Every timer is a loop handle and every task is registered with the owner;
  ``connection_lost`` cancels the timers and handlers and fails what waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

from p2pnode.clock import Clock
from p2pnode.errors import (
    ChannelAuthError,
    ConnectionClosed,
    HandshakeError,
    LimitExceeded,
    NotFoundError,
    P2PError,
    P2PTimeoutError,
    ProtocolError,
    RemoteError,
    UsageError,
)
from p2pnode.identity import peer_id_to_str
from p2pnode.net.config import NetLimits
from p2pnode.net.session import Session
from p2pnode.wire.frame import Buffer
from p2pnode.wire.messages import (
    SCATTER_MIN,
    DecodeLimits,
    Envelope,
    ErrorCode,
    ErrorReply,
    Kind,
    Message,
    MessageDecodeError,
    MessageRegistry,
    Ping,
    Pong,
    UnknownMessageType,
    decode_envelope,
    encode_envelope,
    request,
    response,
)

log = logging.getLogger(__name__)

_CORK_MAX = 16 * 1024

Handler = Callable[[bytes, Message], Awaitable[Message]]


class ConnectionOwner(Protocol):
    """What a connection needs from its host (``PeerHost`` implements it)."""

    limits: NetLimits
    clock: Clock
    registry: MessageRegistry
    decode_limits: DecodeLimits
    counters: Counter[str]

    def handler(self) -> Handler | None: ...
    def conn_made(self, conn: PeerConnection) -> bool: ...
    def conn_established(self, conn: PeerConnection) -> bool: ...
    def conn_lost(self, conn: PeerConnection) -> None: ...
    def own_task(self, task: asyncio.Task[None]) -> None: ...


class PeerConnection(asyncio.BufferedProtocol):
    def __init__(
        self,
        owner: ConnectionOwner,
        session: Session,
        *,
        dialed: tuple[str, int] | None = None,
    ) -> None:
        self.owner = owner
        self.session = session
        self.dialed = dialed
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peername: tuple[str, int] = ("?", 0)
        self.handshake: asyncio.Future[None] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.error: P2PError | None = None
        self.last_activity = owner.clock.now()
        self._counters = owner.counters
        self._limits = owner.limits
        self._pending: dict[int, asyncio.Future[Envelope]] = {}
        self._next_id = 0
        self._handlers: set[asyncio.Task[None]] = set()
        # Our own requests in flight on this connection: as many as the peer
        # (with the same limits) will run at once; the rest queue here.
        self._out_slots = asyncio.Semaphore(self._limits.max_inflight_per_connection)
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._hs_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_mark = 0  # transport buffer size when the stall check was armed
        self._closing = False
        self._write_cap = self._limits.write_buffer_high + self._limits.max_frame
        self._rate = self._limits.request_rate
        self._burst = max(self._limits.request_burst or self._rate, 1.0)
        self._tokens = self._burst
        self._tokens_at = owner.clock.now()
        self._strikes = 0.0
        self._strikes_at = self._tokens_at
        self._cork: list[Buffer] = []
        self._trimmed_at: float | None = None
        self._cork_scheduled = False

    # -- properties --------------------------------------------------------

    @property
    def remote_node_id(self) -> bytes | None:
        return self.session.remote_node_id

    @property
    def is_open(self) -> bool:
        return self.session.established and not self._closing

    @property
    def busy(self) -> bool:
        return bool(self._pending or self._handlers)

    @property
    def inflight(self) -> int:
        return len(self._handlers)

    @property
    def writable(self) -> bool:
        """False while the transport is paused (the peer is behind on reading)."""
        return self._can_write.is_set()

    def describe(self) -> str:
        who = peer_id_to_str(self.remote_node_id) if self.remote_node_id else "?"
        return f"{who}@{self.peername[0]}:{self.peername[1]}"

    # -- asyncio.BufferedProtocol -----------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not subclasses
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peername = (str(peer[0]), int(peer[1]))
        if not self.owner.conn_made(self):
            self._closing = True
            self.error = ConnectionClosed("connection rejected by limits")
            transport.abort()
            return
        high = self._limits.write_buffer_high
        transport.set_write_buffer_limits(high=high, low=high // 4)
        self._hs_timer = self.loop.call_later(
            self._limits.handshake_timeout, self._on_handshake_timeout
        )
        if self.session.initiator:
            self.session.initiate()
            self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.session.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        self._counters["bytes_in"] += nbytes
        was_open = self.session.established
        try:
            frames = self.session.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._flush()  # a reject verdict, if the session queued one
            self._protocol_failure(exc)
            return
        if not was_open:
            self._flush()
            if self.session.established and not self._on_established():
                return
        if frames:
            self._counters["frames_in"] += len(frames)
            self.last_activity = self.owner.clock.now()
            for frame in frames:
                if self._closing:
                    break
                self._on_frame(frame)

    def eof_received(self) -> bool | None:
        try:
            self.session.eof()
        except ProtocolError as exc:
            self._protocol_failure(exc)
        return None  # close our side too

    def pause_writing(self) -> None:
        self._counters["write_pauses"] += 1
        self._can_write.clear()
        if self._stall_timer is None and not self._closing:
            self._arm_stall_check()

    def resume_writing(self) -> None:
        self._can_write.set()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _arm_stall_check(self) -> None:
        assert self.transport is not None
        self._stall_mark = self.transport.get_write_buffer_size()
        self._stall_timer = self.loop.call_later(
            self._limits.write_stall_timeout, self._check_write_stall
        )

    def _check_write_stall(self) -> None:
        """Still paused: fine while the peer reads something (a slow link), dropped
        once a whole ``write_stall_timeout`` went by without any of it read."""
        self._stall_timer = None
        if self._closing or self.transport is None:
            return
        if self.transport.get_write_buffer_size() < self._stall_mark:
            self._arm_stall_check()
            return
        self._counters["closed_slow_reader"] += 1
        self.close(
            LimitExceeded(
                f"{self.describe()} read nothing of our answers for "
                f"{self._limits.write_stall_timeout:g}s"
            ),
            abort=True,
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_timers()
        if self.error is None:
            if not self.session.established:
                self.error = HandshakeError(
                    f"connection to {self.describe()} closed during the handshake"
                    + (f": {exc}" if exc else "")
                )
                self._counters["handshake_failures"] += 1
            else:
                self.error = ConnectionClosed(
                    f"connection to {self.describe()} closed" + (f": {exc}" if exc else "")
                )
        self._settle_handshake(self.error)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(self.error)
        self._pending.clear()
        for task in self._handlers:
            task.cancel()
        self._can_write.set()
        if not self.closed.done():
            self.closed.set_result(None)
        self.owner.conn_lost(self)

    def _flush(self) -> None:
        out = self.session.take_outgoing()
        if out and self.transport is not None and not self.transport.is_closing():
            size = 0
            for chunk in out:
                size += len(chunk)
                self.transport.write(chunk)
            self._counters["bytes_out"] += size

    # -- closing -----------------------------------------------------------

    def close(self, error: P2PError, *, abort: bool = False) -> None:
        """Close the connection (once); ``error`` is what waiting requests get."""
        if self._closing:
            return
        self._closing = True
        self.error = error
        self._settle_handshake(error)
        self._cancel_timers()
        if self.transport is not None:
            if abort:
                _reset_on_close(self.transport)
                self.transport.abort()
            else:
                self._flush_cork()  # e.g. the error reply sent just before
                self.transport.close()

    def _protocol_failure(self, exc: ProtocolError) -> None:
        if isinstance(exc, HandshakeError):
            reason = "handshake_failures"
        elif isinstance(exc, ChannelAuthError):
            reason = "tampered_chunks"
        elif isinstance(exc, LimitExceeded):
            reason = "oversized_frames"
        else:
            reason = "protocol_errors"
        self._counters[reason] += 1
        log.debug("closing %s: %s", self.describe(), exc)
        # A handshake failure may have queued a verdict: close() flushes it.
        self.close(exc, abort=not isinstance(exc, HandshakeError))

    def _settle_handshake(self, error: P2PError) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(error)
            self.handshake.exception()  # retrieved: accepted connections have no awaiter

    def _cancel_timers(self) -> None:
        for timer in (self._hs_timer, self._idle_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._hs_timer = self._idle_timer = self._stall_timer = None

    def _on_handshake_timeout(self) -> None:
        self._hs_timer = None
        if self.session.established or self._closing:
            return
        self._counters["handshake_timeouts"] += 1
        self.close(
            P2PTimeoutError(
                f"handshake with {self.describe()} timed out after "
                f"{self._limits.handshake_timeout:g}s"
            ),
            abort=True,
        )

    def _on_established(self) -> bool:
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        if not self.owner.conn_established(self):
            return False
        self.last_activity = self.owner.clock.now()
        self._arm_idle(min(self._limits.idle_timeout, self._limits.trim_after))
        if not self.handshake.done():
            self.handshake.set_result(None)
        return True

    def _arm_idle(self, delay: float) -> None:
        self._idle_timer = self.loop.call_later(max(delay, 0.0), self._check_idle)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._closing:
            return
        idle = self._limits.idle_timeout
        if self._pending or self._handlers:
            self._trimmed_at = None
            self._arm_idle(min(idle, self._limits.trim_after))
            return
        elapsed = self.owner.clock.now() - self.last_activity
        if elapsed >= idle:
            self._counters["idle_closed"] += 1
            self.close(ConnectionClosed(f"connection to {self.describe()} closed: idle"))
            return
        if elapsed >= self._limits.trim_after and self._trimmed_at != self.last_activity:
            # quiet for a while: give back the read buffers and pooled bodies
            self.session.trim()
            self._trimmed_at = self.last_activity
        if elapsed < self._limits.trim_after:
            self._arm_idle(min(idle, self._limits.trim_after) - elapsed)
        else:
            self._arm_idle(idle - elapsed)

    # -- frames in ---------------------------------------------------------

    def _on_frame(self, payload: memoryview) -> None:
        # A large frame in its own buffer: piece data stays a view of it (no copy);
        # the buffer is not reused while the message is referenced.
        views = len(payload) >= SCATTER_MIN and self.session.stable(payload)
        try:
            env = decode_envelope(
                payload, self.owner.decode_limits, self.owner.registry, views=views
            )
        except UnknownMessageType as exc:
            self._counters["unknown_messages"] += 1
            if self._strike():
                self._bad_message(exc, ErrorCode.UNSUPPORTED)
            return
        except MessageDecodeError as exc:
            self._counters["bad_messages"] += 1
            if self._strike():
                self._bad_message(exc, ErrorCode.BAD_REQUEST)
            return
        if env.kind is Kind.REQUEST:
            self._on_request(env.request_id, env.message)
            return
        fut = self._pending.pop(env.request_id, None)
        if fut is None or fut.done():
            self._counters["unexpected_responses"] += 1
            self._strike()
            return
        fut.set_result(env)

    def _strike(self) -> bool:
        """Count one misbehaviour; drop the connection past the budget.
        True while the connection stays open."""
        now = self.owner.clock.now()
        decayed = self._strikes - (now - self._strikes_at) * self._limits.strike_decay
        self._strikes = max(0.0, decayed) + 1.0
        self._strikes_at = now
        if self._strikes <= self._limits.max_strikes:
            return True
        self._counters["closed_misbehaving"] += 1
        self.close(
            ProtocolError(f"{self.describe()} sent too many bad messages; dropped"), abort=True
        )
        return False

    def _bad_message(self, exc: MessageDecodeError, code: str) -> None:
        log.debug("bad message from %s: %s", self.describe(), exc)
        if exc.request_id is None:
            return  # unreadable envelope: drop the packet
        if exc.kind == Kind.REQUEST:
            self._reply_inline(exc.request_id, ErrorReply(code, str(exc)[:1024]))
            return
        fut = self._pending.pop(exc.request_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(ProtocolError(f"bad answer from {self.describe()}: {exc}"))

    def _on_request(self, request_id: int, msg: Message) -> None:
        self._counters["requests_in"] += 1
        if self._rate > 0 and not self._take_token():
            self._counters["rate_limited"] += 1
            if self._strike():
                self._reply_inline(request_id, ErrorReply(ErrorCode.BUSY, "request rate limit"))
            return
        if isinstance(msg, Ping):
            self._reply_inline(request_id, Pong())
            return
        if len(self._handlers) >= self._limits.max_inflight_per_connection:
            self._counters["rejected_busy"] += 1
            self._reply_inline(
                request_id, ErrorReply(ErrorCode.BUSY, "too many requests in flight")
            )
            return
        task = self.loop.create_task(self._serve(request_id, msg))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        self.owner.own_task(task)

    def _take_token(self) -> bool:
        now = self.owner.clock.now()
        tokens = self._tokens + (now - self._tokens_at) * self._rate
        self._tokens = min(tokens, self._burst)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _reply_inline(self, request_id: int, reply: Message) -> None:
        """A small answer written without waiting for the transport.

        Handlers wait while the transport is paused, so its buffer stays under
        ``write_buffer_high + max_frame``. Beyond that, the peer keeps asking
        but does not read its answers: drop it rather than buffer without end.
        """
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size() > self._write_cap:
            self._counters["closed_slow_reader"] += 1
            self.close(
                LimitExceeded(f"{self.describe()} sends requests but does not read the answers"),
                abort=True,
            )
            return
        self._send_now(response(request_id, reply))

    async def _serve(self, request_id: int, msg: Message) -> None:
        while not self._can_write.is_set():  # see the module rules: no work for
            await self._can_write.wait()  # a peer that does not read its answers
        reply = await self._call_handler(msg)
        try:
            while not self._can_write.is_set():
                await self._can_write.wait()
            self._send_now(response(request_id, reply))  # a no-op once closing
        except (UsageError, LimitExceeded) as exc:
            # The handler built something we cannot send (bad fields, too large).
            log.error("cannot send answer to %s: %s", type(msg).__name__, exc)
            self._counters["handler_errors"] += 1
            self._send_now(response(request_id, ErrorReply(ErrorCode.INTERNAL, str(exc)[:1024])))
        finally:
            self.last_activity = self.owner.clock.now()

    async def _call_handler(self, msg: Message) -> Message:
        handler = self.owner.handler()
        node_id = self.remote_node_id
        assert node_id is not None
        if handler is None:
            return ErrorReply(ErrorCode.UNSUPPORTED, "no handler for requests")
        try:
            reply = await handler(node_id, msg)
        except NotFoundError as exc:
            return ErrorReply(ErrorCode.NOT_FOUND, str(exc)[:1024])
        except LimitExceeded as exc:
            return ErrorReply(ErrorCode.BUSY, str(exc)[:1024])
        except (ProtocolError, UsageError) as exc:
            return ErrorReply(ErrorCode.BAD_REQUEST, str(exc)[:1024])
        except Exception:
            # The handler boundary: a bug in a handler must not kill the
            # connection. Logged with its traceback, counted, answered.
            log.exception("request handler failed on %s", type(msg).__name__)
            self._counters["handler_errors"] += 1
            return ErrorReply(ErrorCode.INTERNAL, "internal error")
        if not isinstance(reply, Message):
            log.error("request handler returned %r for %s", type(reply), type(msg).__name__)
            self._counters["handler_errors"] += 1
            return ErrorReply(ErrorCode.INTERNAL, "internal error")
        return reply

    # -- frames out --------------------------------------------------------

    async def _writable(self) -> None:
        while not self._can_write.is_set():
            await self._can_write.wait()
        if self._closing:
            raise self.error or ConnectionClosed(f"connection to {self.describe()} closed")

    def _send_now(self, env: Envelope) -> None:
        if self._closing or self.transport is None:
            return
        parts = encode_envelope(env)
        length = 0
        for p in parts:
            length += len(p)
        if length > self.session.max_frame:
            raise LimitExceeded(
                f"{type(env.message).__name__} of {length} bytes exceeds max_frame "
                f"{self.session.max_frame}"
            )
        sealed = self.session.seal(parts, length)
        size = 0
        for chunk in sealed:
            size += len(chunk)
        if size <= _CORK_MAX:
            # Small frames written in one loop iteration leave in one send().
            self._cork.extend(sealed)
            if not self._cork_scheduled:
                self._cork_scheduled = True
                self.loop.call_soon(self._flush_cork)
        else:
            if self._cork:
                self._flush_cork()
            write = self.transport.write
            for chunk in sealed:
                write(chunk)
        self._counters["frames_out"] += 1
        self._counters["bytes_out"] += size
        self.last_activity = self.owner.clock.now()

    def _flush_cork(self) -> None:
        self._cork_scheduled = False
        if not self._cork:
            return
        data = self._cork[0] if len(self._cork) == 1 else b"".join(self._cork)
        self._cork.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def request(self, msg: Message) -> Message:
        """Send ``msg`` and wait for its answer (no timeout: the caller bounds it)."""
        if self._out_slots.locked():
            self._counters["requests_queued"] += 1
        async with self._out_slots:
            return await self._request(msg)

    async def _request(self, msg: Message) -> Message:
        if self._closing:
            raise self.error or ConnectionClosed(f"connection to {self.describe()} closed")
        request_id = self._next_id
        while request_id in self._pending:
            request_id = (request_id + 1) & 0xFFFFFFFF
        self._next_id = (request_id + 1) & 0xFFFFFFFF
        fut: asyncio.Future[Envelope] = self.loop.create_future()
        self._pending[request_id] = fut
        self._counters["requests_out"] += 1
        try:
            await self._writable()
            self._send_now(request(request_id, msg))
            env = await fut
        finally:
            if self._pending.get(request_id) is fut:
                del self._pending[request_id]
            if fut.done() and not fut.cancelled():
                fut.exception()  # mark retrieved
        if env.kind is Kind.ERROR:
            assert isinstance(env.message, ErrorReply)
            self._counters["remote_errors"] += 1
            raise RemoteError(env.message.code, env.message.message)
        expected = type(msg).RESPONSE_TYPE
        if expected is not None and type(env.message) is not expected:
            self._counters["bad_messages"] += 1
            raise ProtocolError(
                f"{self.describe()} answered {type(msg).__name__} with "
                f"{type(env.message).__name__}, expected {expected.__name__}"
            )
        return env.message


_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset_on_close(transport: asyncio.Transport) -> None:
    """Make the coming close send a RST and drop unsent data (SO_LINGER 0).

    Without it, a dropped peer that does not read keeps an orphaned socket
    and up to the kernel's send buffer of our data alive after we let go.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
