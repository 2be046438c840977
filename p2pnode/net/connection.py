"""One TCP peer connection: the asyncio shell around a :class:`ConnectionCore`.

The protocol (request ids, limits, strikes, deadlines, corking) is the core's,
in ``p2pnode/net/core.py``; this class moves bytes between the transport and
the core, maps request ids to futures, runs the handler tasks and arms one
loop timer at ``core.next_deadline()``.

Rules
-----
- The transport reads straight into the session's buffers (``get_buffer``);
  frames are decoded synchronously in ``buffer_updated``, so the zero-copy
  views the session hands out never outlive the call, except piece data in a
  frame's own buffer, which is not reused while a view of it is alive.
- After every input the shell writes ``core.data_to_send()``, handles the
  events and re-arms the timer. Answers and requests made by tasks are
  written at the end of the loop iteration (small frames made together leave
  in one ``write``), a large frame at once.
- Any transport works that offers ``write``/``close``/``abort``/``is_closing``/
  ``get_extra_info``/``set_write_buffer_limits``/``get_write_buffer_size``
  and calls the ``BufferedProtocol`` methods (an in-memory one in the
  simulator: ``get_extra_info("socket")`` may be None there).
- Handlers run as tasks owned by the host, at most
  ``max_inflight_per_connection`` per connection (the core answers the rest
  busy). The handler boundary turns exceptions into ``ErrorReply`` answers.
- Cancellation, both ways (the core's cancel rules): a :meth:`PeerConnection.request`
  whose caller gives up (its task is cancelled: a timeout, an endgame
  duplicate, a call abandoned) tells the core, which sends the peer a cancel;
  a cancel from the peer cancels that request's handler task (``CancelledError``
  in the handler, so a piece read or a service call stops) and no answer is
  sent; the core hears when the task has ended.
- ``connection_lost`` cancels the timer and the handlers and fails what waits.
- A graceful :meth:`PeerConnection.close` ends with the core's goaway (a
  request crossing it fails ``ClosedUnread``: the host sends it again);
  :meth:`PeerConnection.abort_if_unsent` then resets a connection whose
  transport could not take it all (a peer that does not read).
- Memory: after every pump and read the bytes this connection holds for its peer (the
  transport's write buffer, answers held while paused, receive buffers) are
  counted in the owner's :class:`~p2pnode.net.memory.MemoryBudget` under the
  peer's node id (a delta, O(1)); all of it is given back when the connection
  is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import logging
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol, cast

from p2pnode.clock import Clock
from p2pnode.errors import (
    ConnectionClosed,
    LimitExceeded,
    NotFoundError,
    P2PError,
    ProtocolError,
    UsageError,
)
from p2pnode.net.config import NetLimits
from p2pnode.net.core import (
    ConnectionCore,
    ConnectionTerminated,
    Event,
    HandshakeCompleted,
    RequestCancelled,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
)
from p2pnode.net.memory import MemoryBudget
from p2pnode.net.session import Session
from p2pnode.wire.messages import (
    DecodeLimits,
    Envelope,
    ErrorCode,
    ErrorReply,
    Message,
    MessageRegistry,
)

log = logging.getLogger(__name__)

Handler = Callable[[bytes, Message], Awaitable[Message]]

# The connection whose request a handler is serving (set in that handler's own
# task): AutoNAT checks that a dial-back arrived on a fresh inbound connection.
serving: contextvars.ContextVar[PeerConnection | None] = contextvars.ContextVar(
    "serving", default=None
)


class ConnectionOwner(Protocol):
    """What a connection needs from its host (``PeerHost`` implements it)."""

    limits: NetLimits
    clock: Clock
    registry: MessageRegistry
    decode_limits: DecodeLimits
    counters: Counter[str]
    memory: MemoryBudget

    def handler(self) -> Handler | None: ...
    def conn_made(self, conn: PeerConnection) -> bool: ...
    def conn_established(self, conn: PeerConnection) -> bool: ...
    def conn_lost(self, conn: PeerConnection) -> None: ...
    def handler_started(self, task: asyncio.Task[None]) -> None: ...
    def handler_ended(self, task: asyncio.Task[None]) -> None: ...


class PeerConnection(asyncio.BufferedProtocol):
    def __init__(
        self,
        owner: ConnectionOwner,
        session: Session,
        *,
        dialed: tuple[str, int] | None = None,
        via: str = "direct",
    ) -> None:
        self.owner = owner
        self.session = session
        self.dialed = dialed
        # how the bytes travel: "direct" (a TCP connection between the two
        # nodes), "relayed" (spliced by a relay) or "punched" (hole punching)
        self.via = via
        # dialed for one caller only (PeerHost.dial_fresh): never handed out by the pool
        self.exclusive = False
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peername: tuple[str, int] = ("?", 0)
        self.handshake: asyncio.Future[None] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._clock = owner.clock
        self.core = ConnectionCore(
            session,
            owner.limits,
            self._clock.now(),
            registry=owner.registry,
            decode_limits=owner.decode_limits,
            counters=owner.counters,
        )
        self._futures: dict[int, asyncio.Future[Envelope]] = {}
        self._handlers: dict[int, asyncio.Task[None]] = {}  # by request id
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self._lost = False
        # what this connection holds, as last counted in owner.memory (under _mem_key)
        self._mem_key: bytes | None = None
        self._mem_held = 0
        # over budget, a receive buffer larger than a fair share of it is shed
        self._shed_above = owner.memory.total // max(1, owner.limits.max_connections)

    # -- properties --------------------------------------------------------

    @property
    def remote_node_id(self) -> bytes | None:
        return self.session.remote_node_id

    @property
    def error(self) -> P2PError | None:
        return self.core.error

    @property
    def is_open(self) -> bool:
        return self.core.is_open

    @property
    def busy(self) -> bool:
        return self.core.busy or bool(self._handlers)

    @property
    def inflight(self) -> int:
        return self.core.inflight

    @property
    def last_activity(self) -> float:
        return self.core.last_activity

    @property
    def writable(self) -> bool:
        """False while the transport is paused (the peer is behind on reading)."""
        return self._can_write.is_set()

    def describe(self) -> str:
        return self.core.name

    # -- asyncio.BufferedProtocol -----------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not subclasses
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peername = (str(peer[0]), int(peer[1]))
        self.core.address = f"{self.peername[0]}:{self.peername[1]}"
        if self.core.closing:  # the dial was given up while the connect went on
            transport.abort()
            return
        if not self.owner.conn_made(self):
            self.core.close(ConnectionClosed("connection rejected by limits"), abort=True)
            self._pump()
            return
        high = self.owner.limits.write_buffer_high
        transport.set_write_buffer_limits(high=high, low=high // 4)
        self.core.start(self._clock.now())
        self._pump()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.core.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        core = self.core
        if core.paused and self.transport is not None:
            core.write_buffered(self.transport.get_write_buffer_size())
        core.receive_data(nbytes, self._clock.now())
        if core.has_output:  # most reads only fill a piece's body
            self._pump()
        elif self._mem_key is not None:
            self._account()  # a body growing as it arrives
            if self.owner.memory.over and self.session.receiving > self._shed_above:
                # Shed the newest work: the frame whose growth took the node over its
                # budget (a small one is let through: control messages must pass).
                self.owner.counters["closed_memory"] += 1
                self.close(ConnectionClosed("receive buffer over the memory budget"), abort=True)

    def eof_received(self) -> bool | None:
        self.core.eof_received(self._clock.now())
        self._pump()
        return None  # close our side too

    def pause_writing(self) -> None:
        assert self.transport is not None
        self._can_write.clear()
        self.core.pause_writing(self.transport.get_write_buffer_size(), self._clock.now())
        self._arm_timer()

    def resume_writing(self) -> None:
        self._can_write.set()
        self.core.resume_writing(self._clock.now())
        self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.core.connection_lost(exc, self._clock.now())
        self._pump()
        for task in list(self._handlers.values()):
            task.cancel()
        self._can_write.set()
        if not self.closed.done():
            self.closed.set_result(None)
        if self._mem_key is not None:
            self.owner.memory.release(self._mem_key, self._mem_held)
            self._mem_key = None
            self._mem_held = 0
        self.owner.conn_lost(self)

    # -- the core's outputs -------------------------------------------------

    def _pump(self) -> None:
        """Write what the core has to send, handle its events, re-arm the timer."""
        core = self.core
        while True:
            out = core.data_to_send()
            if out:
                self._write(out)
            events = core.take_events()
            if not events:
                if core.has_held_answers and not core.paused:
                    core.release_held(self._clock.now())  # one large answer at a time
                    continue
                break
            for event in events:
                self._on_event(event)
        if self._mem_key is not None:
            self._account()
        self._arm_timer()

    def _account(self) -> None:
        """Count what this connection holds now in the owner's memory budget."""
        key = self._mem_key
        assert key is not None
        # pooled receive bodies are left out: our own downloads keep them for speed
        held = self.core.held_bytes + self.session.receiving
        transport = self.transport
        if transport is not None and not self._lost:
            held += transport.get_write_buffer_size()
        delta = held - self._mem_held
        if delta:
            self._mem_held = held
            self.owner.memory.track(key, delta)

    def _write(self, out: list[bytes | bytearray | memoryview]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for chunk in out:
            transport.write(chunk)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._pump()

    def _after_send(self) -> None:
        """A task sealed a frame: a large one leaves now, small ones at the end of
        the loop iteration, together."""
        if self.core.bulk_pending:
            self._pump()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _on_event(self, event: Event) -> None:
        # most frequent first: answers and requests are the data path
        if isinstance(event, ResponseReceived):
            fut = self._futures.pop(event.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(event.envelope)
        elif isinstance(event, RequestReceived):
            if self.core.closing:
                return
            request_id = event.request_id
            task = self.loop.create_task(self._serve(request_id, event.message))
            self._handlers[request_id] = task
            task.add_done_callback(partial(self._handler_done, request_id))
            self.owner.handler_started(task)
        elif isinstance(event, RequestCancelled):
            handler = self._handlers.get(event.request_id)
            if handler is None:
                self.core.handler_stopped(event.request_id)
            else:
                handler.cancel("cancelled by the peer")
        elif isinstance(event, RequestFailed):
            fut = self._futures.pop(event.request_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(event.error)
        elif isinstance(event, HandshakeCompleted):
            if not self._lost:
                self._mem_key = event.remote_node_id
            if self.owner.conn_established(self) and not self.handshake.done():
                self.handshake.set_result(None)
        else:
            self._terminated(event)

    def _handler_done(self, request_id: int, task: asyncio.Task[None]) -> None:
        # the one done callback of a handler (each costs a loop round)
        if self._handlers.get(request_id) is task:
            del self._handlers[request_id]
        self.core.handler_stopped(request_id)  # (also a handler that ignored its cancel)
        self.owner.handler_ended(task)

    def _terminated(self, event: ConnectionTerminated) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        # Waiters get copies: a raised exception gains a traceback whose frames
        # may hold this connection; the core's own stays without one (no cycle).
        error = event.error
        if not self.handshake.done():
            self.handshake.set_exception(_copy_error(error))
            self.handshake.exception()  # retrieved: accepted connections have no awaiter
        futures, self._futures = self._futures, {}
        for fut in futures.values():
            if not fut.done():
                fut.set_exception(_for_waiter(error))
        transport = self.transport
        if transport is None or self._lost:
            return
        if event.abort:
            _reset_on_close(transport)
            transport.abort()
        else:
            transport.close()  # after what _pump wrote just before
            # A close waits for the write buffer to drain: a peer that stops
            # reading would hold the connection (and its budget slot) for ever.
            self.loop.call_later(self.owner.limits.write_stall_timeout, self.abort_if_unsent)

    def _arm_timer(self) -> None:
        at = self.core.next_deadline()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            delay = max(at - self._clock.now(), 0.0)
            self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        core = self.core
        if core.paused and self.transport is not None:
            core.write_buffered(self.transport.get_write_buffer_size())
        core.handle_timer(self._clock.now())
        self._pump()

    # -- closing -----------------------------------------------------------

    def close(self, error: P2PError, *, abort: bool = False) -> None:
        """Close the connection (once); ``error`` is what waiting requests get."""
        self.core.close(error, abort=abort)
        self._pump()

    def abort_if_unsent(self) -> None:
        """After a graceful close: reset the connection if the transport still holds
        bytes (a peer that does not read would keep it open)."""
        transport = self.transport
        if transport is None or self._lost or not transport.get_write_buffer_size():
            return
        _reset_on_close(transport)
        transport.abort()

    # -- requests from the peer -------------------------------------------

    async def _serve(self, request_id: int, msg: Message) -> None:
        serving.set(self)  # this task's context only
        while not self._can_write.is_set():  # no work for a peer that does not read
            await self._can_write.wait()
        if self.core.closing:
            return
        reply = await self._call_handler(msg)
        core = self.core
        try:
            core.send_response(request_id, reply, self._clock.now())
        except (UsageError, LimitExceeded) as exc:
            # The handler built something we cannot send (bad fields, too large).
            log.error("cannot send answer to %s: %s", type(msg).__name__, exc)
            self.owner.counters["handler_errors"] += 1
            error = ErrorReply(ErrorCode.INTERNAL, str(exc)[:1024])
            core.send_response(request_id, error, self._clock.now())
        self._after_send()

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
            self.owner.counters["handler_errors"] += 1
            return ErrorReply(ErrorCode.INTERNAL, "internal error")
        if not isinstance(reply, Message):
            log.error("request handler returned %r for %s", type(reply), type(msg).__name__)
            self.owner.counters["handler_errors"] += 1
            return ErrorReply(ErrorCode.INTERNAL, "internal error")
        return reply

    # -- our requests -------------------------------------------------------

    async def request(self, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg`` and wait for its answer. Past ``timeout`` seconds (none: the
        caller bounds the wait) raise ``TimeoutError``; the peer is told either way."""
        request_id = self.core.send_request(msg, self._clock.now())
        fut: asyncio.Future[Envelope] = self.loop.create_future()
        self._futures[request_id] = fut
        self._after_send()
        timer = None
        if timeout is not None:
            timer = self.loop.call_later(max(timeout, 0.0), self._timed_out, request_id, fut)
        try:
            env = await fut
        except asyncio.CancelledError:
            self._give_up(request_id, fut)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        return env.message

    def _timed_out(self, request_id: int, fut: asyncio.Future[Envelope]) -> None:
        if not fut.done():
            self._give_up(request_id, fut)
            fut.set_exception(TimeoutError())

    def _give_up(self, request_id: int, fut: asyncio.Future[Envelope]) -> None:
        if self._futures.pop(request_id, None) is fut:
            self.core.cancel_request(request_id, self._clock.now())
            self._after_send()

    def _send_now(self, env: Envelope) -> None:
        """Seal ``env`` as is (no id bookkeeping) and write it (tests, tools)."""
        self.core.send_envelope(env, self._clock.now())
        self._after_send()


_LINGER_RESET = struct.pack("ii", 1, 0)


def _for_waiter(error: P2PError) -> P2PError:
    """What a request still waiting gets when its connection ends with ``error``.

    A limit that ended the connection (a peer that sends oversized frames or does
    not read our answers) came after the request left: for its caller the
    connection closed, and the peer may have run the request. As itself it would
    read as "our own limit, before sending", which a caller may take as safe to
    send elsewhere (a service call) or as no fault of the peer's (a download)."""
    if isinstance(error, LimitExceeded):
        closed = ConnectionClosed(f"connection closed: {error}")
        closed.__cause__ = _copy_error(error)
        return closed
    return _copy_error(error)


def _copy_error(error: P2PError) -> P2PError:
    """A copy of ``error`` for one waiter (the error itself if it cannot be copied)."""
    try:
        return copy.copy(error)
    except TypeError:
        return error


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
