"""Throughput of PeerHost piece transfers against raw loopback TCP, in one run.

    python benchmarks/bench_net.py [--seconds 3] [--sizes 262144,1048576] [--depth 8]

Every figure is measured between two processes on 127.0.0.1:

- raw TCP: blocking sockets, one sender streaming ``sendall`` of a 1 MiB
  buffer, one receiver ``recv_into`` a preallocated buffer (the ceiling);
- PeerHost: a server process answering ``GetPiece`` with ``PieceData`` of the
  given size from memory, the client keeping ``--depth`` requests in flight
  on one connection; payload bytes per second, encryption on and off;
- handshake: a fresh client host per sample, connect + Noise XX + identity
  check + one Ping round trip (median and p90).

Prints a table with each PeerHost figure as a ratio of raw TCP (best and
median of the interleaved rounds), and the CPU seconds each process spent per
GB moved, whose inverse (CPU-bound GB/s) is what one core per side could
carry: unlike wall-clock rates it hardly moves when other work shares the
machine. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from p2pnode.exchange.messages import GetPiece, PieceData
from p2pnode.identity import Identity
from p2pnode.net import NetLimits, PeerAddress, PeerHost
from p2pnode.wire.messages import Message, Ping

RID = bytes(32)


# -- server side (child processes) --------------------------------------------


def raw_serve() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    block = memoryview(bytearray(os.urandom(1 << 20)))
    total = int.from_bytes(_recv_exact(conn, 8), "big")
    cpu = time.process_time()
    sent = 0
    while sent < total:
        n = min(len(block), total - sent)
        conn.sendall(block[:n])
        sent += n
    cpu = time.process_time() - cpu
    conn.close()
    sys.stdin.read()
    print(cpu, flush=True)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def host_serve(encrypt: bool, piece_size: int) -> None:
    async def serve() -> None:
        data = memoryview(bytearray(os.urandom(piece_size)))

        async def handler(node_id: bytes, msg: Message) -> Message:
            assert isinstance(msg, GetPiece)
            return PieceData(msg.resource_id, msg.index, data)

        host = PeerHost(Identity.generate(), bench_limits(encrypt))
        host.set_handler(handler)
        port = await host.listen("127.0.0.1", 0)
        print(port, host.node_id.hex(), flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)  # "go": the timed part starts
        cpu = time.process_time()
        await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
        print(time.process_time() - cpu, flush=True)
        await host.close()

    asyncio.run(serve())


def bench_limits(encrypt: bool) -> NetLimits:
    return replace(NetLimits(), encrypt=encrypt, max_frame=8 << 20)


# -- client side ----------------------------------------------------------------


class Child:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.line = self.proc.stdout.readline().split()

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def stop(self) -> float:
        """Stop the child; return the CPU seconds it reported (0 if none)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        out = self.proc.stdout.read().split()
        self.proc.wait(timeout=30)
        return float(out[-1]) if out else 0.0


@dataclass
class Result:
    rate: float  # payload bytes per second
    cpu_client: float  # CPU seconds per GB moved
    cpu_server: float


def measure_raw(seconds: float) -> Result:
    # size the transfer from a short probe so it lasts about ``seconds``
    probe = _raw_once(512 << 20)
    return _raw_once(max(int(probe.rate * seconds), 512 << 20))


def _raw_once(total: int) -> Result:
    child = Child("--raw-serve")
    server_cpu = 0.0
    try:
        conn = socket.create_connection(("127.0.0.1", int(child.line[0])))
        buf = memoryview(bytearray(1 << 20))
        start = time.perf_counter()
        cpu = time.process_time()
        conn.sendall(total.to_bytes(8, "big"))
        got = 0
        while got < total:
            n = conn.recv_into(buf)
            if not n:
                break
            got += n
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
        conn.close()
    finally:
        server_cpu = child.stop()
    gb = got / 1e9
    return Result(got / elapsed, cpu / gb, server_cpu / gb)


async def _pieces(
    addr: PeerAddress, encrypt: bool, seconds: float, depth: int, child: Child
) -> tuple[float, float, int]:
    host = PeerHost(Identity.generate(), bench_limits(encrypt))
    try:
        await host.request(addr, Ping())
        for i in range(depth):  # warm up buffers
            await host.request(addr, GetPiece(RID, i))
        moved = 0
        child.go()
        stop_at = time.perf_counter() + seconds
        start = time.perf_counter()
        cpu = time.process_time()

        async def worker() -> None:
            nonlocal moved
            i = 0
            while time.perf_counter() < stop_at:
                reply = await host.request(addr, GetPiece(RID, i))
                assert isinstance(reply, PieceData)
                moved += len(reply.data)
                i += 1

        await asyncio.gather(*(worker() for _ in range(depth)))
        return time.perf_counter() - start, time.process_time() - cpu, moved
    finally:
        await host.close()


def measure_pieces(encrypt: bool, size: int, seconds: float, depth: int) -> Result:
    child = Child("--host-serve", "--encrypt", str(int(encrypt)), "--piece-size", str(size))
    try:
        addr = PeerAddress(bytes.fromhex(child.line[1]), "127.0.0.1", int(child.line[0]))
        elapsed, cpu, moved = asyncio.run(_pieces(addr, encrypt, seconds, depth, child))
    finally:
        server_cpu = child.stop()
    gb = moved / 1e9
    return Result(moved / elapsed, cpu / gb, server_cpu / gb)


async def _handshakes(addr: PeerAddress, encrypt: bool, samples: int) -> list[float]:
    times = []
    for _ in range(samples):
        host = PeerHost(Identity.generate(), bench_limits(encrypt))
        start = time.perf_counter()
        await host.request(addr, Ping())
        times.append(time.perf_counter() - start)
        await host.close()
    return times


def measure_handshake(samples: int) -> list[float]:
    child = Child("--host-serve", "--encrypt", "1", "--piece-size", "1")
    try:
        addr = PeerAddress(bytes.fromhex(child.line[1]), "127.0.0.1", int(child.line[0]))
        return asyncio.run(_handshakes(addr, True, samples))
    finally:
        child.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--sizes", default="262144,1048576")
    parser.add_argument("--depth", type=int, default=8, help="requests in flight")
    parser.add_argument("--handshakes", type=int, default=200)
    parser.add_argument("--raw-serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--host-serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--encrypt", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--piece-size", type=int, default=1 << 20, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("p2pnode.net.host").setLevel(logging.ERROR)  # the encrypt=False warning
    if args.raw_serve:
        raw_serve()
        return
    if args.host_serve:
        host_serve(bool(args.encrypt), args.piece_size)
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    cases: list[tuple[str, Callable[[], Result]]] = [
        ("raw TCP loopback (blocking sockets)", lambda: measure_raw(args.seconds))
    ]
    for size in sizes:
        for encrypt in (True, False):
            label = f"PeerHost PieceData {size // 1024} KiB, encrypt={'on' if encrypt else 'off'}"
            cases.append((label, partial(measure_pieces, encrypt, size, args.seconds, args.depth)))
    results: dict[str, list[Result]] = {label: [] for label, _ in cases}
    for _ in range(args.repeat):  # interleaved, so load changes hit every case alike
        for label, run in cases:
            results[label].append(run())
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, {args.depth} requests in"
        f" flight, {args.repeat} rounds of {args.seconds:g}s; load average"
        f" {os.getloadavg()[0]:.2f}"
    )
    raw = [r.rate for r in results[cases[0][0]]]
    print(f"{'':44s} {'best':>9s} {'median':>9s}  ratio vs raw   CPU s/GB      CPU-bound")
    print(f"{'':44s} {'GB/s':>9s} {'GB/s':>9s}  best  median   client server GB/s")
    for label, _ in cases:
        rs = results[label]
        rates = [r.rate for r in rs]
        cpu_c = statistics.median(r.cpu_client for r in rs)
        cpu_s = statistics.median(r.cpu_server for r in rs)
        print(
            f"{label:44s} {max(rates) / 1e9:9.2f} {statistics.median(rates) / 1e9:9.2f}"
            f"  {max(rates) / max(raw):4.2f}"
            f"  {statistics.median(rates) / statistics.median(raw):4.2f}"
            f"   {cpu_c:6.2f} {cpu_s:6.2f} {1 / max(cpu_c, cpu_s, 1e-9):6.2f}"
        )
    hs = sorted(measure_handshake(args.handshakes))
    p90 = hs[int(len(hs) * 0.9)]
    print(
        f"{'handshake + first Ping (fresh host)':44s} median {statistics.median(hs) * 1e3:.2f} ms,"
        f" p90 {p90 * 1e3:.2f} ms ({len(hs)} samples)"
    )


if __name__ == "__main__":
    main()
