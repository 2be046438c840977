"""Unary service calls and streams between two processes, against aiohttp (and grpcio
when installed), in one run.

    python benchmarks/bench_services.py [--seconds 3] [--rounds 3] [--size 1024] [--item 65536]

- p2pnode: a server process runs a Node serving ``bench.echo`` (the request back)
  and ``bench.items`` (a stream of ``--item``-byte items); the client Node calls it
  by peer id over the Noise connection;
- aiohttp: a server process answering POST with the body back; one client session
  with keep-alive (HTTP/1.1), as many connections as calls in flight;
- grpcio (if importable): a unary echo method on a generic handler.

The systems take turns, ``--rounds`` times (all servers up throughout, one
system measured at a time). Prints, per system, medians over the rounds: latency
p50/p99 with 1 call in flight, calls per second with 1 and with 64 in flight,
and the range of the latter; then the stream's items and MB per second.

``--cpu-per-call CALLS``: instead, both sides in this process, the CPU microseconds
per unary call at 64 in flight (min and median of 3 x ``--rounds`` runs): the figure
to watch when changing the call path.

``--first-call N [--services 30] [--callers 3] [--seed 1]``: instead, N real Nodes
in this process (one network on loopback, ``control_api=False``, DHT rpc_timeout 1 s),
each service served by one or two random nodes and announced; for each service,
``--callers`` random other nodes never connected to its providers call it once, one
call at a time: p50/p90/max of the whole first call and of its parts (find_service
DHT lookup, TCP connect + Noise handshake, the call's round trip), then of a second
call (cached provider, open connection). Wall clock on one event loop, no link
latency: the lookup's every hop costs both ends' CPU in this one process, and no
network round trip. ``--virtual MS``: the same over p2pnode.sim's in-memory network
in virtual time (real Discovery, PeerHost with Noise and Services per node, no Node
shell), MS ms one-way link latency, CPU free. Not a test. Issue 13 asks for N=200:

    python benchmarks/bench_services.py --first-call 200 --services 30 --callers 3
    python benchmarks/bench_services.py --first-call 200 --services 30 --callers 3 --virtual 20
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from p2pnode.config import NodeConfig
from p2pnode.dht.config import DhtConfig
from p2pnode.node import Node
from p2pnode.services import CallContext, NodeServiceLimits, ServiceLimits

LIMITS = ServiceLimits(concurrency=256, calls_per_second_per_peer=0, max_credit=64)

# -- server processes ----------------------------------------------------------


async def serving_node(item: int) -> Node:
    """A started Node serving ``bench.echo`` and ``bench.items`` (``item``-byte items)."""
    node = Node(
        NodeConfig(home=Path(tempfile.mkdtemp()), host="127.0.0.1", port=0, control_api=False),
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
    return node


async def calling_node(port: int) -> Node:
    """A started Node joined through the one at ``port`` on loopback."""
    node = Node(
        NodeConfig(
            home=Path(tempfile.mkdtemp()),
            host="127.0.0.1",
            port=0,
            control_api=False,
            bootstrap=(("127.0.0.1", port),),
        )
    )
    await node.start()
    try:
        await node.wait_joined(timeout=10)
    except BaseException:
        await node.stop()
        raise
    return node


async def node_server(item: int) -> None:
    node = await serving_node(item)
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


def summary(name: str, ones: list[dict], manys: list[dict]) -> None:
    """Medians over the rounds, and the range of the 64-in-flight rate."""
    one = sorted(ones, key=lambda r: r["rate"])[len(ones) // 2]
    rates = sorted(r["rate"] for r in manys)
    print(
        f"{name:10s} p50 {one['p50']:7.0f} us  p99 {one['p99']:7.0f} us  "
        f"{one['rate']:8.0f} calls/s (1 in flight)  {rates[len(rates) // 2]:8.0f} calls/s (64)"
        f"  [{rates[0]:.0f}-{rates[-1]:.0f}]"
    )


async def client(seconds: float, size: int, item: int, rounds: int) -> None:
    """Every system's server is up for the whole run and the systems take turns,
    round after round, so a slow moment of the machine hits them all alike."""
    import aiohttp

    payload = b"x" * size
    procs: list[subprocess.Popen[str]] = []
    calls: dict[str, Callable[[], Awaitable[object]]] = {}
    node: Node | None = None
    session: aiohttp.ClientSession | None = None
    channel: Any = None
    try:
        proc, (port, peer) = spawn("node", item)
        procs.append(proc)
        node = client_node = await calling_node(int(port))

        async def p2p() -> object:
            return await client_node.call("bench.echo", payload, peer=peer)

        calls["p2pnode"] = p2p

        proc, (hport,) = spawn("http", item)
        procs.append(proc)
        url = f"http://127.0.0.1:{hport}/"
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        http_session = session

        async def http() -> object:
            async with http_session.post(url, data=payload) as resp:
                return await resp.read()

        calls["aiohttp"] = http
        try:
            import grpc
        except ImportError:
            print("grpcio    not installed: skipped")
        else:
            proc, (gport,) = spawn("grpc", item)
            procs.append(proc)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{gport}")
            method = channel.unary_unary("/bench.Echo/Call")

            async def rpc() -> object:
                return await method(payload)

            calls["grpcio"] = rpc

        results: dict[str, tuple[list[dict], list[dict]]] = {name: ([], []) for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                results[name][0].append(await measure(call, 1, seconds))
                results[name][1].append(await measure(call, 64, seconds))
        print(f"{rounds} rounds of {seconds:g} s each; medians, [range] at 64 in flight")
        for name, (ones, manys) in results.items():
            summary(name, ones, manys)

        count = 0
        n_items = 2000
        started = time.perf_counter()
        async for _ in client_node.call_stream("bench.items", n_items, peer=peer):
            count += 1
        elapsed = time.perf_counter() - started
        print(
            f"stream     {count / elapsed:8.0f} items/s of {item} B = "
            f"{count * item / elapsed / 1e6:7.1f} MB/s"
        )
    finally:
        if channel is not None:
            await channel.close()
        if session is not None:
            await session.close()
        if node is not None:
            await node.stop()
        for proc in procs:
            proc.communicate("")


async def cpu_per_call(calls: int, size: int, repeat: int) -> None:
    """Both sides in this process: CPU microseconds per unary call (64 in flight),
    the figure to watch when changing the call path (wall-clock rates move with
    whatever else the machine runs; CPU time much less)."""
    server = await serving_node(1)
    try:
        caller = await calling_node(server.port)
    except BaseException:
        await server.stop()
        raise
    try:
        payload = b"x" * size
        peer = server.peer_id

        async def worker(n: int) -> None:
            for _ in range(n):
                await caller.call("bench.echo", payload, peer=peer)

        await worker(200)  # warm up
        per_call = []
        for _ in range(repeat):
            started = time.process_time()
            await asyncio.gather(*(worker(calls // 64) for _ in range(64)))
            per_call.append((time.process_time() - started) / (calls // 64 * 64) * 1e6)
        per_call.sort()
        print(
            f"CPU per unary call, both sides in one process, 64 in flight: "
            f"min {per_call[0]:.1f} us, median {per_call[len(per_call) // 2]:.1f} us "
            f"({repeat} runs of {calls} calls)"
        )
    finally:
        await caller.stop()
        await server.stop()


class VirtualPeer:
    """What a call needs of a Node (DHT, peer host with Noise, services) on a host of
    p2pnode.sim.vnet's in-memory network, in virtual time; no home, no exchange."""

    def __init__(self, net: Any, index: int, seed: int, clock: Any, dht: DhtConfig) -> None:
        from p2pnode.dht import Discovery
        from p2pnode.net.config import NetLimits
        from p2pnode.net.host import PeerHost
        from p2pnode.sim.virtual import identity_for

        self.vhost = net.host(index)
        identity = identity_for(seed, index)
        self.node_id = identity.node_id
        self.clock = clock
        self.discovery = Discovery(identity, dht, clock=clock, endpoints=self.vhost)
        self.peer_host = PeerHost(identity, NetLimits(), clock=clock, endpoints=self.vhost)
        self.port = 0

    async def start(self, bootstrap: list[tuple[str, int]]) -> None:
        from p2pnode.services import Services

        self.port = await self.discovery.listen(self.vhost.ip, 4001)
        await self.peer_host.listen(self.vhost.ip, self.port)
        self.services_part = Services(self.peer_host, self.discovery, self.port, clock=self.clock)
        self.services_part.start()
        if bootstrap and not await self.discovery.bootstrap(bootstrap):
            raise SystemExit(f"{self.vhost.ip}: no seed answered")

    def serve(self, name: str, handler: Any) -> None:
        self.services_part.serve(name, handler)

    def services(self) -> list[dict[str, Any]]:
        return self.services_part.services()

    async def call(self, name: str, request: Any, timeout: float) -> Any:
        return await self.services_part.call(name, request, timeout=timeout)

    async def stop(self) -> None:
        await self.services_part.close()
        await self.peer_host.close()
        await self.discovery.close()


async def start_real(count: int, rng: random.Random) -> list[Any]:
    """``count`` real Nodes on loopback; each joins through up to 3 random earlier
    nodes (no node is everyone's only contact), 20 started at a time."""
    home = Path(tempfile.mkdtemp())
    # Fast settings: a lost datagram costs 1 s, not 5 (loopback loses none unless
    # the loop is late); the rest are the defaults a real node runs with.
    dht = DhtConfig(rpc_timeout=1.0)

    def config(i: int, boot: tuple[tuple[str, int], ...]) -> NodeConfig:
        return NodeConfig(
            home=home / f"n{i}",
            host="127.0.0.1",
            port=0,
            control_api=False,
            bootstrap=boot,
            dht=dht,
            save_interval=3600.0,
        )

    nodes = [Node(config(0, ()))]
    await nodes[0].start()
    for low in range(1, count, 20):
        group = []
        for i in range(low, min(count, low + 20)):
            seeds = rng.sample(nodes, min(3, len(nodes)))
            group.append(Node(config(i, tuple(("127.0.0.1", s.port) for s in seeds))))
        nodes.extend(group)  # (stopped at the end even if a start fails)
        await asyncio.gather(*(n.start() for n in group))
        await asyncio.gather(*(n.wait_joined(timeout=60) for n in group))
    return nodes


async def start_virtual(count: int, rng: random.Random, seed: int, latency: float) -> list[Any]:
    """``count`` VirtualPeers, each on its own /24, joined the same way as start_real."""
    from p2pnode.sim.vloop import LoopClock
    from p2pnode.sim.vnet import LinkModel, VirtualNetwork

    loop = asyncio.get_running_loop()
    net = VirtualNetwork(loop, LinkModel(latency=latency), seed)
    clock = LoopClock(loop)
    dht = DhtConfig()
    nodes = [VirtualPeer(net, 0, seed, clock, dht)]
    await nodes[0].start([])
    for low in range(1, count, 20):
        group = [VirtualPeer(net, i, seed, clock, dht) for i in range(low, min(count, low + 20))]
        seeds = [
            [(s.vhost.ip, s.port) for s in rng.sample(nodes, min(3, len(nodes)))] for _ in group
        ]
        nodes.extend(group)
        await asyncio.gather(*(n.start(b) for n, b in zip(group, seeds, strict=True)))
    return nodes


class PhaseTimer:
    """Times the parts of one caller's call without touching the services layer: the
    DHT lookup (``Services.find_service``) and the dial (``PeerHost._dial``: TCP
    connect + Noise handshake) are wrapped on that caller's instances only; the
    rest of the call is the call itself (the Call's round trip, Describe in parallel)."""

    def __init__(self, node: Any, now: Callable[[], float]) -> None:
        self.lookup = 0.0
        self.dial = 0.0
        self.dials = 0
        services, host = node.services_part, node.peer_host
        find_service, dial = services.find_service, host._dial

        async def timed_find_service(name: str) -> Any:
            started = now()
            try:
                return await find_service(name)
            finally:
                self.lookup += now() - started

        async def timed_dial(peer: Any) -> Any:
            started = now()
            try:
                return await dial(peer)
            finally:
                self.dial += now() - started
                self.dials += 1

        services.find_service = timed_find_service
        host._dial = timed_dial

    def reset(self) -> None:
        self.lookup = self.dial = 0.0
        self.dials = 0


def percentiles(label: str, values: list[float]) -> str:
    values = sorted(values)
    at = lambda q: values[min(len(values) - 1, int(len(values) * q))] * 1e3  # noqa: E731
    return f"  {label:26s} p50 {at(0.5):8.1f}  p90 {at(0.9):8.1f}  max {values[-1] * 1e3:8.1f} ms"


async def first_call(
    count: int, n_services: int, callers_per: int, seed: int, latency_ms: float | None
) -> None:
    """``count`` nodes (real Nodes on loopback, or VirtualPeers with ``latency_ms``);
    ``n_services`` services, each served by one or two random nodes and announced;
    for each, ``callers_per`` random other nodes (never connected to a provider)
    call it once (timed, in parts), then a second time (cached provider, open
    connection). One call at a time."""
    rng = random.Random(seed)
    virtual = latency_ms is not None
    loop = asyncio.get_running_loop()
    now = loop.time if virtual else time.perf_counter
    wall = time.perf_counter
    begun = wall()
    nodes: list[Any] = []
    try:
        if latency_ms is not None:
            nodes = await start_virtual(count, rng, seed, latency_ms / 1000)
        else:
            nodes = await start_real(count, rng)
        print(f"{count} nodes started and joined in {wall() - begun:.1f} s wall clock")

        async def echo(request: Any, ctx: CallContext) -> Any:
            return request

        providers: dict[str, list[Any]] = {}
        for s in range(n_services):
            name = f"bench.echo{s}"
            providers[name] = rng.sample(nodes, rng.choice((1, 2)))
            for node in providers[name]:
                node.serve(name, echo)
        started = now()
        while now() - started < 60:  # until every announcement is stored
            pending = [
                name
                for name, serving in providers.items()
                for node in serving
                if not next(s for s in node.services() if s["name"] == name)["announced_to"]
            ]
            if not pending:
                break
            await asyncio.sleep(0.2)
        else:
            raise SystemExit(f"{len(pending)} announcements not stored after 60 s")
        n_providers = sum(len(v) for v in providers.values())
        print(f"{n_services} services on {n_providers} providers announced")

        timers: dict[int, PhaseTimer] = {}
        first: dict[str, list[float]] = {"total": [], "lookup": [], "dial": [], "call": []}
        second: list[float] = []
        skipped = not_dialed = 0
        payload = b"x" * 1024
        for name, serving in providers.items():
            provider_ids = {n.node_id for n in serving}
            others = [n for n in nodes if n not in serving]
            rng.shuffle(others)
            chosen = 0
            for caller in others:
                if chosen == callers_per:
                    break
                if provider_ids & set(caller.peer_host.connected_peers()):
                    skipped += 1  # already connected to a provider: not a first call
                    continue
                chosen += 1
                timer = timers.setdefault(id(caller), PhaseTimer(caller, now))
                timer.reset()
                t = now()
                await caller.call(name, payload, timeout=10)
                total = now() - t
                if not timer.dials:
                    not_dialed += 1
                first["total"].append(total)
                first["lookup"].append(timer.lookup)
                first["dial"].append(timer.dial)
                first["call"].append(total - timer.lookup - timer.dial)
                t = now()
                await caller.call(name, payload, timeout=10)
                second.append(now() - t)
        print(
            f"first call to a service never used before, {len(second)} callers "
            f"({callers_per} per service, one call at a time), 1 KiB echo:"
        )
        print(percentiles("total", first["total"]))
        print(percentiles("find_service (DHT lookup)", first["lookup"]))
        print(percentiles("connect + Noise handshake", first["dial"]))
        print(percentiles("call (round trip)", first["call"]))
        print("second call, same caller and service (cached provider, open connection):")
        print(percentiles("total", second))
        print(
            f"callers skipped as already connected to a provider: {skipped}; first calls "
            f"that found a connection open (no dial): {not_dialed}"
        )
        if latency_ms is not None:
            print(
                f"time: VIRTUAL time (p2pnode.sim.vloop), in-memory network (p2pnode.sim.vnet) "
                f"with {latency_ms:g} ms one-way link latency ({2 * latency_ms:g} ms RTT), no "
                "jitter, loss or bandwidth limit; CPU costs 0 virtual time. Real DHT, "
                "PeerHost (Noise) and Services; each node on its own /24"
            )
        else:
            print(
                f"time: wall clock (time.perf_counter) on ONE event loop shared by all "
                f"{count} nodes on loopback, calls one at a time: no link latency (0 network "
                "RTT per DHT hop or handshake), but both ends' CPU of every hop and "
                "handshake run serially on one core, with the other nodes' maintenance "
                "in between"
            )
    finally:
        stopping = wall()
        await asyncio.gather(*(node.stop() for node in nodes), return_exceptions=True)
        print(f"run {wall() - begun:.1f} s wall clock (stop {wall() - stopping:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--item", type=int, default=65536)
    parser.add_argument("--rounds", type=int, default=3, help="turns each system takes")
    parser.add_argument("--first-call", type=int, default=0, metavar="N")
    parser.add_argument("--cpu-per-call", type=int, default=0, metavar="CALLS")
    parser.add_argument("--services", type=int, default=30, help="with --first-call")
    parser.add_argument("--callers", type=int, default=3, help="per service, with --first-call")
    parser.add_argument("--seed", type=int, default=1, help="with --first-call")
    parser.add_argument(
        "--virtual",
        type=float,
        metavar="MS",
        help="with --first-call: virtual time, in-memory network, MS one-way link latency",
    )
    parser.add_argument("--serve", choices=("node", "http", "grpc"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_per_call:
        asyncio.run(cpu_per_call(args.cpu_per_call, args.size, args.rounds * 3))
    elif args.first_call:
        run = first_call(args.first_call, args.services, args.callers, args.seed, args.virtual)
        if args.virtual is None:
            asyncio.run(run)
        else:
            from p2pnode.sim import vloop

            vloop.run(lambda: run)
    elif args.serve == "node":
        asyncio.run(node_server(args.item))
    elif args.serve == "http":
        asyncio.run(http_server())
    elif args.serve == "grpc":
        asyncio.run(grpc_server())
    else:
        asyncio.run(client(args.seconds, args.size, args.item, args.rounds))


if __name__ == "__main__":
    main()
