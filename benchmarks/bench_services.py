"""Unary service calls and streams between two processes, against aiohttp (and grpcio
when installed), in one run.

    python benchmarks/bench_services.py [--seconds 3] [--size 1024] [--item 65536]

- p2pnode: a server process runs a Node serving ``bench.echo`` (the request back)
  and ``bench.items`` (a stream of ``--item``-byte items); the client Node calls it
  by peer id over the Noise connection;
- aiohttp: a server process answering POST with the body back; one client session
  with keep-alive (HTTP/1.1), as many connections as calls in flight;
- grpcio (if importable): a unary echo method on a generic handler.

Prints, per system: latency p50/p99 with 1 call in flight, and calls per second
with 1 and with 64 in flight; then the stream's items and MB per second.

``--first-call N``: instead, N nodes in this process (one network on loopback), one
serving ``bench.echo``; the time each of the other half takes for its first call to
a service it never used (DHT lookup + Noise dial + Describe + call). Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from p2pnode.config import NodeConfig
from p2pnode.node import Node
from p2pnode.services import CallContext, NodeServiceLimits, ServiceLimits

LIMITS = ServiceLimits(concurrency=256, calls_per_second_per_peer=0, max_credit=64)

# -- server processes ----------------------------------------------------------


async def node_server(item: int) -> None:
    home = Path(tempfile.mkdtemp())
    node = Node(
        NodeConfig(home=home, host="127.0.0.1", port=0, control_api=False),
        service_limits=NodeServiceLimits(max_concurrent_per_peer=256),
    )
    await node.start()

    async def echo(request: Any, ctx: CallContext) -> Any:
        return request

    blob = b"x" * item

    async def items(request: Any, ctx: CallContext) -> Any:
        for _ in range(request):
            yield blob

    node.serve("bench.echo", echo, limits=LIMITS)
    node.serve_stream("bench.items", items, limits=LIMITS)
    print(node.port, node.peer_id, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await node.stop()


async def http_server() -> None:
    from aiohttp import web

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_post("/", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


async def grpc_server() -> None:
    import grpc  # type: ignore[import-not-found]

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {"Call": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(None)


# -- client ------------------------------------------------------------------------


def spawn(kind: str, item: int) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--item", str(item)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().split()


async def measure(call: Callable[[], Awaitable[object]], inflight: int, seconds: float) -> dict:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t)

    for _ in range(50):
        await call()  # warm up
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rate": len(latencies) / elapsed,
        "p50": latencies[len(latencies) // 2] * 1e6,
        "p99": latencies[int(len(latencies) * 0.99)] * 1e6,
    }


def line(name: str, one: dict, many: dict) -> None:
    print(
        f"{name:10s} p50 {one['p50']:7.0f} us  p99 {one['p99']:7.0f} us  "
        f"{one['rate']:8.0f} calls/s (1 in flight)  {many['rate']:8.0f} calls/s (64)"
    )


async def client(seconds: float, size: int, item: int) -> None:
    payload = b"x" * size
    proc, (port, peer) = spawn("node", item)
    home = Path(tempfile.mkdtemp())
    node = Node(
        NodeConfig(
            home=home,
            host="127.0.0.1",
            port=0,
            control_api=False,
            bootstrap=(("127.0.0.1", int(port)),),
        )
    )
    await node.start()
    try:
        await node.wait_joined(timeout=10)

        async def p2p() -> object:
            return await node.call("bench.echo", payload, peer=peer)

        line("p2pnode", await measure(p2p, 1, seconds), await measure(p2p, 64, seconds))
        count = 0
        n_items = 2000
        started = time.perf_counter()
        async for _ in node.call_stream("bench.items", n_items, peer=peer):
            count += 1
        elapsed = time.perf_counter() - started
        print(
            f"stream     {count / elapsed:8.0f} items/s of {item} B = "
            f"{count * item / elapsed / 1e6:7.1f} MB/s"
        )
    finally:
        await node.stop()
        proc.communicate("")

    import aiohttp

    proc, (hport,) = spawn("http", item)
    try:
        url = f"http://127.0.0.1:{hport}/"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:

            async def http() -> object:
                async with session.post(url, data=payload) as resp:
                    return await resp.read()

            line("aiohttp", await measure(http, 1, seconds), await measure(http, 64, seconds))
    finally:
        proc.communicate("")

    try:
        import grpc
    except ImportError:
        print("grpcio    not installed: skipped")
        return
    proc, (gport,) = spawn("grpc", item)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gport}") as channel:
            method = channel.unary_unary("/bench.Echo/Call")

            async def rpc() -> object:
                return await method(payload)

            line("grpcio", await measure(rpc, 1, seconds), await measure(rpc, 64, seconds))
    finally:
        proc.communicate("")


async def first_call(count: int) -> None:
    home = Path(tempfile.mkdtemp())

    def config(i: int, seed: int | None) -> NodeConfig:
        boot = (("127.0.0.1", seed),) if seed else ()
        return NodeConfig(
            home=home / f"n{i}", host="127.0.0.1", port=0, control_api=False, bootstrap=boot
        )

    nodes = [Node(config(0, None))]
    await nodes[0].start()
    try:
        for i in range(1, count):
            node = Node(config(i, nodes[0].port))
            await node.start()
            nodes.append(node)
        for node in nodes[1:]:
            await node.wait_joined(timeout=30)

        async def echo(request: Any, ctx: CallContext) -> Any:
            return request

        nodes[1].serve("bench.echo", echo)
        for _ in range(100):  # until the announcement reached the DHT
            if nodes[1].services()[0]["announced_to"]:
                break
            await asyncio.sleep(0.1)
        times = []
        for caller in nodes[count // 2 :]:
            started = time.perf_counter()
            await caller.call("bench.echo", b"x" * 1024, timeout=10)
            times.append(time.perf_counter() - started)
        times.sort()
        print(
            f"first call among {count} nodes: p50 {times[len(times) // 2] * 1e3:.1f} ms, "
            f"max {times[-1] * 1e3:.1f} ms ({len(times)} callers)"
        )
    finally:
        for node in nodes:
            await node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--item", type=int, default=65536)
    parser.add_argument("--first-call", type=int, default=0, metavar="N")
    parser.add_argument("--serve", choices=("node", "http", "grpc"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_call:
        asyncio.run(first_call(args.first_call))
    elif args.serve == "node":
        asyncio.run(node_server(args.item))
    elif args.serve == "http":
        asyncio.run(http_server())
    elif args.serve == "grpc":
        asyncio.run(grpc_server())
    else:
        asyncio.run(client(args.seconds, args.size, args.item))


if __name__ == "__main__":
    main()
