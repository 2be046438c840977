"""Hostile callers of a node's services: each gets typed errors (or loses its
connection), and an honest caller on another node is still served.

The attacker is a bare ``PeerHost`` with an identity of its own sending the
services' wire messages directly; the provider and the honest caller are real
nodes on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from p2pnode.errors import P2PError, RemoteError
from p2pnode.identity import Identity
from p2pnode.net.config import NetLimits
from p2pnode.net.host import PeerAddress, PeerHost
from p2pnode.node import Node
from p2pnode.services import CallContext, NodeServiceLimits, ServiceLimits
from p2pnode.services.messages import (
    Call,
    StreamItems,
    StreamOpen,
    StreamOpened,
    StreamPull,
)
from p2pnode.wire.messages import Message, Ping, Pong
from p2pnode.wire.messages import cancel as cancel_envelope
from tests.helpers import eventually, fast_config

pytestmark = pytest.mark.usefixtures("no_errors_logged")

NIL = b"\xc0"  # msgpack None


@pytest.fixture
async def pair(homes: Callable[[str], Path]) -> AsyncIterator[tuple[Node, Node, PeerHost]]:
    """(provider, honest caller, attacker connected to the provider)."""
    # one peer may hold 4 calls at once; a stream not pulled for 1 s ends
    limits = NodeServiceLimits(max_concurrent_per_peer=4, stream_idle_timeout=1.0)
    provider = Node(fast_config(homes("p"), control_api=False), service_limits=limits)
    await provider.start()
    honest = Node(
        fast_config(homes("h"), bootstrap=(("127.0.0.1", provider.port),), control_api=False)
    )
    await honest.start()
    attacker = PeerHost(Identity.load_or_create(homes("x")), NetLimits())
    try:
        await honest.wait_joined(timeout=10)
        yield provider, honest, attacker
    finally:
        await attacker.close()
        await honest.stop()
        await provider.stop()


def at(node: Node) -> PeerAddress:
    return PeerAddress(node.node_id, "127.0.0.1", node.port)


async def send(attacker: PeerHost, node: Node, msg: Message) -> Message | str:
    """The answer, or the typed error code it got, or 'dropped'."""
    try:
        return await attacker.request(at(node), msg, timeout=10)
    except RemoteError as exc:
        return exc.code
    except P2PError:
        return "dropped"


async def test_oversized_requests_are_refused_before_the_handler(
    pair: tuple[Node, Node, PeerHost],
) -> None:
    provider, honest, attacker = pair
    ran: list[object] = []

    async def echo(request: Any, ctx: CallContext) -> Any:
        ran.append(request)
        return request

    provider.serve("text.echo", echo, limits=ServiceLimits(max_request=1024))
    big = b"\xc5" + (60_000).to_bytes(2, "big") + b"x" * 60_000  # msgpack bin of 60 kB
    answers = await asyncio.gather(
        *(send(attacker, provider, Call(i, "text.echo", 5000, big)) for i in range(20))
    )
    assert set(answers) == {"too_large"}
    assert ran == []
    assert await honest.call("text.echo", "hi", peer=provider.peer_id) == "hi"
    assert provider.services()[0]["errors"] == {"too_large": 20}
    assert provider.services_part.stats()["refused_too_large"] == 20


async def test_a_call_flood_from_one_peer_leaves_room_for_others(
    pair: tuple[Node, Node, PeerHost],
) -> None:
    provider, honest, attacker = pair
    release = asyncio.Event()

    async def slow(request: Any, ctx: CallContext) -> Any:
        if request != "honest":
            await release.wait()
        return request

    provider.serve("slow.job", slow, limits=ServiceLimits(concurrency=8))
    flood = [
        asyncio.create_task(send(attacker, provider, Call(i, "slow.job", 20_000, NIL)))
        for i in range(60)
    ]
    await eventually(
        lambda: sum(t.done() for t in flood) == 56, what="the flood past 4 calls refused"
    )
    assert {t.result() for t in flood if t.done()} == {"overloaded"}
    # the attacker holds 4 of the service's 8 slots; the honest caller still gets one
    assert await honest.call("slow.job", "honest", peer=provider.peer_id, timeout=5) == "honest"
    release.set()
    await asyncio.gather(*flood)
    assert provider.services()[0]["in_flight"] == 0


async def test_unknown_names_get_not_found(pair: tuple[Node, Node, PeerHost]) -> None:
    provider, honest, attacker = pair

    async def echo(request: Any, ctx: CallContext) -> Any:
        return request

    provider.serve("text.echo", echo)
    rng = random.Random(5)
    names = [
        "".join(rng.choice("abcXYZ._-/ é") for _ in range(rng.randint(1, 64))) for _ in range(200)
    ]
    answers = await asyncio.gather(
        *(send(attacker, provider, Call(i, name, 1000, NIL)) for i, name in enumerate(names))
    )
    assert set(answers) == {"not_found"}
    assert await honest.call("text.echo", 7, peer=provider.peer_id) == 7
    assert provider.services_part.stats()["refused_not_found"] == 200


async def test_a_cancel_storm_cancels_nothing_of_others(pair: tuple[Node, Node, PeerHost]) -> None:
    """Cancels (the request mux's) name request ids of the sender's own connection
    only; a storm of them, more than the requests it sent, costs the attacker its
    connection, and the honest call in flight meanwhile finishes."""
    provider, honest, attacker = pair
    running = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: Any, ctx: CallContext) -> Any:
        running.set()
        await release.wait()
        return "finished"

    provider.serve("slow.job", slow)
    call = asyncio.create_task(honest.call("slow.job", None, peer=provider.peer_id, timeout=20))
    await running.wait()
    assert await send(attacker, provider, Ping()) == Pong()  # one request: one cancel earned
    conn = await attacker._connection_for(at(provider))
    rng = random.Random(3)
    # the ids the honest connection uses (small numbers), then random ones
    ids = [*range(200), *(rng.getrandbits(32) for _ in range(800))]
    for request_id in ids:
        conn._send_now(cancel_envelope(request_id))
    await eventually(lambda: not conn.is_open, what="the attacker dropped")
    stats = provider.peer_host.stats()
    assert stats["cancels_too_late"] == 1  # what its one request earned
    assert stats["cancels_bogus"] > 64 and stats["closed_misbehaving"] == 1
    assert stats.get("cancels_received", 0) == 0  # nothing was stopped
    release.set()
    assert await call == "finished"
    assert provider.services()[0]["errors"] == {}


async def test_request_and_cancel_storm_is_bounded(pair: tuple[Node, Node, PeerHost]) -> None:
    """An attacker that calls and cancels at once, over and over, only stops its
    own handlers; handlers still stopping count against its connection, and an
    honest caller is served meanwhile."""
    provider, honest, attacker = pair
    started = 0

    async def work(request: Any, ctx: CallContext) -> Any:
        nonlocal started
        started += 1
        await asyncio.sleep(0.5)
        return request

    provider.serve("some.work", work)
    assert await send(attacker, provider, Ping()) == Pong()
    conn = await attacker._connection_for(at(provider))
    calls = []
    for i in range(2000):
        calls.append(asyncio.ensure_future(conn.request(Call(i, "some.work", 5000, NIL))))
        if i % 2 == 0:
            await asyncio.sleep(0)  # some get as far as the handler
        calls[-1].cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    assert await honest.call("some.work", 7, peer=provider.peer_id, timeout=10) == 7
    await eventually(
        lambda: provider.services()[0]["in_flight"] == 0, what="every attacker call stopped"
    )
    stats = provider.peer_host.stats()
    assert stats["cancels_received"] + stats.get("cancels_too_late", 0) > 0
    assert stats.get("cancels_bogus", 0) == 0 and conn.is_open  # a fair storm: not a strike
    assert provider.peer_host.stats()["handlers_inflight"] == 0
    assert attacker.stats()["cancels_sent"] >= stats["cancels_received"]


async def test_streams_that_never_grant_credit_produce_nothing_and_expire(
    pair: tuple[Node, Node, PeerHost],
) -> None:
    provider, honest, attacker = pair
    produced: list[int] = []

    async def numbers(request: Any, ctx: CallContext) -> AsyncIterator[Any]:
        i = 0
        while True:
            produced.append(i)
            yield {"i": i, "pad": b"x" * 4096}
            i += 1

    provider.serve_stream("numbers", numbers)
    answers = await asyncio.gather(
        *(send(attacker, provider, StreamOpen(i, "numbers", 60_000, NIL)) for i in range(10))
    )
    opened = [a for a in answers if isinstance(a, StreamOpened)]
    assert len(opened) == 4 and answers.count("overloaded") == 6
    assert produced == []  # no credit, no items: nothing held for the attacker
    # an honest consumer is served meanwhile
    got = []
    async for item in honest.call_stream("numbers", None, peer=provider.peer_id, timeout=10):
        got.append(item)
        if len(got) == 5:
            break
    assert [g["i"] for g in got] == [0, 1, 2, 3, 4]  # type: ignore[index]
    # the attacker's streams are ended once idle, their slots freed
    await eventually(lambda: provider.services()[0]["in_flight"] == 0, what="idle streams end")
    assert provider.services_part.core.refused["stream_idle"] == 4


async def test_stream_items_held_count_in_the_memory_budget(
    pair: tuple[Node, Node, PeerHost],
) -> None:
    """A caller that grants much credit and then stops reading cannot make the
    provider hold more than its memory share: the stream ends overloaded."""
    provider, _, attacker = pair
    produced: list[int] = []

    async def numbers(request: Any, ctx: CallContext) -> AsyncIterator[Any]:
        i = 0
        while True:
            produced.append(i)
            yield b"x" * 4096
            i += 1

    provider.serve_stream("numbers", numbers, limits=ServiceLimits(max_credit=64))
    opened = await send(attacker, provider, StreamOpen(1, "numbers", 60_000, NIL))
    assert isinstance(opened, StreamOpened)
    memory = provider.peer_host.memory
    before = memory.peer_used(attacker.node_id)
    memory.per_peer = before + 20_000  # room for about 4 items of 4 KiB
    answer = await send(attacker, provider, StreamPull(1, 64))
    assert isinstance(answer, StreamItems) and 1 <= len(answer.items) <= 5
    await eventually(lambda: len(produced) >= 5, what="producer stops at the budget")
    assert len(produced) <= 6
    last = await send(attacker, provider, StreamPull(1, 0))
    while isinstance(last, StreamItems):  # what was buffered, then the typed error
        last = await send(attacker, provider, StreamPull(1, 0))
    assert last == "overloaded"
    assert memory.peer_used(attacker.node_id) <= before
    assert provider.services()[0]["in_flight"] == 0
