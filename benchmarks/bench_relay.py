"""Relayed against direct throughput, and what relaying costs the relay (a
benchmark, not a test).

    python benchmarks/bench_relay.py [--size-mib 64] [--repeat 2] [--dir /tmp]

In one run, on loopback, each node in its own process (full p2pnode Nodes: DHT,
Noise, exchange, store): a relay R (``--relay-service always``), a provider C
holding a reservation on R and sharing a file of ``--size-mib``, and for each
run a fresh downloader D that finds C through the DHT and gets the file:

- **direct**: C listens, D dials it;
- **relayed**: C closes its TCP listener (as if behind a NAT: D's direct dial is
  refused), so D goes through R: a circuit, R splicing the two TCP sockets, Noise
  end to end between D and C.

Printed: each get's rate (the best of ``--repeat``), relayed / direct, how D's
connection to C was made, and R's CPU seconds per GiB relayed (user + system of
the relay process, from ``resource.getrusage``, over the relayed gets only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
GiB = 1024 * MiB


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _say(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


async def _role(args: argparse.Namespace) -> None:
    from p2pnode.config import NodeConfig
    from p2pnode.exchange.manifest import dht_key, resource_id_from_str, resource_id_to_str
    from p2pnode.nat.relay_core import RelayConfig
    from p2pnode.node import Node

    bootstrap = (("127.0.0.1", args.bootstrap),) if args.bootstrap else ()
    relay = RelayConfig(service="never", client="never")
    if args.role == "relay":
        relay = RelayConfig(service="always", client="never")
    elif args.role == "provider":
        relay = RelayConfig(service="never", client="always", relays=(("127.0.0.1", args.relay),))
    config = NodeConfig(
        home=Path(args.home), host="127.0.0.1", port=0, bootstrap=bootstrap, relay=relay
    )
    if args.role == "downloader" and os.environ.get("BENCH_VERBOSE"):
        import logging

        form = "  [downloader] %(relativeCreated)d %(name)s %(message)s"
        logging.basicConfig(stream=sys.stderr, format=form)
        if os.environ.get("BENCH_VERBOSE") == "2":
            logging.getLogger("p2pnode").setLevel(logging.DEBUG)
        logging.getLogger("p2pnode.exchange.fetcher").setLevel(logging.INFO)
    node = Node(config)
    await node.start()
    loop = asyncio.get_running_loop()
    try:
        if bootstrap:
            await node.wait_joined(timeout=30)
        if args.role == "relay":
            _say({"port": node.port})
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                if line.strip() == "cpu":
                    usage = resource.getrusage(resource.RUSAGE_SELF)
                    _say(
                        {
                            "cpu": _cpu(),
                            "user": usage.ru_utime,
                            "relay": node.relay.service.stats(),
                        }
                    )
        elif args.role == "provider":
            deadline = time.monotonic() + 30
            while not node.relay.client.held and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            ids = []
            for name in args.file:
                info = await node.exchange.share(Path(name))
                await node.discovery.add_provider(dht_key(info.resource_id), node.port)
                ids.append(resource_id_to_str(info.resource_id))
            _say({"port": node.port, "ids": ids})
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                if line.strip() == "hide":
                    # As if behind a NAT: nobody can open a connection to C now.
                    for server in node.peer_host._servers:
                        server.close()
                    _say({"hidden": True})
        else:
            rid = resource_id_from_str(args.id)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                found = await node.exchange.providers(rid)
                if found and found[0].relays:
                    break
                await asyncio.sleep(0.1)
            if os.environ.get("BENCH_VERBOSE"):
                from p2pnode.net.host import PeerAddress

                p = found[0]
                t0 = time.perf_counter()
                await node.peer_host.connect(PeerAddress(p.node_id, p.host, p.port, p.relays))
                print(f"  dial {time.perf_counter() - t0:.3f}s", file=sys.stderr)
            t0 = time.perf_counter()
            info = await node.exchange.get(rid, Path(args.dest))
            seconds = time.perf_counter() - t0
            conn = node.peer_host.connection_to(found[0].node_id)
            _say(
                {
                    "seconds": seconds,
                    "bytes": info.size,
                    "via": None if conn is None else conn.via,
                    "cpu": _cpu(),
                }
            )
            await loop.run_in_executor(None, sys.stdin.read)  # until the parent is done
    finally:
        await node.stop()


class Child:
    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child {self.proc.args} ended")
        out: dict[str, Any] = json.loads(line)
        return out

    def ask(self, what: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self.read()

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--relay", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--file", action="append", help=argparse.SUPPRESS)
    parser.add_argument("--id", help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        asyncio.run(_role(args))
        return

    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        # One file per get: a downloader serves what it got, so each run fetches
        # a resource only C has (and every downloader stays up: a dead node in
        # the routing tables would slow the later lookups).
        files = [work / f"data-{i}.bin" for i in range(2 * args.repeat)]
        block = os.urandom(MiB)
        for i, path in enumerate(files):
            with path.open("wb") as f:
                for j in range(args.size_mib):
                    f.write(i.to_bytes(4, "big") + j.to_bytes(4, "big") + block[8:])
        relay = Child("--role", "relay", "--home", str(work / "r"))
        children = [relay]
        try:
            r_port = relay.read()["port"]
            provider = Child(
                "--role", "provider", "--home", str(work / "c"), "--bootstrap", str(r_port),
                "--relay", str(r_port), *[a for p in files for a in ("--file", str(p))],
            )  # fmt: skip
            children.append(provider)
            ids = iter(provider.read()["ids"])
            runs: dict[str, list[dict[str, Any]]] = {"direct": [], "relayed": []}
            relay_cpu = relay_user = 0.0
            for mode in ("direct", "relayed"):
                if mode == "relayed":
                    provider.ask("hide")
                for i in range(args.repeat):
                    before = relay.ask("cpu")
                    dest = work / f"got-{mode}-{i}"
                    d = Child(
                        "--role", "downloader", "--home", str(work / f"d-{mode}-{i}"),
                        "--bootstrap", str(r_port), "--id", next(ids), "--dest", str(dest),
                    )  # fmt: skip
                    children.append(d)  # kept running: a dead one would slow later lookups
                    result = d.read()
                    after = relay.ask("cpu")
                    if mode == "relayed":
                        relay_cpu += after["cpu"] - before["cpu"]
                        relay_user += after["user"] - before["user"]
                    assert result["bytes"] == size, result
                    assert result["via"] == mode, result
                    dest.unlink()
                    runs[mode].append(result)
                    rate = size / result["seconds"] / 1e6
                    print(f"  {mode:8s} run {i + 1}: {rate:7.1f} MB/s  ({result['via']})")
            stats = relay.ask("cpu")["relay"]
        finally:
            for child in reversed(children):
                child.stop()

    best = {m: max(size / r["seconds"] for r in rs) / 1e6 for m, rs in runs.items()}
    relayed_bytes = size * len(runs["relayed"])
    print(f"get of {args.size_mib} MiB on loopback, best of {args.repeat}:")
    print(f"  direct   {best['direct']:7.1f} MB/s")
    ratio = best["relayed"] / best["direct"]
    print(f"  relayed  {best['relayed']:7.1f} MB/s  ({ratio:.0%} of direct)")
    print(
        f"  relay CPU {relay_cpu:.2f} s for {relayed_bytes / GiB:.3f} GiB relayed: "
        f"{relay_cpu / (relayed_bytes / GiB):.2f} CPU-s per GiB "
        f"({relay_user / (relayed_bytes / GiB):.2f} of it in user space) "
        f"(relay counted {stats.get('bytes_relayed', 0) / GiB:.3f} GiB, "
        f"{stats.get('circuits_opened', 0)} circuits)"
    )


if __name__ == "__main__":
    main()
