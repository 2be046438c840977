"""Hole punching success over N tries per NAT pair, and the time to a direct
connection (issue 12's figure). Root only: it builds a network-namespace lab
(p2pnode/sim/netlab.py) with a public bridge, a relay host (tests/splice.py) and one
pair of hosts behind routers per row; every peer runs in this process with
its sockets in its own namespace (tests/netns.py).

Each try: two fresh PeerHosts on fresh ports (no stale conntrack entry is
reused), a relayed connection that the left one dials, then
``HolePuncher.upgrade`` from the left (up to ``attempts`` rounds).

    sudo .venv/bin/python benchmarks/bench_holepunch.py [--tries 20] [--open-timeout 1.5]

Rows: both behind port-keeping NATs that drop unsolicited inbound ("eim"),
both behind port-keeping NATs that answer it with RST ("eim_nodrop"),
symmetric (masquerade random) / eim, public / eim, and over IPv6 both behind
routers with a stateful firewall and no NAT ("firewall6").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pnode.errors import HolePunchFailed
from p2pnode.nat.holepunch_core import HolePunchConfig
from p2pnode.sim.netlab import Lab, Node, missing_tools
from tests.punch_lab import Behind, Peer, PunchLab

PAIRS: list[tuple[str, str]] = [
    ("eim", "eim"),
    ("eim_nodrop", "eim_nodrop"),
    ("symmetric", "eim"),
    ("public", "eim"),
    ("firewall6", "firewall6"),  # IPv6: no NAT, a stateful firewall dropping unsolicited inbound
]


@dataclass
class Row:
    pair: tuple[str, str]
    ok: int = 0
    first_round: int = 0
    times: list[float] = field(default_factory=list)
    fail_times: list[float] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    vias: dict[str, int] = field(default_factory=dict)


def place(plab: PunchLab, name: str, kind: str) -> tuple[Node, str, bool]:
    if kind == "firewall6":
        return plab.place_v6(name, "firewall")
    return plab.place(name, cast(Behind, kind))


async def one_pair(pair: tuple[str, str], tries: int, config: HolePunchConfig) -> Row:
    row = Row(pair)
    with Lab() as lab:
        plab = PunchLab(lab)
        try:
            left = place(plab, "a", pair[0])
            right = place(plab, "b", pair[1])
            for _ in range(tries):
                a = await plab.peer(*left, config)
                b = await plab.peer(*right, config)
                await plab.relay(a, b)
                started = time.perf_counter()
                try:
                    conn = await a.puncher.upgrade(b.node_id)
                except HolePunchFailed as exc:
                    row.fail_times.append(time.perf_counter() - started)
                    row.reasons[exc.reason] = row.reasons.get(exc.reason, 0) + 1
                else:
                    row.times.append(time.perf_counter() - started)
                    row.ok += 1
                    row.first_round += a.puncher.stats()["holepunch_rounds"] == 1
                    how = f"{conn.via}/{await other_side(b, a)}"
                    row.vias[how] = row.vias.get(how, 0) + 1
                await a.close()
                await b.close()
                plab.peers.clear()
        finally:
            await plab.close()
    return row


async def other_side(b: Peer, a: Peer) -> str:
    """How the right peer sees the new connection (its end may finish a moment later)."""
    for _ in range(100):  # bounded: 1 s
        theirs = {str(c.via) for c in b.host.connections_to(a.node_id)} - {"relayed"}
        if theirs:
            return ",".join(sorted(theirs))
        await asyncio.sleep(0.01)
    return "?"


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"{statistics.median(ordered) * 1000:.0f}/{p90 * 1000:.0f}/{ordered[-1] * 1000:.0f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--open-timeout", type=float, default=1.5)
    parser.add_argument("--attempts", type=int, default=3)
    args = parser.parse_args()
    if missing_tools():
        sys.exit(f"needs the lab: {', '.join(missing_tools())}")
    config = HolePunchConfig(
        attempts=args.attempts, open_timeout=args.open_timeout, retry_delay=0.2
    )
    print(
        f"{args.tries} tries per pair, up to {config.attempts} rounds, "
        f"open timeout {config.open_timeout:g} s"
    )
    print(
        f"{'left (dials relay) / right':28} {'success':>9} {'1st round':>9} "
        f"{'time ms p50/p90/max':>20} {'failed after ms':>16}  how (left/right) | why failed"
    )
    for pair in PAIRS:
        row = await one_pair(pair, args.tries, config)
        how = ", ".join(f"{k} x{v}" for k, v in sorted(row.vias.items()))
        why = ", ".join(f"{k} x{v}" for k, v in sorted(row.reasons.items()))
        print(
            f"{pair[0] + ' / ' + pair[1]:28} {row.ok:>4}/{args.tries:<4} "
            f"{row.first_round:>4}/{args.tries:<4} {ms(row.times):>20} "
            f"{ms(row.fail_times):>16}  {how}{' | ' + why if why else ''}",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())
