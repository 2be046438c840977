"""Endgame duplicate bytes of a download from 4 providers (a benchmark, not a test).

    python benchmarks/bench_endgame.py [--size-mib 64] [--runs 3] [--no-cache]

Real nodes (Discovery, PeerHost, Exchange) on 127.0.0.2-5 and 127.0.0.10, files
under /dev/shm. Printed per run: the download's seconds; ``sent_dup_bytes``,
the piece bytes the providers sent beyond the file size (their
``bytes_served``: the same measure with or without endgame cancels); the
downloader's ``unexpected_responses`` (answers to requests it had dropped) and
``answers_after_cancel`` (answers that crossed its cancel), its endgame
counters and ``cancels_sent``; the providers' ``cancels_received`` (a handler
stopped), ``cancels_too_late`` and ``reads_cancelled``. ``--no-cache``
makes the providers read every piece in a thread (``serve_cached_reads=False``),
as pieces not in the page cache are.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
import time
from pathlib import Path

from p2pnode.dht import DhtConfig, Discovery
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.service import Exchange
from p2pnode.identity import Identity
from p2pnode.net.config import NetLimits
from p2pnode.net.host import PeerHost


class _Node:
    def __init__(self, discovery: Discovery, host: PeerHost, exchange: Exchange, ip: str) -> None:
        self.discovery, self.host, self.exchange, self.ip = discovery, host, exchange, ip
        self.udp = 0

    async def close(self) -> None:
        await self.exchange.close()
        await self.host.close()
        await self.discovery.close()


async def _node(home: Path, ip: str, config: ExchangeConfig, boot: _Node | None) -> _Node:
    identity = Identity.generate()
    discovery = Discovery(identity, DhtConfig(rpc_timeout=1.0, lookup_timeout=5.0))
    udp = await discovery.listen(ip, 0)
    host = PeerHost(identity, NetLimits(request_timeout=30.0))
    tcp = await host.listen(ip, 0)
    exchange = Exchange(home, config, discovery, host, tcp)
    await exchange.start()
    node = _Node(discovery, host, exchange, ip)
    node.udp = udp
    if boot is not None:
        await discovery.bootstrap([(boot.ip, boot.udp)])
    return node


async def run(size: int, cached: bool, tmp: Path) -> dict[str, object]:
    config = ExchangeConfig(fsync=False, stale_check_interval=0, serve_cached_reads=cached)
    src = tmp / "file.bin"
    data = os.urandom(size)
    src.write_bytes(data)
    providers: list[_Node] = []
    for i in range(4):
        boot = providers[0] if providers else None
        providers.append(await _node(tmp / f"p{i}", f"127.0.0.{i + 2}", config, boot))
    rid = b""
    for p in providers:
        rid = (await p.exchange.share(src)).resource_id
    leech = await _node(tmp / "leech", "127.0.0.10", config, providers[0])
    for _ in range(200):
        if len(await leech.exchange.providers(rid)) >= 4:
            break
        await asyncio.sleep(0.05)
    started = time.perf_counter()
    await leech.exchange.get(rid, tmp / "out.bin")
    took = time.perf_counter() - started
    got = hashlib.sha256((tmp / "out.bin").read_bytes()).digest()
    assert got == hashlib.sha256(data).digest(), "the download differs from the file"
    await asyncio.sleep(1.0)  # late answers (without cancels) arrive meanwhile
    served = sum(p.exchange.stats().get("bytes_served", 0) for p in providers)
    stats = leech.exchange.stats()
    net = leech.host.stats()
    out: dict[str, object] = {
        "secs": round(took, 3),
        "sent_dup_bytes": served - size,
        "unexpected_responses": net.get("unexpected_responses", 0),
        "answers_after_cancel": net.get("answers_after_cancel", 0),
        "cancels_sent": net.get("cancels_sent", 0),
    }
    for name in ("endgame_duplicate_bytes", "pieces_cancelled"):
        out[name] = stats.get(name, "-")
    for name in ("cancels_received", "cancels_too_late"):
        out[name] = sum(p.host.stats().get(name, 0) for p in providers)
    out["reads_cancelled"] = sum(p.exchange.stats().get("reads_cancelled", 0) for p in providers)
    for node in [leech, *reversed(providers)]:
        await node.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-cache", action="store_true", help="providers read in threads")
    args = parser.parse_args()
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
            print(asyncio.run(run(args.size_mib << 20, not args.no_cache, Path(tmp))))


if __name__ == "__main__":
    main()
