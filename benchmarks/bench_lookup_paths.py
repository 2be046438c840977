#!/usr/bin/env python3
"""Disjoint-path lookups (S/Kademlia): success against adversaries, and the cost.

    python benchmarks/bench_lookup_paths.py                       # 1,000 nodes, 500 targets
    python benchmarks/bench_lookup_paths.py --fractions 0.2 --paths 1,3 --targets 100

The lookup engine (p2pnode.dht.lookup) runs unchanged against a simulated network
in memory, under the simulator's virtual-time loop (no sockets, no waiting):

- Every node's routing table holds up to k random nodes of each XOR-distance range
  (built with full knowledge, as after a long uptime).
- Honest nodes answer find_node with the k closest of their table; dead nodes never
  answer. Adversaries are a fraction of the ids, spread uniformly. Attack "collude":
  they answer with the k adversaries closest to the target, never an honest node.
  Attack "sybil": they answer with k made-up ids closer to the target than any
  honest node (at their own addresses), which answer in turn with more of them.
- Each node answers after its own round trip, drawn once in [20, 200] ms; a query
  stalls (stops holding an alpha slot) after 4 mean round trips, as Discovery's does.
- A lookup starts at a random honest node from the 3k contacts of its table closest
  to the target (what Discovery passes), toward a random key; every d sees the same
  starts and keys.

Success: the honest node closest to the key (the one holding its value) answered,
on any path. Printed per number of paths d (and per-path k): success and RPCs at
each adversarial fraction; then, in an honest network (and one with 10% dead
nodes), per variant (path_alpha, path_k): success, the share of the true k closest
among the k returned, find_node RPCs per lookup, hops to the closest node, and the
lookup's virtual latency (closest: until every path converged; find_peer: until the
target answered).
A benchmark prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

from kademlia.node import Node

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pnode.dht.lookup import disjoint_lookup
from p2pnode.sim import vloop
from p2pnode.sim.lookupnet import SimNetwork

RTT_RANGE = (0.02, 0.2)  # seconds: each node's round trip, drawn once
STALL = 4 * sum(RTT_RANGE) / 2
DEAD_TIMEOUT = 2.0  # an RPC to a dead node gives up after this long
SEEDS_K = 3  # Discovery starts from 3k contacts (LOOKUP_SEEDS_K)


async def answer_after_rtt(net: SimNetwork, asked: int, target: int, k: int) -> list[Node] | None:
    """``net``'s answer after ``asked``'s round trip (a dead node: after the timeout)."""
    await asyncio.sleep(DEAD_TIMEOUT if asked in net.dead else net.rtt[asked])
    return net.answer(asked, target, k)


async def one_lookup(
    net: SimNetwork,
    rng: random.Random,
    *,
    paths: int,
    k: int,
    alpha: int,
    path_alpha: int | None,
    path_k: int | None = None,
    find_peer: bool,
) -> tuple[bool, int, int | None, float, float]:
    """(success, RPCs, hops to the goal, seconds, share of the k closest live
    honest nodes among the k returned) of one lookup."""
    if find_peer:
        goal = rng.choice(net.honest)
        target = goal
    else:
        target = rng.getrandbits(160)
        goal = min(net.honest, key=lambda j: j ^ target)
    me = rng.choice([i for i in net.honest if i != goal])  # never the goal itself
    seeds = net.seeds(me, target, SEEDS_K * k)
    reached = False

    async def query(node: Node) -> list[Node] | None:
        nonlocal reached
        answer = await answer_after_rtt(net, node.long_id, target, k)
        if find_peer and answer is not None and node.long_id == goal:
            reached = True
        return answer

    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await disjoint_lookup(
        target.to_bytes(20, "big"),
        seeds,
        query,
        self_id=net.nodes[me].id,
        k=k,
        alpha=alpha,
        timeout=30.0,
        max_queries=200,
        paths=paths,
        path_alpha=path_alpha,
        path_k=path_k,
        done=(lambda: reached) if find_peer else None,
        stall=STALL,
    )
    seconds = loop.time() - started
    goal_id = net.nodes[goal].id
    # Found: the goal answered (it holds the value), on any path.
    ok = reached or any(n.id == goal_id for asked in result.queried for n in asked)
    true = {net.nodes[j].id for j in net.closest(net.honest, target, k)}
    recall = len(true & {n.id for n in result.closest}) / len(true)
    return ok, result.queries, result.hops(goal_id) if ok else None, seconds, recall


async def series(
    net: SimNetwork, targets: int, seed: int, *, find_peer: bool = False, **kw: object
) -> list[tuple[bool, int, int | None, float, float]]:
    rng = random.Random(seed)  # the same initiators and targets for every d
    return [await one_lookup(net, rng, find_peer=find_peer, **kw) for _ in range(targets)]  # type: ignore[arg-type]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def variants(d: int, k: int, alpha: int, split: bool) -> list[tuple[int | None, int | None]]:
    """(path_alpha, path_k) to try with d paths: each path a whole lookup (alpha,
    k: the default, S/Kademlia's); with ``split``, also the k closest split between
    the paths (alpha, k/d) and alpha split between them (alpha/d, k)."""
    if d == 1 or not split:
        return [(alpha, k)]
    return [(alpha, k), (alpha, -(-k // d)), (max(1, -(-alpha // d)), k)]


async def main(args: argparse.Namespace) -> None:
    ds = [int(x) for x in args.paths.split(",")]
    fractions = [float(x) for x in args.fractions.split(",") if x]
    k, alpha = args.k, args.alpha
    print(
        f"{args.nodes} nodes, k={k}, alpha={alpha}, {args.targets} random targets, seed {args.seed}"
    )
    for attack in [a for a in args.attacks.split(",") if a] if fractions else []:
        print(f"\nlookups that reach the honest node closest to the key, attack {attack}:")
        print("d  path_k " + "".join(f"{f:>8.0%} adv  RPCs " for f in fractions))
        sybil = attack == "sybil"
        nets = [
            SimNetwork(
                args.nodes,
                seed=args.seed,
                bucket=k,
                adversarial=f,
                sybil=sybil,
                rtt_range=RTT_RANGE,
            )
            for f in fractions
        ]
        for d in ds:
            for path_alpha, path_k in variants(d, k, alpha, args.split):
                if path_alpha != alpha:
                    continue  # alpha split: slower, no safer (see the cost table)
                row = f"{d:<3}{path_k or k:>6} "
                for net in nets:
                    runs = await series(
                        net, args.targets, args.seed, paths=d, k=k, alpha=alpha,
                        path_alpha=None, path_k=path_k,
                    )  # fmt: skip
                    ok = sum(r[0] for r in runs) / len(runs)
                    rpcs = statistics.mean(r[1] for r in runs)
                    row += f"{ok:>12.1%} {rpcs:5.0f} "
                print(row, flush=True)
    for dead in [float(x) for x in args.dead.split(",") if x]:
        net = SimNetwork(args.nodes, seed=args.seed, bucket=k, dead=dead, rtt_range=RTT_RANGE)
        print(f"\ncost in a network without adversaries, {dead:.0%} dead nodes:")
        print(
            "d  path_alpha path_k | closest: ok  k-closest  RPCs  hops  median  p90 s |"
            " find_peer: ok  RPCs  median  p90 s"
        )
        for d in ds:
            for path_alpha, path_k in variants(d, k, alpha, args.split):
                kw = {
                    "paths": d,
                    "k": k,
                    "alpha": alpha,
                    "path_alpha": path_alpha,
                    "path_k": path_k,
                }
                close = await series(net, args.targets, args.seed, **kw)
                peer = await series(net, args.targets, args.seed, find_peer=True, **kw)
                hops = [r[2] for r in close if r[2] is not None]
                lat = [r[3] for r in close]
                plat = [r[3] for r in peer]
                print(
                    f"{d:<3}{path_alpha or alpha:>10}{path_k or k:>7} | "
                    f"{sum(r[0] for r in close) / len(close):>10.1%} "
                    f"{statistics.mean(r[4] for r in close):>9.1%} "
                    f"{statistics.mean(r[1] for r in close):6.1f} "
                    f"{statistics.mean(hops) if hops else float('nan'):5.2f} "
                    f"{statistics.median(lat):7.3f} {pct(lat, 0.9):5.3f} | "
                    f"{sum(r[0] for r in peer) / len(peer):>12.1%} "
                    f"{statistics.mean(r[1] for r in peer):5.1f} "
                    f"{statistics.median(plat):7.3f} {pct(plat, 0.9):5.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--targets", type=int, default=500)
    parser.add_argument("--paths", default="1,2,3,4,8")
    parser.add_argument("--fractions", default="0.1,0.2,0.3")
    parser.add_argument("--attacks", default="collude,sybil")
    parser.add_argument("--dead", default="0,0.1", help="dead fractions of the cost runs")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--alpha", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--no-split", dest="split", action="store_false", help="only the default paths"
    )
    t0 = time.perf_counter()
    vloop.run(lambda: main(parser.parse_args()))
    print(f"\n({time.perf_counter() - t0:.0f} s wall)")
