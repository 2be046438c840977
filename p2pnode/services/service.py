"""Services between peers: the asyncio shell around ``ServicesCore``.

Rules:

- Serving: ``serve``/``serve_stream`` register a handler under a validated name
  and announce it in the DHT under ``service_key(name)`` (again once the node
  has contacts, and every ``ANNOUNCE_INTERVAL``); ``unserve`` stops the
  announcements and refuses new calls (calls running finish).
- Calls from peers arrive as the messages of ``services/messages.py`` through the
  host's request routes. Each is admitted by the core (limits, typed refusals),
  decoded strictly, and run under its deadline (the caller's, cut to the
  service's ``max_deadline``). A handler that raises is answered
  ``handler_error`` with its message; a reply past ``max_reply`` ``too_large``.
- Streams are pulled: the producer (the service's async iterator) is advanced
  only while the consumer has granted credit, so a slow consumer holds the
  producer; a stream nobody pulls for ``stream_idle_timeout`` is ended. Items
  produced and not yet delivered are held in the host's memory budget (full:
  the stream ends ``overloaded``); with the budget spent, new calls are refused
  ``overloaded``.
- A caller's cancel (the request mux's, net/core.py) cancels the handler's task
  (its ``CallContext.cancelled`` is then true) and nothing is answered; a
  cancelled ``StreamPull``, or a ``StreamClose``, ends the stream and cancels
  its producer.
- Calling: providers come from the DHT (or ``peer=``), ordered by
  ``ProviderRanking`` (measured RTT, recent failures). A provider that refused
  before running the call (not found, overloaded, unreachable) is skipped for
  the next one; one that failed mid-call is skipped only if it said the service
  is idempotent (``Describe``, sent alongside the first call to each provider
  and remembered), otherwise the failure is reported. Typed answers (handler
  error, too large, deadline) end the call at once.
- A caller whose deadline passes, or that is cancelled, cancels its request (the
  connection tells the provider, which stops the handler); a stream left before
  its end is closed: its pull, if one is out, is cancelled and ``StreamClose``
  follows (the pull's answer may have crossed the cancel).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p2pnode.clock import MONOTONIC, Clock
from p2pnode.errors import (
    BadServiceRequest,
    ClosedUnread,
    DeadlineExceeded,
    HandlerError,
    HandshakeError,
    LimitExceeded,
    NoProviders,
    P2PError,
    P2PTimeoutError,
    PeerUnreachable,
    ProvidersFailed,
    RemoteError,
    RequestTimeout,
    ServiceError,
    ServiceNotFound,
    ServiceOverloaded,
    TooLarge,
    UsageError,
    service_error,
)
from p2pnode.exchange.ranking import Failure, ProviderRanking
from p2pnode.identity import as_node_id, peer_id_to_str
from p2pnode.net.dispatch import RequestRoutes, routes_of
from p2pnode.net.host import PeerAddress
from p2pnode.services.core import (
    Kind,
    NodeServiceLimits,
    Refusal,
    ServiceLimits,
    ServicesCore,
    ServiceState,
    StreamCredit,
)
from p2pnode.services.messages import (
    MAX_CREDIT_PER_PULL,
    SERVICE_REQUESTS,
    Call,
    Describe,
    Reply,
    ServiceErrorCode,
    ServiceInfo,
    StreamClose,
    StreamClosed,
    StreamItems,
    StreamOpen,
    StreamOpened,
    StreamPull,
    register,
)
from p2pnode.services.names import service_key, validate_service_name
from p2pnode.services.values import ValueLimits, decode_value, encode_value
from p2pnode.tasks import TaskSet
from p2pnode.wire.messages import ErrorCode, ErrorReply, Message

if TYPE_CHECKING:
    from p2pnode.dht.discovery import Discovery, ProviderRecord
    from p2pnode.net.host import PeerHost

__all__ = ["CallContext", "Services", "StreamHandler", "UnaryHandler"]

log = logging.getLogger(__name__)

ANNOUNCE_INTERVAL = 1800.0
CONTACT_POLL = 1.0
CLIENT_WINDOW = 32  # stream items a caller grants ahead
DESCRIBED_CACHE = 1024
PROVIDER_CACHE_TTL = 30.0
PROVIDER_CACHE_NAMES = 256
NAMES_CACHE = 1024
# Room in a frame for everything but the value itself.
FRAME_OVERHEAD = 4096
# How long closing a stream between pulls may take (it is sent in the background).
CLOSE_TIMEOUT = 5.0


class CallContext:
    """What a handler knows about the call it serves."""

    __slots__ = ("_closed", "_task", "deadline", "expired", "peer_id", "service")

    def __init__(
        self,
        peer_id: bytes,
        service: str,
        deadline: float,
        task: asyncio.Task[Any] | None = None,
    ) -> None:
        self.peer_id = peer_id
        self.service = service
        self.deadline = deadline  # seconds left when the call started
        self.expired = False  # set when the deadline passed (the task is cancelled too)
        self._task = task  # the handler's (a unary call)
        self._closed = False  # the caller closed the stream

    @property
    def cancelled(self) -> bool:
        """Whether the caller gave up (its cancel, or its connection went away): the
        handler's task is being cancelled for that, not for the deadline."""
        if self._closed:
            return True
        task = self._task
        return task is not None and not self.expired and task.cancelling() > 0

    def close(self) -> None:
        """The caller closed the stream."""
        self._closed = True


UnaryHandler = Callable[[Any, CallContext], Awaitable[Any]]
StreamHandler = Callable[[Any, CallContext], AsyncIterator[Any]]


@dataclass
class _Served:
    kind: Kind
    handler: Callable[[Any, CallContext], Any]
    limits: ServiceLimits

    def __post_init__(self) -> None:
        self.request_limits = ValueLimits(max_size=self.limits.max_request)
        self.reply_limits = ValueLimits(max_size=self.limits.max_reply)


class _Stream:
    """A stream being served: its credit, its producer, who is waiting on whom."""

    def __init__(self, peer: bytes, call_id: int, state: ServiceState, ctx: CallContext) -> None:
        self.peer = peer
        self.call_id = call_id
        self.state = state
        self.ctx = ctx
        self.credit = StreamCredit(state.limits.max_credit)
        self.producer: asyncio.Task[None] | None = None
        self.pulling = False
        self.last_active = 0.0
        self.reserved = 0  # bytes of produced items held in the node's memory budget
        self.credit_given = asyncio.Event()  # wakes the producer
        self.items_ready = asyncio.Event()  # wakes a pull


class Services:
    """This node's services: what it serves, and calls to other nodes' (module rules)."""

    def __init__(
        self,
        host: PeerHost,
        discovery: Discovery,
        port: int,
        *,
        clock: Clock = MONOTONIC,
        limits: NodeServiceLimits | None = None,
    ) -> None:
        self._host = host
        self._discovery = discovery
        self._port = port
        self._clock = clock
        self.core = ServicesCore(limits)
        self._served: dict[str, _Served] = {}
        self._streams: dict[tuple[bytes, int], _Stream] = {}
        self._tasks = TaskSet("services")
        self._routes: RequestRoutes | None = None
        self.ranking = ProviderRanking()
        # name -> (expires, providers): a DHT lookup per call would cost more than the call
        self._provider_cache: dict[str, tuple[float, list[ProviderRecord]]] = {}
        # per-call work done once: names checked, peer ids parsed, peers located
        self._valid_names: set[str] = set()
        self._node_ids: dict[str | bytes, bytes] = {}
        self._known_peers: dict[bytes, ProviderRecord] = {}
        self._described: OrderedDict[tuple[bytes, str], ServiceInfo] = OrderedDict()
        self._next_call_id = int.from_bytes(host.node_id[:4], "big") << 24
        self._serving = asyncio.Event()  # set once something is served
        self._streams_open = asyncio.Event()  # set while streams are open
        self._value_limit = host.limits.max_frame - FRAME_OVERHEAD
        self._call_limits = ValueLimits(max_size=self._value_limit)
        register(host.registry)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._routes = routes = routes_of(self._host)
        routes.route((Describe,), self._on_describe)
        routes.route((Call,), self._on_call)
        routes.route((StreamOpen,), self._on_stream_open)
        routes.route((StreamPull,), self._on_stream_pull)
        routes.route((StreamClose,), self._on_stream_close)
        self._tasks.spawn(self._announce_loop(), "announce")
        self._tasks.spawn(self._expire_streams(), "stream-janitor")

    async def close(self) -> None:
        if self._routes is not None:  # (a test may have put its own handler in place)
            self._routes.unroute(SERVICE_REQUESTS)
        for stream in list(self._streams.values()):
            self._drop_stream(stream)
        await self._tasks.close()

    # -- serving --------------------------------------------------------------

    def serve(
        self,
        name: str,
        handler: UnaryHandler,
        *,
        idempotent: bool = False,
        limits: ServiceLimits | None = None,
    ) -> None:
        self._serve(name, Kind.UNARY, handler, idempotent, limits)

    def serve_stream(
        self,
        name: str,
        handler: StreamHandler,
        *,
        idempotent: bool = False,
        limits: ServiceLimits | None = None,
    ) -> None:
        self._serve(name, Kind.STREAM, handler, idempotent, limits)

    def _serve(
        self,
        name: str,
        kind: Kind,
        handler: Callable[[Any, CallContext], Any],
        idempotent: bool,
        limits: ServiceLimits | None,
    ) -> None:
        validate_service_name(name)
        if not callable(handler):
            raise UsageError("a service handler must be callable")
        limits = limits or ServiceLimits()
        if limits.max_reply > self._value_limit or limits.max_request > self._value_limit:
            raise UsageError(
                f"max_request and max_reply must fit a frame (at most {self._value_limit} bytes)"
            )
        self._served[name] = _Served(kind, handler, limits)
        self._serving.set()
        self.core.add(name, kind, idempotent, limits)
        self._tasks.spawn(self._announce(name), f"announce-{name}")

    def unserve(self, name: str) -> None:
        validate_service_name(name)
        if self._served.pop(name, None) is None:
            raise ServiceNotFound(f"this node does not serve {name!r}", service=name)
        self.core.remove(name)
        self._discovery.remove_provider(service_key(name))
        if not self._served:
            self._serving.clear()

    def services(self) -> list[dict[str, Any]]:
        return [state.describe() for state in self.core.services.values()]

    def stats(self) -> dict[str, int]:
        out = self.core.stats()
        out["streams_open"] = len(self._streams)
        return out

    async def _announce(self, name: str) -> None:
        if name not in self._served:
            return
        key = service_key(name)
        try:
            accepted = await self._discovery.add_provider(key, self._port)
        except P2PError as exc:
            log.warning("announcing service %s failed: %s", name, exc)
            return
        state = self.core.services.get(name)
        if state is None:  # unserved meanwhile: do not leave it announced
            self._discovery.remove_provider(key)
        else:
            state.announced_to = accepted

    async def _announce_loop(self) -> None:
        """Announce again once the DHT has contacts (a node joins after start), and
        every ANNOUNCE_INTERVAL (the DHT also republishes on its own)."""
        last = self._clock.now()
        had_contacts = bool(self._discovery.contacts())
        while True:
            if not self._served:  # nothing to announce: no polling (simulations run many nodes)
                await self._serving.wait()
            await asyncio.sleep(CONTACT_POLL)
            has_contacts = bool(self._discovery.contacts())
            now = self._clock.now()
            if (has_contacts and not had_contacts) or now - last >= ANNOUNCE_INTERVAL:
                for name in list(self._served):
                    await self._announce(name)
                last = now
            had_contacts = has_contacts

    # -- requests from peers ----------------------------------------------------

    async def _on_describe(self, remote: bytes, msg: Message) -> Message:
        assert isinstance(msg, Describe)
        state = self.core.services.get(msg.service)
        if state is None:
            return _error(ServiceErrorCode.NOT_FOUND, f"no service {msg.service!r} here")
        return ServiceInfo(msg.service, str(state.kind), state.idempotent)

    async def _on_call(self, remote: bytes, msg: Message) -> Message:
        assert isinstance(msg, Call)
        core = self.core
        admitted = core.admit(
            remote,
            msg.call_id,
            msg.service,
            Kind.UNARY,
            len(msg.request),
            self._clock.now(),
            memory_full=self._host.memory.over,
        )
        if isinstance(admitted, Refusal):
            return ErrorReply(admitted.code, admitted.message)
        served = self._served[msg.service]
        limits = served.limits
        deadline = min(msg.deadline_ms / 1000, limits.max_deadline)
        task = asyncio.current_task()
        assert task is not None
        ctx = CallContext(remote, msg.service, deadline, task)
        error: str | None = ServiceErrorCode.CANCELLED  # unless it answers (cancelled, or gone)
        try:
            answer = await self._run_call(served, msg, ctx, task)
            error = answer.code if isinstance(answer, ErrorReply) else None
            return answer
        finally:
            core.finish(remote, msg.call_id, error, self._clock.now())

    async def _run_call(
        self, served: _Served, msg: Call, ctx: CallContext, task: asyncio.Task[Any]
    ) -> Message:
        try:
            request = decode_value(bytes(msg.request), served.request_limits)
        except ServiceError as exc:
            return _error(exc.code, str(exc))
        if ctx.deadline <= 0:
            return _error(ServiceErrorCode.DEADLINE_EXCEEDED, "the call arrived after its deadline")
        # a bare timer rather than asyncio.timeout: half the cost on every call
        timer = asyncio.get_running_loop().call_later(ctx.deadline, _expire, task, ctx)
        try:
            reply = await served.handler(request, ctx)
        except asyncio.CancelledError:
            # the caller's cancel (or its connection's end) propagates: no answer
            if ctx.expired and task.uncancel() == 0:
                return _error(
                    ServiceErrorCode.DEADLINE_EXCEEDED,
                    f"{ctx.service!r} did not answer within its deadline of {ctx.deadline:g}s",
                )
            raise
        except _PASSED_ON as exc:  # a typed error of the handler's (e.g. an adapter's)
            return _error(exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - the handler boundary: its message only
            return _handler_error(ctx.service, exc)
        finally:
            timer.cancel()
        try:
            data = encode_value(reply, served.reply_limits)
        except TooLarge as exc:
            return _error(ServiceErrorCode.TOO_LARGE, f"reply too large: {exc}")
        except BadServiceRequest as exc:
            return _error(ServiceErrorCode.HANDLER_ERROR, f"the handler's reply: {exc}")
        return Reply(msg.call_id, data)

    async def _on_stream_open(self, remote: bytes, msg: Message) -> Message:
        assert isinstance(msg, StreamOpen)
        now = self._clock.now()
        admitted = self.core.admit(
            remote,
            msg.call_id,
            msg.service,
            Kind.STREAM,
            len(msg.request),
            now,
            memory_full=self._host.memory.over,
        )
        if isinstance(admitted, Refusal):
            return ErrorReply(admitted.code, admitted.message)
        served = self._served[msg.service]
        limits = served.limits
        try:
            request = decode_value(bytes(msg.request), ValueLimits(max_size=limits.max_request))
        except ServiceError as exc:
            self.core.finish(remote, msg.call_id, exc.code, now)
            return _error(exc.code, str(exc))
        deadline = min(msg.deadline_ms / 1000, limits.max_deadline)
        if deadline <= 0:
            self.core.finish(remote, msg.call_id, ServiceErrorCode.DEADLINE_EXCEEDED, now)
            return _error(ServiceErrorCode.DEADLINE_EXCEEDED, "the call arrived after its deadline")
        ctx = CallContext(remote, msg.service, deadline)
        stream = _Stream(remote, msg.call_id, admitted, ctx)
        stream.last_active = now
        self._streams[(remote, msg.call_id)] = stream
        self._streams_open.set()
        stream.producer = self._tasks.spawn(
            self._produce(stream, served, request), f"stream-{msg.service}"
        )
        return StreamOpened(msg.call_id, limits.max_credit)

    async def _produce(self, stream: _Stream, served: _Served, request: object) -> None:
        """Run the stream's iterator, one item per unit of credit granted."""
        credit = stream.credit
        ctx = stream.ctx
        item_limits = ValueLimits(max_size=served.limits.max_reply)
        iterator: AsyncIterator[Any] | None = None
        try:
            async with asyncio.timeout(ctx.deadline) as scope:
                iterator = served.handler(request, ctx)
                if not hasattr(iterator, "__anext__"):
                    raise TypeError("a stream handler must return an async iterator")
                while True:
                    while not credit.may_produce():
                        stream.credit_given.clear()
                        await stream.credit_given.wait()
                    try:
                        item = await anext(iterator)
                    except StopAsyncIteration:
                        break
                    try:
                        data = encode_value(item, item_limits)
                    except TooLarge as exc:
                        credit.fail(Refusal(ServiceErrorCode.TOO_LARGE, f"item too large: {exc}"))
                        break
                    except BadServiceRequest as exc:
                        credit.fail(
                            Refusal(ServiceErrorCode.HANDLER_ERROR, f"the handler's item: {exc}")
                        )
                        break
                    if not self._host.memory.try_reserve(stream.peer, len(data)):
                        credit.fail(
                            Refusal(
                                ServiceErrorCode.OVERLOADED, "this node's memory budget is full"
                            )
                        )
                        break
                    stream.reserved += len(data)
                    credit.push(data)
                    stream.items_ready.set()
        except asyncio.CancelledError:
            credit.fail(Refusal(ServiceErrorCode.CANCELLED, "cancelled"))
            raise
        except TimeoutError:
            if scope.expired():
                credit.fail(
                    Refusal(
                        ServiceErrorCode.DEADLINE_EXCEEDED,
                        f"stream {ctx.service!r} passed its deadline of {ctx.deadline:g}s",
                    )
                )
            else:
                credit.fail(_handler_refusal(ctx.service, TimeoutError("timed out")))
        except _PASSED_ON as exc:  # a typed error of the handler's (e.g. an adapter's)
            credit.fail(Refusal(ServiceErrorCode(exc.code), str(exc)))
        except Exception as exc:  # noqa: BLE001 - the handler boundary: its message only
            credit.fail(_handler_refusal(ctx.service, exc))
        finally:
            credit.end()
            stream.items_ready.set()
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception as exc:  # noqa: BLE001 - a generator failing to close: its problem
                    log.debug("closing stream %s: %s", ctx.service, exc)

    async def _on_stream_pull(self, remote: bytes, msg: Message) -> Message:
        assert isinstance(msg, StreamPull)
        stream = self._streams.get((remote, msg.stream_id))
        if stream is None:
            return _error(ServiceErrorCode.NOT_FOUND, f"no stream {msg.stream_id}")
        if stream.pulling:
            return _error(ServiceErrorCode.BAD_REQUEST, "one pull at a time per stream")
        credit = stream.credit
        stream.pulling = True
        try:
            if credit.grant(msg.credit):
                stream.credit_given.set()
            while not credit.buffered and not credit.ended:
                stream.items_ready.clear()
                await stream.items_ready.wait()
            items, over = credit.collect(MAX_CREDIT_PER_PULL, max_bytes=self._value_limit)
            self._release(stream, sum(len(item) for item in items))
        except asyncio.CancelledError:
            # the caller cancelled its pull (or went away): the stream is over
            stream.ctx.close()
            self._drop_stream(stream, ServiceErrorCode.CANCELLED, "cancelled by the caller")
            raise
        finally:
            stream.pulling = False
            stream.last_active = self._clock.now()
        if not over:
            return StreamItems(msg.stream_id, tuple(items), False)
        self._end_stream(stream)
        if credit.error is not None:
            return ErrorReply(credit.error.code, credit.error.message)
        return StreamItems(msg.stream_id, tuple(items), True)

    async def _on_stream_close(self, remote: bytes, msg: Message) -> Message:
        assert isinstance(msg, StreamClose)
        stream = self._streams.get((remote, msg.stream_id))  # the peer's own streams only
        if stream is None:
            self.core.refused["close_unknown"] += 1
            return StreamClosed(False)
        stream.ctx.close()
        self._drop_stream(stream, ServiceErrorCode.CANCELLED, "closed by the caller")
        return StreamClosed(True)

    def _release(self, stream: _Stream, n: int) -> None:
        n = min(n, stream.reserved)
        stream.reserved -= n
        self._host.memory.release(stream.peer, n)

    def _end_stream(self, stream: _Stream) -> None:
        key = (stream.peer, stream.call_id)
        self._release(stream, stream.reserved)  # items never delivered
        if self._streams.get(key) is stream:
            del self._streams[key]
            error = stream.credit.error.code if stream.credit.error is not None else None
            self.core.finish(stream.peer, stream.call_id, error, self._clock.now())

    def _drop_stream(
        self, stream: _Stream, code: ServiceErrorCode | None = None, why: str = ""
    ) -> None:
        if stream.producer is not None:
            stream.producer.cancel()
        if code is not None:
            stream.credit.fail(Refusal(code, why or code))
        # a producer cancelled before it ran never reaches its own end: a pull waits on this
        stream.credit.end()
        stream.items_ready.set()
        self._end_stream(stream)

    async def _expire_streams(self) -> None:
        """End streams nobody pulled for stream_idle_timeout (their slot is freed)."""
        while True:
            if not self._streams:
                self._streams_open.clear()
                await self._streams_open.wait()
            idle = self.core.limits.stream_idle_timeout
            await asyncio.sleep(min(1.0, idle / 4))
            now = self._clock.now()
            for stream in list(self._streams.values()):
                if not stream.pulling and now - stream.last_active > idle:
                    self.core.refused["stream_idle"] += 1
                    self._drop_stream(
                        stream, ServiceErrorCode.DEADLINE_EXCEEDED, f"not pulled for {idle:g}s"
                    )

    # -- calling ----------------------------------------------------------------

    async def find_service(self, name: str) -> list[ProviderRecord]:
        """Providers of ``name`` in the DHT, the most promising first (measured RTT,
        recent failures: the order a call tries them in)."""
        validate_service_name(name)
        found = await self._discovery.find_providers(service_key(name))
        return self.ranking.order(found, self._clock.now(), key=lambda p: p.node_id)

    def _call_id(self) -> int:
        self._next_call_id = (self._next_call_id + 1) & 0xFFFFFFFFFFFFFFFF
        return self._next_call_id

    async def call(
        self, name: str, request: object, *, timeout: float = 10.0, peer: str | bytes | None = None
    ) -> object:
        self._check_name(name)
        if timeout <= 0:
            raise UsageError("timeout must be positive")
        data = encode_value(request, self._call_limits)
        deadline_at = self._clock.now() + timeout
        providers = await self._providers(name, peer, deadline_at)
        failures: list[tuple[bytes, P2PError]] = []
        for record in providers:
            left = deadline_at - self._clock.now()
            if left <= 0:
                break
            try:
                reply = await self._call_one(record, name, data, left)
            except _Retry as retry:
                failures.append((record.node_id, retry.error))
                continue
            return decode_value(reply, self._call_limits)
        self._forget(name, peer)
        raise _all_failed(name, failures, timeout)

    def _check_name(self, name: str) -> None:
        if name not in self._valid_names:
            validate_service_name(name)
            if len(self._valid_names) >= NAMES_CACHE:
                self._valid_names.clear()
            self._valid_names.add(name)

    def _forget(self, name: str, peer: str | bytes | None) -> None:
        """Every provider failed: look them up again next time."""
        self._provider_cache.pop(name, None)
        if peer is not None:
            self._known_peers.pop(self._node_id_of(peer), None)

    def _node_id_of(self, peer: str | bytes) -> bytes:
        node_id = self._node_ids.get(peer)
        if node_id is None:
            node_id = as_node_id(peer)
            if len(self._node_ids) >= NAMES_CACHE:
                self._node_ids.clear()
            self._node_ids[peer] = node_id
        return node_id

    async def _call_one(self, record: ProviderRecord, name: str, data: bytes, left: float) -> bytes:
        """One provider's reply, or _Retry (the next provider may be tried), or the
        error that ends the call."""
        if record.node_id == self._host.node_id:
            return await self._call_local(name, data, left)
        address = PeerAddress(record.node_id, record.host, record.port, record.relays)
        started = self._clock.now()
        info = self._described.get((record.node_id, name))
        if info is None:
            # Asked alongside the first call (no extra round trip): only a failure
            # mid-call needs the answer, and it is back by then (sent first).
            self._tasks.spawn(self._describe_quietly(address, name, left), "describe")
        elif info.kind != Kind.UNARY:
            raise BadServiceRequest(f"{name!r} is a stream service: use call_stream", service=name)
        call_id = self._call_id()
        msg = Call(call_id, name, int(left * 1000), data)
        answer = await self._exchange(address, msg, left, name, call_id)
        assert isinstance(answer, Reply)
        self.ranking.succeeded(record.node_id, self._clock.now() - started)
        return bytes(answer.reply)

    async def _call_local(self, name: str, data: bytes, left: float) -> bytes:
        answer = await self._on_call(
            self._host.node_id, Call(self._call_id(), name, int(left * 1000), data)
        )
        if isinstance(answer, ErrorReply):
            raise service_error(answer.code, answer.message, service=name)
        assert isinstance(answer, Reply)
        return bytes(answer.reply)

    async def _describe(self, address: PeerAddress, name: str, left: float) -> ServiceInfo:
        assert address.node_id is not None
        key = (address.node_id, name)
        info = self._described.get(key)
        if info is not None:
            self._described.move_to_end(key)
            return info
        answer = await self._exchange(address, Describe(name), left, name, None)
        assert isinstance(answer, ServiceInfo)
        self._described[key] = answer
        while len(self._described) > DESCRIBED_CACHE:
            self._described.popitem(last=False)
        return answer

    async def _describe_quietly(self, address: PeerAddress, name: str, left: float) -> None:
        """``_describe`` for its cache only (the call itself reports failures)."""
        try:
            await self._describe(address, name, left)
        except (P2PError, _Retry) as exc:
            log.debug("describe %s on %s: %s", name, address, exc)

    def _is_idempotent(self, peer: bytes, name: str) -> bool:
        """What the provider said; not known counts as not idempotent."""
        info = self._described.get((peer, name))
        return info is not None and info.idempotent

    async def _exchange(
        self, address: PeerAddress, msg: Message, left: float, name: str, call_id: int | None
    ) -> Message:
        """Send ``msg`` and map every failure to a ServiceError or _Retry (a request
        that is not a call, or a call the provider said is idempotent, may be
        retried on another provider after it failed mid-way)."""
        peer = address.node_id
        assert peer is not None
        now = self._clock.now()
        try:
            # cancelled (from outside) or timed out, the connection tells the
            # provider, which stops
            return await self._host.request(address, msg, timeout=left)
        except RequestTimeout:
            self.ranking.failed(peer, Failure.TIMEOUT, now)
            raise DeadlineExceeded(
                f"{name!r} on {peer_id_to_str(peer)} gave no answer within {left:.3g}s",
                service=name,
                peer=peer,
            ) from None
        except RemoteError as exc:
            error = _remote_error(exc, name, peer)
            if isinstance(error, (ServiceNotFound, ServiceOverloaded)):
                self.ranking.failed(peer, Failure.UNAVAILABLE, now)
                raise _Retry(error) from None  # refused before running: safe to retry
            raise error from None
        except (PeerUnreachable, HandshakeError, LimitExceeded, ClosedUnread) as exc:
            # never reached the provider (or, ClosedUnread, it said it never read it
            # even after the host sent it again): safe on the next one
            self.ranking.failed(peer, Failure.UNREACHABLE, now)
            raise _Retry(exc) from None
        except P2PTimeoutError as exc:
            self.ranking.failed(peer, Failure.TIMEOUT, now)
            raise _Retry(exc) from None  # the dial timed out (the call has time left)
        except P2PError as exc:
            self.ranking.failed(peer, Failure.UNAVAILABLE, now)
            if call_id is None or self._is_idempotent(peer, name):
                raise _Retry(exc) from None
            raise ProvidersFailed(
                f"{name!r} on {peer_id_to_str(peer)} failed mid-call ({exc}); "
                "the service is not idempotent, so the call was not retried",
                service=name,
                failures=[(peer, exc)],
            ) from None

    async def _close_stream(self, address: PeerAddress, stream_id: int) -> None:
        try:
            await self._host.request(address, StreamClose(stream_id), timeout=CLOSE_TIMEOUT)
        except P2PError as exc:
            log.debug("closing stream %d on %s: %s", stream_id, address, exc)

    async def _providers(
        self, name: str, peer: str | bytes | None, deadline_at: float
    ) -> list[ProviderRecord]:
        """Who to try, best first."""
        from p2pnode.dht.discovery import ProviderRecord

        own = self._host.node_id
        if peer is not None:
            node_id = self._node_id_of(peer)
            if node_id == own:
                return [ProviderRecord(node_id, "127.0.0.1", self._port)]
            known = self._known_peers.get(node_id)
            if known is not None:
                return [known]
            if node_id in self._host.connected_peers():
                return [self._know(ProviderRecord(node_id, "", 0))]  # the pooled connection
        now = self._clock.now()
        cached = self._provider_cache.get(name) if peer is None else None
        if cached is not None and cached[0] > now:
            providers = cached[1]
        else:
            try:
                async with asyncio.timeout(deadline_at - now):
                    if peer is not None:
                        return [self._know(await self._locate(name, self._node_id_of(peer)))]
                    providers = await self.find_service(name)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"looking up providers of {name!r} took longer than the deadline",
                    service=name,
                ) from None
            if providers:
                self._provider_cache[name] = (now + PROVIDER_CACHE_TTL, providers)
                while len(self._provider_cache) > PROVIDER_CACHE_NAMES:
                    del self._provider_cache[next(iter(self._provider_cache))]
        if not providers:
            raise NoProviders(f"no provider of {name!r} found in the DHT", service=name)
        remote = [p for p in providers if p.node_id != own]
        ordered = self.ranking.order(remote, self._clock.now(), key=lambda p: p.node_id)
        if len(remote) < len(providers) and name in self._served:
            ordered.append(next(p for p in providers if p.node_id == own))  # here, last
        if not ordered:
            raise NoProviders(f"no provider of {name!r} but this node", service=name)
        return ordered

    def _know(self, record: ProviderRecord) -> ProviderRecord:
        """Remember where a peer named by ``peer=`` is (until a call to it fails)."""
        if len(self._known_peers) >= NAMES_CACHE:
            self._known_peers.clear()
        self._known_peers[record.node_id] = record
        return record

    async def _locate(self, name: str, node_id: bytes) -> ProviderRecord:
        """Where to reach one given peer: its provider record, else its DHT contact."""
        from p2pnode.dht.discovery import ProviderRecord

        found = [r for r in await self.find_service(name) if r.node_id == node_id]
        if found:
            return found[0]
        contact = await self._discovery.find_peer(node_id)
        if contact is None:
            # A private node is in no routing table: its peer record (a provider
            # record under its id, with its relays; p2pnode/nat/relay.py) says where.
            peer = [
                r for r in await self._discovery.find_providers(node_id) if r.node_id == node_id
            ]
            if peer:
                return peer[0]
            raise NoProviders(f"peer {peer_id_to_str(node_id)} not found in the DHT", service=name)
        return ProviderRecord(node_id, contact.host, contact.port)

    async def call_stream(
        self, name: str, request: object, *, timeout: float = 60.0, peer: str | bytes | None = None
    ) -> AsyncGenerator[object, None]:
        """The stream's items as they come; pulls only as the caller consumes them."""
        validate_service_name(name)
        if timeout <= 0:
            raise UsageError("timeout must be positive")
        data = encode_value(request, self._call_limits)
        deadline_at = self._clock.now() + timeout
        providers = await self._providers(name, peer, deadline_at)
        failures: list[tuple[bytes, P2PError]] = []
        opened: tuple[PeerAddress, StreamOpened] | None = None
        for record in providers:
            if record.node_id == self._host.node_id:
                continue  # a stream is served to peers only
            left = deadline_at - self._clock.now()
            if left <= 0:
                break
            address = PeerAddress(record.node_id, record.host, record.port, record.relays)
            try:
                info = await self._describe(address, name, left)
                if info.kind != Kind.STREAM:
                    raise BadServiceRequest(f"{name!r} is a unary service: use call", service=name)
                call_id = self._call_id()
                left = deadline_at - self._clock.now()
                msg = StreamOpen(call_id, name, max(1, int(left * 1000)), data)
                try:
                    answer = await self._exchange(address, msg, left, name, call_id)
                except (DeadlineExceeded, asyncio.CancelledError):
                    # The open was cancelled, but its answer may have crossed the
                    # cancel (the stream is open there): close it all the same.
                    self._tasks.spawn(self._close_stream(address, call_id), "close")
                    raise
            except _Retry as retry:
                failures.append((record.node_id, retry.error))
                continue
            assert isinstance(answer, StreamOpened)
            opened = (address, answer)
            break
        if opened is None:
            self._forget(name, peer)
            raise _all_failed(name, failures, timeout)
        address, answer = opened
        window = max(1, min(CLIENT_WINDOW, answer.max_credit))
        outstanding = 0
        ended = False
        try:
            while True:
                left = deadline_at - self._clock.now()
                if left <= 0:
                    raise DeadlineExceeded(f"stream {name!r} passed its deadline", service=name)
                grant = window - outstanding
                try:
                    got = await self._exchange(
                        address, StreamPull(answer.stream_id, grant), left, name, None
                    )
                except _Retry as retry:
                    raise ProvidersFailed(
                        f"stream {name!r} broke: {retry.error}",
                        service=name,
                        failures=[(address.node_id or b"", retry.error)],
                    ) from None
                except ServiceError:
                    ended = True  # the provider ended it with a typed error
                    raise
                assert isinstance(got, StreamItems)
                # (a provider sending more than granted gains nothing: never below 0)
                outstanding = max(0, outstanding + grant - len(got.items))
                if got.end:
                    ended = True
                for item in got.items:
                    yield decode_value(item, self._call_limits)
                if got.end:
                    return
        finally:
            # Left early: between pulls, or with a pull out, which was cancelled (that
            # ends the stream there too, unless its answer crossed the cancel).
            if not ended:
                self._tasks.spawn(self._close_stream(address, answer.stream_id), "close")


class _Retry(Exception):
    """This provider failed in a way that lets the call try the next one."""

    def __init__(self, error: P2PError) -> None:
        super().__init__(str(error))
        self.error = error


def _expire(task: asyncio.Task[Any], ctx: CallContext) -> None:
    if not ctx.cancelled and not ctx.expired:
        ctx.expired = True
        task.cancel()


# Typed errors a handler may raise and the caller then sees as such (an adapter's
# timeout, oversized output, bad input); any other exception is a handler error.
_PASSED_ON = (DeadlineExceeded, BadServiceRequest, TooLarge, ServiceOverloaded, HandlerError)


def _error(code: str, message: str) -> ErrorReply:
    return ErrorReply(code, message[:1024])


def _handler_error(service: str, exc: BaseException) -> ErrorReply:
    refusal = _handler_refusal(service, exc)
    return ErrorReply(refusal.code, refusal.message)


def _handler_refusal(service: str, exc: BaseException) -> Refusal:
    log.info("service %s: handler raised %s: %s", service, type(exc).__name__, exc)
    text = str(exc) or type(exc).__name__
    return Refusal(ServiceErrorCode.HANDLER_ERROR, f"{type(exc).__name__}: {text}"[:1024])


def _remote_error(exc: RemoteError, name: str, peer: bytes) -> ServiceError:
    code = exc.code
    if code == ErrorCode.BUSY:
        code = ServiceErrorCode.OVERLOADED  # the connection's own in-flight limit
    elif code == ErrorCode.UNSUPPORTED:
        code = ServiceErrorCode.NOT_FOUND  # a peer that serves no services at all
    return service_error(
        code, f"{name!r} on {peer_id_to_str(peer)}: {exc.message}", service=name, peer=peer
    )


def _all_failed(name: str, failures: list[tuple[bytes, P2PError]], timeout: float) -> ServiceError:
    if not failures:
        return DeadlineExceeded(f"{name!r}: no provider answered within {timeout:g}s", service=name)
    if len(failures) == 1 and isinstance(failures[0][1], ServiceError):
        return failures[0][1]
    tried = "; ".join(f"{peer_id_to_str(p)}: {e}" for p, e in failures)
    return ProvidersFailed(
        f"every provider of {name!r} failed ({len(failures)} tried): {tried}",
        service=name,
        failures=failures,
    )
