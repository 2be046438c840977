"""Services between real nodes on 127.0.0.1: serve, find through the DHT, call.

Five nodes join one network (control API off); providers and callers are real
``Node`` objects, raw wire messages go through a real ``PeerHost``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from p2pnode.config import NodeConfig
from p2pnode.errors import (
    BadServiceRequest,
    DeadlineExceeded,
    HandlerError,
    NoProviders,
    ProvidersFailed,
    RemoteError,
    ServiceNotFound,
    TooLarge,
)
from p2pnode.identity import Identity
from p2pnode.net.config import NetLimits
from p2pnode.net.connection import serving as serving_conn
from p2pnode.net.dispatch import routes_of
from p2pnode.net.host import PeerAddress, PeerHost
from p2pnode.node import Node
from p2pnode.services import CallContext, ServiceLimits
from p2pnode.services.messages import (
    Call,
    Describe,
    ServiceInfo,
    StreamClose,
    StreamClosed,
    StreamOpen,
)
from p2pnode.wire.messages import Message, Ping, Pong, goaway
from tests.helpers import can_bind, eventually, fast_config

pytestmark = pytest.mark.usefixtures("no_errors_logged")


def config(home: Path, i: int, seed: tuple[tuple[str, int], ...] = ()) -> NodeConfig:
    """Node i on 127.0.0.(i+1) where the machine allows: a DHT answer lists one
    provider per host, so providers on one address would hide each other."""
    host = f"127.0.0.{i + 1}" if DISTINCT_HOSTS else "127.0.0.1"
    return replace(fast_config(home, bootstrap=seed, control_api=False), host=host)


DISTINCT_HOSTS = can_bind("127.0.0.5") and can_bind("127.0.0.5", socket.SOCK_STREAM)


@pytest.fixture
async def net(homes: Callable[[str], Path]) -> AsyncIterator[list[Node]]:
    first = Node(config(homes("n0"), 0))
    await first.start()
    nodes = [first]
    try:
        seed = ((first.config.host, first.port),)
        for i in range(1, 5):
            node = Node(config(homes(f"n{i}"), i, seed))
            await node.start()
            nodes.append(node)
        for node in nodes[1:]:
            await node.wait_joined(timeout=10)
        await eventually(
            lambda: all(len(n.discovery.contacts()) >= 3 for n in nodes), what="tables fill"
        )
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


async def serve_and_find(nodes: list[Node], caller: Node, name: str, count: int) -> None:
    async def found() -> bool:
        return len(await caller.find_service(name)) >= count

    await eventually(found, timeout=10, what=f"{count} providers of {name}")


async def add(request: Any, ctx: CallContext) -> Any:
    return {"sum": request["a"] + request["b"], "by": ctx.peer_id.hex()}


async def test_served_on_two_called_from_a_third_through_the_dht(net: list[Node]) -> None:
    a, b, caller = net[0], net[1], net[2]
    a.serve("math.add", add, idempotent=True)
    b.serve("math.add", add, idempotent=True)
    await serve_and_find(net, caller, "math.add", 2)
    providers = await caller.find_service("math.add")
    assert {p.node_id for p in providers} == {a.node_id, b.node_id}
    assert caller.node_id not in {p.node_id for p in providers}  # found by the DHT only
    reply = await caller.call("math.add", {"a": 1, "b": 2}, timeout=5)
    assert reply == {"sum": 3, "by": caller.node_id.hex()}
    for _ in range(20):
        assert await caller.call("math.add", {"a": 2, "b": 2}) == {
            "sum": 4,
            "by": caller.node_id.hex(),
        }
    served = [s for n in (a, b) for s in n.services()]
    assert sum(s["calls"] for s in served) == 21
    assert all(s["kind"] == "unary" and s["idempotent"] and s["in_flight"] == 0 for s in served)
    # one specific provider
    await caller.call("math.add", {"a": 0, "b": 0}, peer=b.peer_id)
    assert b.services()[0]["calls"] >= 1
    assert a.status()["services"][0]["name"] == "math.add"


@pytest.mark.parametrize("idempotent", [True, False])
async def test_provider_killed_mid_call(net: list[Node], idempotent: bool) -> None:
    a, b, caller = net[0], net[1], net[2]
    started: list[bytes] = []
    first_started = asyncio.Event()
    ran_after: list[bytes] = []
    hang = asyncio.Event()

    def make(node: Node) -> Callable[[Any, CallContext], Any]:
        async def handler(request: Any, ctx: CallContext) -> Any:
            if request == "warm":
                return "warm"
            if not started:
                started.append(node.node_id)
                first_started.set()
                await hang.wait()  # never set: this provider is killed now
            ran_after.append(node.node_id)
            return "done"

        return handler

    a.serve("slow.job", make(a), idempotent=idempotent)
    b.serve("slow.job", make(b), idempotent=idempotent)
    await serve_and_find(net, caller, "slow.job", 2)
    for provider in (a, b):  # the caller learns what each says of the service
        assert await caller.call("slow.job", "warm", peer=provider.peer_id) == "warm"
    call = asyncio.create_task(caller.call("slow.job", None, timeout=8))
    await first_started.wait()
    victim = a if started[0] == a.node_id else b
    other = b if victim is a else a
    await victim.abort()
    if idempotent:
        assert await call == "done"
        assert ran_after == [other.node_id]
    else:
        with pytest.raises(ProvidersFailed, match="not idempotent"):
            await call
        assert ran_after == []


async def test_a_call_the_provider_says_it_never_read_moves_on(net: list[Node]) -> None:
    """A provider that closes with a goaway naming none of our requests (it read
    none; here a liar that did) never ran the call, as far as the caller can know:
    even a non-idempotent call moves on to the next provider."""
    a, b, caller = net[0], net[1], net[2]
    liar: list[bytes] = []
    ran: list[bytes] = []

    def make(node: Node) -> Callable[[Any, CallContext], Any]:
        async def handler(request: Any, ctx: CallContext) -> Any:
            if request == "warm":
                return "warm"
            if not liar or liar[0] == node.node_id:
                liar[:1] = [node.node_id]
                conn = serving_conn.get()
                assert conn is not None
                conn._send_now(goaway())  # "closing; I read none of yours"
                await asyncio.Event().wait()
            ran.append(node.node_id)
            return "done"

        return handler

    a.serve("once.job", make(a), idempotent=False)
    b.serve("once.job", make(b), idempotent=False)
    await serve_and_find(net, caller, "once.job", 2)
    for provider in (a, b):  # the caller learns what each says of the service
        assert await caller.call("once.job", "warm", peer=provider.peer_id) == "warm"
    assert await caller.call("once.job", None, timeout=8) == "done"
    assert len(liar) == 1 and ran == [b.node_id if liar[0] == a.node_id else a.node_id]
    assert caller.peer_host.stats()["requests_resent_unread"] == 1  # the host's one resend


async def test_slow_stream_consumer_holds_the_producer(net: list[Node]) -> None:
    a, caller = net[0], net[2]
    produced = 0
    closed = asyncio.Event()

    async def count(request: Any, ctx: CallContext) -> AsyncIterator[Any]:
        nonlocal produced
        try:
            while True:
                produced += 1
                yield {"i": produced, "pad": b"x" * 1024}
        finally:
            closed.set()

    limits = ServiceLimits(max_credit=8)
    a.serve_stream("count.up", count, limits=limits)
    await serve_and_find(net, caller, "count.up", 1)
    consumed = 0
    stream = caller.call_stream("count.up", {}, timeout=20)
    async for item in stream:
        consumed += 1
        assert isinstance(item, dict) and item["i"] == consumed
        await asyncio.sleep(0.02)  # a slow consumer
        assert produced <= consumed + limits.max_credit
        if consumed == 30:
            break
    # not consuming at all: the producer stays where credit left it
    before = produced
    await asyncio.sleep(0.3)
    assert produced == before <= consumed + limits.max_credit
    await stream.aclose()
    await asyncio.wait_for(closed.wait(), 5)  # the close reached the producer
    await eventually(lambda: a.services()[0]["in_flight"] == 0, what="stream slot freed")
    assert produced == before


async def test_cancelling_a_pull_stops_the_producer(net: list[Node]) -> None:
    """The consumer is cancelled while its pull waits: the pull's cancel (the
    request mux's) ends the stream there and stops its producer."""
    a, caller = net[0], net[2]
    started, closed = asyncio.Event(), asyncio.Event()

    async def slow(request: Any, ctx: CallContext) -> AsyncIterator[Any]:
        started.set()
        try:
            await asyncio.sleep(60)
            yield 1
        finally:
            closed.set()

    a.serve_stream("slow.stream", slow)
    await serve_and_find(net, caller, "slow.stream", 1)

    async def consume() -> list[object]:
        return [item async for item in caller.call_stream("slow.stream", {}, timeout=30)]

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 10)
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)
    await asyncio.wait_for(closed.wait(), 5)
    await eventually(lambda: a.services()[0]["in_flight"] == 0, what="stream slot freed")
    assert a.services_part.stats()["streams_open"] == 0
    assert a.peer_host.stats()["cancels_received"] >= 1


async def test_stream_runs_to_its_end(net: list[Node]) -> None:
    a, caller = net[0], net[3]

    async def upto(request: Any, ctx: CallContext) -> AsyncIterator[Any]:
        for i in range(request["n"]):
            yield i

    a.serve_stream("logs.tail", upto)
    await serve_and_find(net, caller, "logs.tail", 1)
    items = [i async for i in caller.call_stream("logs.tail", {"n": 100})]
    assert items == list(range(100))
    assert a.services()[0]["in_flight"] == 0


async def raw_host(tmp: Path) -> PeerHost:
    host = PeerHost(Identity.load_or_create(tmp), NetLimits())
    await host.listen("127.0.0.1", 0)
    return host


async def test_deadline_enforced_by_the_provider(net: list[Node], tmp_path: Path) -> None:
    a = net[0]
    cancelled = asyncio.Event()

    async def sleepy(request: Any, ctx: CallContext) -> Any:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    a.serve("slow.sleep", sleepy)
    caller = await raw_host(tmp_path)
    try:
        address = PeerAddress(a.node_id, a.config.host, a.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RemoteError) as info:
            # the caller would wait 10 s; the provider stops at the 0.2 s it was given
            await caller.request(address, Call(1, "slow.sleep", 200, b"\xc0"), timeout=10)
        assert info.value.code == "deadline_exceeded"
        assert loop.time() - started < 2
        assert cancelled.is_set()
        assert a.services()[0]["errors"] == {"deadline_exceeded": 1}
    finally:
        await caller.close()


async def test_deadline_enforced_by_the_caller(net: list[Node], tmp_path: Path) -> None:
    """A provider that never answers: the caller gives up at its own deadline and
    its cancel stops the provider's handler (the request mux's cancel)."""
    caller = net[2]
    silent = await raw_host(tmp_path)
    calls: list[Message] = []
    never = asyncio.Event()
    stopped = asyncio.Event()

    async def describe(remote: bytes, msg: Message) -> Message:
        assert isinstance(msg, Describe)
        return ServiceInfo(msg.service, "unary", False)

    async def black_hole(remote: bytes, msg: Message) -> Message:
        calls.append(msg)
        try:
            await never.wait()
        except asyncio.CancelledError:
            stopped.set()
            raise
        raise AssertionError("unreachable")

    routes = routes_of(silent)
    routes.route((Describe,), describe)
    routes.route((Call,), black_hole)
    try:
        port = silent._servers[0].sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        await caller.peer_host.request(PeerAddress(silent.node_id, "127.0.0.1", port), Ping())
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(DeadlineExceeded):
            await caller.call("black.hole", 1, timeout=0.5, peer=silent.node_id)
        assert 0.4 < loop.time() - started < 2
        await asyncio.wait_for(stopped.wait(), 5)  # the handler was cancelled
        assert caller.peer_host.stats()["cancels_sent"] == 1
        assert silent.stats()["cancels_received"] == 1
        await eventually(lambda: silent.stats()["handlers_inflight"] == 0, what="slot freed")
    finally:
        await silent.close()


async def test_a_stream_open_given_up_is_closed_too(net: list[Node], tmp_path: Path) -> None:
    """The caller's deadline passes while its StreamOpen waits: the open is cancelled
    and, since its answer may have crossed the cancel, the stream closed as well."""
    caller = net[2]
    silent = await raw_host(tmp_path)
    seen: list[Message] = []
    never = asyncio.Event()

    async def describe(remote: bytes, msg: Message) -> Message:
        assert isinstance(msg, Describe)
        return ServiceInfo(msg.service, "stream", False)

    async def black_hole(remote: bytes, msg: Message) -> Message:
        seen.append(msg)
        await never.wait()
        raise AssertionError("unreachable")

    async def close(remote: bytes, msg: Message) -> Message:
        seen.append(msg)
        return StreamClosed(False)

    routes = routes_of(silent)
    routes.route((Describe,), describe)
    routes.route((StreamOpen,), black_hole)
    routes.route((StreamClose,), close)
    try:
        port = silent._servers[0].sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        await caller.peer_host.request(PeerAddress(silent.node_id, "127.0.0.1", port), Ping())
        with pytest.raises(DeadlineExceeded):
            async for _ in caller.call_stream("black.hole", 1, timeout=0.5, peer=silent.node_id):
                pass
        await eventually(lambda: len(seen) == 2, what="the open, then its close")
        opened, closed = seen
        assert isinstance(opened, StreamOpen) and closed == StreamClose(opened.call_id)
        assert silent.stats()["cancels_received"] == 1
    finally:
        await silent.close()


async def test_cancel_stops_the_handler(net: list[Node], tmp_path: Path) -> None:
    """Cancelling the caller's request (the mux's cancel) stops the handler (its
    context says cancelled), frees its slot, and no answer is sent."""
    a = net[0]
    running = asyncio.Event()
    stopped: list[bool] = []

    async def forever(request: Any, ctx: CallContext) -> Any:
        running.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.append(ctx.cancelled)
            raise

    a.serve("wait.forever", forever)
    caller = await raw_host(tmp_path)
    try:
        address = PeerAddress(a.node_id, a.config.host, a.port)
        call = asyncio.create_task(
            caller.request(address, Call(42, "wait.forever", 30_000, b"\xc0"), timeout=10)
        )
        await running.wait()
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        await eventually(lambda: bool(stopped), what="handler stopped")
        assert stopped == [True]
        await eventually(lambda: a.services()[0]["in_flight"] == 0, what="slot freed")
        assert a.services()[0]["errors"] == {"cancelled": 1}
        net_a = a.peer_host.stats()
        assert net_a["cancels_received"] == 1 and net_a["handlers_inflight"] == 0
        assert caller.stats()["cancels_sent"] == 1
        # nothing was answered: a ping after it is the only answer the caller sees
        assert await caller.request(address, Ping()) == Pong()
        assert caller.stats().get("unexpected_responses", 0) == 0
        assert caller.stats().get("answers_after_cancel", 0) == 0
    finally:
        await caller.close()


async def test_errors_are_typed_and_the_node_keeps_serving(net: list[Node]) -> None:
    a, caller = net[0], net[2]

    async def boom(request: Any, ctx: CallContext) -> Any:
        if request == "fail":
            raise ValueError("no such city")
        return request

    async def big(request: Any, ctx: CallContext) -> Any:
        return b"x" * 5000

    async def typed(request: Any, ctx: CallContext) -> Any:
        # What an adapter raises (a program's output over its bound, bad input):
        # the caller sees that type, not a handler error.
        raise (
            TooLarge("the program wrote more than 10 bytes")
            if request
            else BadServiceRequest("the local service answered 400")
        )

    a.serve("may.fail", boom)
    a.serve("typed.fail", typed)
    await serve_and_find(net, caller, "typed.fail", 1)
    with pytest.raises(TooLarge, match="more than 10 bytes"):
        await caller.call("typed.fail", 1)
    with pytest.raises(BadServiceRequest, match="answered 400"):
        await caller.call("typed.fail", 0)
    a.serve("too.big", big, limits=ServiceLimits(max_reply=1000))
    await serve_and_find(net, caller, "may.fail", 1)
    await serve_and_find(net, caller, "too.big", 1)

    with pytest.raises(NoProviders):
        await caller.call("no.such.service", 1, timeout=5)
    with pytest.raises(ServiceNotFound):
        await caller.call("not.here", 1, peer=a.peer_id)
    with pytest.raises(HandlerError, match="ValueError: no such city") as info:
        await caller.call("may.fail", "fail")
    assert "Traceback" not in str(info.value)
    with pytest.raises(TooLarge):
        await caller.call("too.big", None)
    assert await caller.call("may.fail", "ok") == "ok"  # still serving
    errors = {s["name"]: s["errors"] for s in a.services()}
    assert errors["may.fail"] == {"handler_error": 1}
    assert errors["too.big"] == {"too_large": 1}


async def test_every_provider_failing(net: list[Node]) -> None:
    a, b, caller = net[3], net[4], net[2]
    a.serve("math.add", add, idempotent=True)
    b.serve("math.add", add, idempotent=True)
    await serve_and_find(net, caller, "math.add", 2)
    await eventually(
        lambda: all(n.services()[0]["announced_to"] >= 2 for n in (a, b)), what="announced"
    )
    await a.abort()
    await b.abort()
    with pytest.raises(ProvidersFailed, match=r"every provider of 'math\.add' failed") as info:
        await caller.call("math.add", {"a": 1, "b": 1}, timeout=5)
    failed = {peer for peer, _ in info.value.failures}
    assert failed == {a.node_id, b.node_id} or not DISTINCT_HOSTS
    for peer in failed:  # backing off
        assert caller.services_part.ranking.tier(peer, caller.clock.now()) == 3


async def test_unserve_withdraws(net: list[Node]) -> None:
    a, caller = net[0], net[2]
    a.serve("math.add", add)
    await serve_and_find(net, caller, "math.add", 1)
    a.unserve("math.add")
    assert a.services() == []
    with pytest.raises(ServiceNotFound):
        await caller.call("math.add", {"a": 1, "b": 1}, peer=a.peer_id)


async def test_stream_errors_are_typed(net: list[Node]) -> None:
    a, caller = net[0], net[2]

    async def three_then_fail(request: Any, ctx: CallContext) -> AsyncIterator[Any]:
        for i in range(3):
            yield i
        raise RuntimeError("disk gone")

    async def endless(request: Any, ctx: CallContext) -> AsyncIterator[Any]:
        while True:
            await asyncio.sleep(0.05)
            yield "tick"

    a.serve_stream("logs.fail", three_then_fail)
    a.serve_stream("logs.slow", endless)
    got: list[Any] = []
    with pytest.raises(HandlerError, match="RuntimeError: disk gone"):
        async for item in caller.call_stream("logs.fail", None, peer=a.peer_id):
            got.append(item)
    assert got == [0, 1, 2]
    with pytest.raises(DeadlineExceeded):
        async for _ in caller.call_stream("logs.slow", None, peer=a.peer_id, timeout=0.5):
            pass
    with pytest.raises(BadServiceRequest, match="stream service"):
        await caller.call("logs.slow", None, peer=a.peer_id)
    await eventually(
        lambda: all(s["in_flight"] == 0 for s in a.services()), what="streams ended on both"
    )
    errors = {s["name"]: s["errors"] for s in a.services()}
    assert errors["logs.fail"] == {"handler_error": 1}


async def test_a_caller_gone_mid_call_stops_the_handler(net: list[Node], tmp_path: Path) -> None:
    a = net[0]
    running = asyncio.Event()
    stopped = asyncio.Event()

    async def forever(request: Any, ctx: CallContext) -> Any:
        running.set()
        try:
            await asyncio.sleep(60)
        finally:
            stopped.set()

    a.serve("wait.forever", forever)
    caller = await raw_host(tmp_path)
    address = PeerAddress(a.node_id, a.config.host, a.port)
    call = asyncio.create_task(
        caller.request(address, Call(7, "wait.forever", 30_000, b"\xc0"), timeout=10)
    )
    await running.wait()
    await caller.close()  # the connection drops with the call in flight
    await asyncio.gather(call, return_exceptions=True)
    await asyncio.wait_for(stopped.wait(), 5)
    await eventually(lambda: a.services()[0]["in_flight"] == 0, what="slot freed")
    assert a.services()[0]["errors"] == {"cancelled": 1}
    assert a.services()[0]["p50_ms"] is None  # not counted as a success
