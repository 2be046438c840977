"""Node foundation figures (a benchmark, not a test).

    python benchmarks/bench_node.py [--nodes 20] [--seconds 2]

Prints: time from `p2pnode start` to ready; time for an N-node in-process network
to converge (every node finds every other by id), then the latency of lookups of
random keys in it; idle CPU and RSS of one node process; DHT ping round trips per
second between two p2pnode nodes next to two stock kademlia servers measured in the
same run (sequential and 64 in flight); what the open-network DHT's signatures cost
(an id proof per new contact, a record per store or get).

Run it against another checkout with ``PYTHONPATH=<tree> python benchmarks/bench_node.py``
to compare (the signature costs print n/a where the tree has none).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from kademlia.network import Server

from p2pnode import Node, NodeConfig


def start_to_ready(home: Path) -> tuple[float, subprocess.Popen[str]]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "p2pnode",
            "start",
            "--home",
            str(home),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "ready":
            break
    return time.perf_counter() - t0, proc


def idle_usage(proc: subprocess.Popen[str], seconds: float) -> tuple[float, int]:
    ps = psutil.Process(proc.pid)
    before = ps.cpu_times()
    time.sleep(seconds)
    after = ps.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return 100.0 * used / seconds, ps.memory_info().rss


async def converge(n: int, base: Path) -> float:
    t0 = time.perf_counter()
    nodes: list[Node] = []
    try:
        first = Node(NodeConfig(home=base / "c0", host="127.0.0.1", port=0))
        await first.start()
        nodes.append(first)
        seed = (("127.0.0.1", first.port),)
        for i in range(1, n):
            node = Node(NodeConfig(home=base / f"c{i}", host="127.0.0.1", port=0, bootstrap=seed))
            await node.start()
            nodes.append(node)
        pending = {(a, b) for a in range(n) for b in range(n) if a != b}
        deadline = time.perf_counter() + 120
        while pending and time.perf_counter() < deadline:
            for a, b in list(pending):
                found = await nodes[a].discovery.find_peer(nodes[b].node_id)
                if found is not None:
                    pending.discard((a, b))
        if pending:
            return float("nan")
        took = time.perf_counter() - t0
        await lookup_latency(nodes)
        return took
    finally:
        for node in nodes:
            await node.stop()


async def lookup_latency(nodes: list[Node], count: int = 60) -> None:
    """Median and p90 of full lookups (``closest``) of random keys from random nodes."""
    rng = random.Random(1)
    times = []
    for _ in range(count):
        node = rng.choice(nodes)
        t0 = time.perf_counter()
        await node.discovery.closest(rng.randbytes(20))
        times.append(time.perf_counter() - t0)
    times.sort()
    print(
        f"lookup of a random key ({len(nodes)} nodes, {count} lookups): median "
        f"{statistics.median(times) * 1000:.1f} ms, p90 {times[int(0.9 * count)] * 1000:.1f} ms"
    )


def signature_costs() -> None:
    """µs to prove an id (sign + verify) and to verify a provider / mutable record."""
    import timeit

    try:
        from p2pnode.dht import proof, records
    except ImportError:
        print("signature costs: n/a (this tree has no signed DHT)")
        return
    from p2pnode.identity import Identity

    me, them = Identity.generate(), Identity.generate()
    challenge = os.urandom(16)
    signature = proof.prove(them, me.node_id, challenge)
    key = os.urandom(20)
    now = time.time()
    record = records.sign_provider_record(them, key, [("127.0.0.1", 4001)], 1, int(now) + 3600)
    mutable = records.sign_mutable(them, "name", "value", 1, int(now) + 3600)
    envelope = records.to_value(mutable)
    mkey = records.mutable_key(them.node_id, "name")
    n = 2000

    def per_call(fn: object) -> float:
        return timeit.timeit(fn, number=n) / n * 1e6  # type: ignore[arg-type]

    sign = per_call(lambda: proof.prove(them, me.node_id, challenge))
    check = per_call(
        lambda: proof.check_proof(them.node_id, me.node_id, challenge, them.public_key, signature)
    )
    provider = per_call(lambda: records.verify_provider_record(record, now, 86400))
    opened = per_call(lambda: records.open_value(mkey, envelope, now, 86400))
    print(
        f"signatures: id proof per new contact {sign:.0f} us to sign + {check:.0f} us to "
        f"verify; provider record verify {provider:.0f} us; mutable record verify {opened:.0f} us"
    )


async def ping_rate_p2pnode(base: Path, seconds: float, inflight: int) -> float:
    a = Node(NodeConfig(home=base / "pa", host="127.0.0.1", port=0))
    b = Node(NodeConfig(home=base / "pb", host="127.0.0.1", port=0))
    async with a, b:
        return await _rate(lambda: a.discovery.ping("127.0.0.1", b.port), seconds, inflight)


async def ping_rate_stock(seconds: float, inflight: int) -> float:
    a, b = Server(), Server()
    await a.listen(0, "127.0.0.1")
    await b.listen(0, "127.0.0.1")
    port = b.transport.get_extra_info("sockname")[1]
    try:

        async def one() -> object:
            ok, value = await a.protocol.ping(("127.0.0.1", port), a.node.id)
            return value if ok else None

        return await _rate(one, seconds, inflight)
    finally:
        a.stop()
        b.stop()


async def _rate(call: object, seconds: float, inflight: int) -> float:
    done = 0
    failed = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, failed
        while time.perf_counter() < end:
            if await call() is None:  # type: ignore[operator]
                failed += 1
            else:
                done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    if failed:
        print(f"    ({failed} pings failed)")
    return done / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        ready, proc = start_to_ready(base / "s")
        try:
            cpu, rss = idle_usage(proc, 5.0)
        finally:
            proc.terminate()
            proc.wait(30)
        print(f"start to ready (subprocess, incl. interpreter start): {ready * 1000:.0f} ms")
        print(f"idle node: CPU {cpu:.2f}% of one core over 5 s, RSS {rss / 2**20:.1f} MiB")
        secs = asyncio.run(converge(args.nodes, base))
        print(
            f"{args.nodes}-node in-process network converged (all pairs find_peer) in {secs:.2f} s"
        )
        for inflight in (1, 64):
            ours = asyncio.run(ping_rate_p2pnode(base / f"p{inflight}", args.seconds, inflight))
            stock = asyncio.run(ping_rate_stock(args.seconds, inflight))
            print(
                f"DHT ping, {inflight:>2} in flight: p2pnode {ours:8.0f}/s  stock kademlia "
                f"{stock:8.0f}/s  ratio {ours / stock:.2f}"
            )
    signature_costs()
    print(f"(pid {os.getpid()}, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
