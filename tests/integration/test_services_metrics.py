"""Services figures in GET /metrics: a real provider node serves handlers, a real
caller node calls them over the network, and the provider's control API is scraped
over HTTP and read with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from p2pnode import Node
from p2pnode.errors import (
    DeadlineExceeded,
    HandlerError,
    ServiceNotFound,
    ServiceOverloaded,
    TooLarge,
)
from p2pnode.services import CallContext, NodeServiceLimits, ServiceLimits
from tests.helpers import eventually, fast_config
from tests.integration.test_metrics import families, value


async def echo(request: Any, ctx: CallContext) -> Any:
    return request


async def broken(request: Any, ctx: CallContext) -> Any:
    raise RuntimeError("this handler always fails")


def calls(fams: dict[str, Any], service: str, result: str) -> float:
    return value(fams, "p2pnode_services_calls_total", service=service, result=result)


async def test_services_counters_start_at_zero_and_move_with_calls_refusals_and_streams(
    homes: Callable[[str], Path],
) -> None:
    provider = Node(fast_config(homes("provider")))
    await provider.start()
    caller = Node(fast_config(homes("caller"), (("127.0.0.1", provider.port),), control_api=False))
    await caller.start()
    release = asyncio.Event()

    async def ticks(request: Any, ctx: CallContext) -> AsyncIterator[Any]:
        yield 1
        await release.wait()  # the stream stays open until the test lets it end
        yield 2

    try:
        await caller.wait_joined(timeout=10)
        provider.serve("echo", echo)
        provider.serve("broken", broken)
        provider.serve("small", echo, limits=ServiceLimits(max_request=100))
        provider.serve_stream("ticks", ticks)
        peer = provider.peer_id

        fams = await families(provider)
        assert value(fams, "p2pnode_services_served") == 4
        assert value(fams, "p2pnode_services_running_calls") == 0
        assert value(fams, "p2pnode_services_streams_open") == 0
        for reason in ("not_found", "bad_request", "too_large", "overloaded"):
            assert value(fams, "p2pnode_services_refused_total", reason=reason) == 0
        results = ("ok", "handler_error", "deadline_exceeded", "too_large", "cancelled")
        for service in ("echo", "broken", "small", "ticks"):
            for result in results:  # every result from the start (rate() needs it)
                assert calls(fams, service, result) == 0
            assert value(fams, "p2pnode_services_admitted_total", service=service) == 0
            assert value(fams, "p2pnode_services_in_flight", service=service) == 0
            for code in ("handler_error", "deadline_exceeded", "too_large", "overloaded"):
                assert value(fams, "p2pnode_services_errors_total", service=service, code=code) == 0
        # No successful call yet: no median to show.
        assert not fams["p2pnode_services_latency_p50_seconds"].samples

        for i in range(5):
            assert await caller.call("echo", {"i": i}, peer=peer) == {"i": i}
        for _ in range(2):
            with pytest.raises(HandlerError):
                await caller.call("broken", {}, peer=peer)
        with pytest.raises(TooLarge):
            await caller.call("small", "x" * 1000, peer=peer)
        with pytest.raises(ServiceNotFound):
            await caller.call("missing", {}, peer=peer)

        fams = await families(provider)
        assert calls(fams, "echo", "ok") == 5 and calls(fams, "echo", "handler_error") == 0
        assert value(fams, "p2pnode_services_admitted_total", service="echo") == 5
        echo_errors = value(
            fams, "p2pnode_services_errors_total", service="echo", code="handler_error"
        )
        assert echo_errors == 0
        p50 = value(fams, "p2pnode_services_latency_p50_seconds", service="echo")
        assert 0 < p50 < 5
        assert calls(fams, "broken", "handler_error") == 2 and calls(fams, "broken", "ok") == 0
        broken_errors = value(
            fams, "p2pnode_services_errors_total", service="broken", code="handler_error"
        )
        assert broken_errors == 2
        # Refused at admission: counted for the service and node-wide, never admitted.
        assert value(fams, "p2pnode_services_admitted_total", service="small") == 0
        assert calls(fams, "small", "too_large") == 1 and calls(fams, "small", "ok") == 0
        assert value(fams, "p2pnode_services_errors_total", service="small", code="too_large") == 1
        assert value(fams, "p2pnode_services_refused_total", reason="too_large") == 1
        assert value(fams, "p2pnode_services_refused_total", reason="not_found") == 1

        # An open stream is running: node-wide, for its service, and as a stream.
        stream = caller.call_stream("ticks", {}, peer=peer, timeout=30)
        async with contextlib.aclosing(stream):
            assert await anext(stream) == 1
            fams = await families(provider)
            assert value(fams, "p2pnode_services_streams_open") == 1
            assert value(fams, "p2pnode_services_in_flight", service="ticks") == 1
            assert value(fams, "p2pnode_services_running_calls") == 1
            assert value(fams, "p2pnode_services_admitted_total", service="ticks") == 1
            assert calls(fams, "ticks", "ok") == 0  # still running: not ended yet
            release.set()
            assert [item async for item in stream] == [2]

        async def stream_closed() -> bool:
            fams = await families(provider)
            return (
                value(fams, "p2pnode_services_streams_open") == 0
                and value(fams, "p2pnode_services_in_flight", service="ticks") == 0
                and value(fams, "p2pnode_services_running_calls") == 0
            )

        await eventually(stream_closed, timeout=10, what="the stream's end in the metrics")
        fams = await families(provider)
        assert calls(fams, "ticks", "ok") == 1

        # Unserved: its per-service series go, the node-wide counters stay.
        provider.unserve("broken")
        fams = await families(provider)
        assert value(fams, "p2pnode_services_served") == 3
        assert not [
            s for s in fams["p2pnode_services_calls"].samples if s.labels["service"] == "broken"
        ]
        assert value(fams, "p2pnode_services_refused_total", reason="too_large") == 1
    finally:
        release.set()
        await caller.stop()
        await provider.stop()


async def test_node_wide_limits_come_from_the_config_and_refusals_show_in_the_metrics(
    homes: Callable[[str], Path],
) -> None:
    limits = NodeServiceLimits(max_concurrent_per_peer=1)
    provider = Node(fast_config(homes("provider"), services=limits))
    await provider.start()
    caller = Node(fast_config(homes("caller"), (("127.0.0.1", provider.port),), control_api=False))
    await caller.start()
    release = asyncio.Event()

    async def held(request: Any, ctx: CallContext) -> AsyncIterator[Any]:
        yield 1
        await release.wait()

    try:
        await caller.wait_joined(timeout=10)
        provider.serve("echo", echo)
        provider.serve_stream("held", held)
        peer = provider.peer_id
        stream = caller.call_stream("held", {}, peer=peer, timeout=30)
        async with contextlib.aclosing(stream):
            assert await anext(stream) == 1
            # The caller's one slot is taken by the open stream.
            with pytest.raises(ServiceOverloaded):
                await caller.call("echo", {}, peer=peer)
            fams = await families(provider)
            assert value(fams, "p2pnode_services_refused_total", reason="overloaded") == 1
            overloaded = value(
                fams, "p2pnode_services_errors_total", service="echo", code="overloaded"
            )
            assert overloaded == 1
            release.set()
            assert [item async for item in stream] == []
        await eventually(
            lambda: provider.services_part.stats()["in_flight"] == 0, what="the stream's end"
        )
        assert await caller.call("echo", {"again": True}, peer=peer) == {"again": True}
    finally:
        release.set()
        await caller.stop()
        await provider.stop()


async def test_calls_cancelled_or_past_their_deadline_show_as_results(
    homes: Callable[[str], Path],
) -> None:
    """The caller gives up (its request cancelled) or the provider's deadline passes:
    each ends the call there with that result."""
    provider = Node(fast_config(homes("provider")))
    await provider.start()
    caller = Node(fast_config(homes("caller"), (("127.0.0.1", provider.port),), control_api=False))
    await caller.start()
    started = asyncio.Event()

    async def hang(request: Any, ctx: CallContext) -> Any:
        started.set()
        await asyncio.sleep(60)

    try:
        await caller.wait_joined(timeout=10)
        provider.serve("hang", hang)
        provider.serve("slow", hang, limits=ServiceLimits(max_deadline=0.2))
        peer = provider.peer_id
        call = asyncio.create_task(caller.call("hang", {}, peer=peer, timeout=30))
        await asyncio.wait_for(started.wait(), 10)
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        with pytest.raises(DeadlineExceeded):
            await caller.call("slow", {}, peer=peer, timeout=10)

        async def ended() -> bool:
            fams = await families(provider)
            return calls(fams, "hang", "cancelled") == 1 == calls(fams, "slow", "deadline_exceeded")

        await eventually(ended, timeout=10, what="both calls' results in the metrics")
        fams = await families(provider)
        assert calls(fams, "hang", "ok") == calls(fams, "slow", "ok") == 0
        assert value(fams, "p2pnode_net_request_cancels_total", event="received") == 1
    finally:
        await caller.stop()
        await provider.stop()
