#!/usr/bin/env python3
"""The DHT against colluding Sybils (issue 10): success of honest lookups,
signed-record gets and provider lookups with 0%, 10%, 20% and 30% of the nodes
adversarial, same seed for each, in the virtual-time simulator.

    python benchmarks/bench_adversarial.py                       # 1,000 nodes, ~5-10 min
    python benchmarks/bench_adversarial.py --nodes 150           # a quick check
    python benchmarks/bench_adversarial.py --fractions 0.2 --json out.json

The adversaries (p2pnode/sim/adversary.py) have ids ground next to the workload's
keys, answer lookups with colluders only, forge values and records, spam provider
records and drop stores. Every requester and every target of the workload is
honest. Target: >= 99% at 20% adversarial.

Measured (1,000 nodes, seed 7, 10/20/30% Sybils ground next to the keys):
DHT of 09614e8 (before issue 10): lookups 74.3/62.7/54.7%, provider lookups
35/30/17%, no signed records; DHT of d1e9ac9: lookups and signed-record gets
100/100/100%, provider lookups 100/100/96%.

Reading the failures: "impersonated", a peer lookup ended at a colluder that
answered under the target's id (a lookup must check the id proof of the node it
returns); "stale", a record get returned an older, validly signed version that
Sybils replayed; "only-fake", every provider record found was a Sybil's (validly
signed by throw-away keys, pointing where nothing listens); "not-found", the
lookup never reached the target. Plain (unsigned) gets are unauthenticated by
design: their "forged" count is what an attacker can do to them.

S/Kademlia's adversary model (random ids, adversarial routing only):
``--random-ids --set adv_impersonate=false``.

Anchor: S/Kademlia (Baumgart and Mies, ICPADS 2007, section 5) simulated lookup
success against the fraction of adversarial nodes for several numbers d of
disjoint paths (lookups split over d buckets, each node used on one path only).
Their plotted values could not be read from any source reachable here; a public
Go re-implementation of that experiment (kadsim: 1,000 nodes, k = 16, d = 8,
alpha = 3, 20% nodes doing adversarial routing) reports a 0.997 success ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pnode.sim.run import configure_logging, run_simulation
from p2pnode.sim.scenario import ScenarioConfig, ScenarioError, config_from_mapping

FRACTIONS = (0.0, 0.1, 0.2, 0.3)


def scenario(
    nodes: int, seed: int, fraction: float, hosts: int = 0, cluster: bool = True
) -> ScenarioConfig:
    return ScenarioConfig(
        mode="virtual",
        nodes=nodes,
        seed=seed,
        adversarial=fraction,
        adv_hosts=hosts,
        adv_cluster=cluster,
        join_rate=0.0,
        join_concurrency=32,
        duration=20.0,
        lookups=300,
        dht_values=10,
        dht_gets_per_value=4,
        dht_records=10,
        # Many requests on few keys: 100 trials each, the keys as concentrated
        # a target for the Sybils as with fewer requests.
        record_gets_per_record=10,
        resources=4,
        resource_size=64 * 1024,
        fetches_per_resource=2,
        provider_lookups_per_resource=25,
        probe_lookups=20,
        converge_timeout=20.0,
    ).validate()


def row(report: dict[str, Any], wall: float) -> dict[str, Any]:
    adv = report["adversarial"]
    success = adv["success"]
    forged = adv["forged_accepted"]
    grinding = (adv.get("adversary") or {}).get("grinding", {})
    return {
        "fraction": adv["fraction"],
        "sybils": adv["adversaries"],
        "lookup": success["lookup"],
        "record_get": success["record_get"],
        "provider_lookup": success["provider_lookup"],
        "value_get": success["value_get"],
        "download": success["download"],
        "lookups": _n(report["lookups"]),
        "record_gets": _n(adv["record_gets"]),
        "provider_lookups": _n(adv["provider_lookups"]),
        "forged_values_accepted": forged["values"],
        "forged_records_accepted": forged["records"],
        "stale_records_accepted": forged["stale_records"],
        "lookups_impersonated": adv["lookups_impersonated"],
        "sybil_share_of_tables": adv["routing_tables"]["sybil_share"]["mean"],
        "errors": {
            "lookup": report["lookups"]["errors"],
            "record_get": adv["record_gets"]["errors"],
            "provider_lookup": adv["provider_lookups"]["errors"],
        },
        "grind_tries": grinding.get("tries", 0),
        "sybil_prefix_bits_mean": (grinding.get("prefix_bits") or {}).get("mean"),
        "wall_s": wall,
    }


def _n(summary: dict[str, Any]) -> str:
    return f"{summary['ok']}/{summary['attempted']}"


def _pct(v: float | None) -> str:
    return "   -  " if v is None else f"{100 * v:5.1f}%"


def print_table(rows: list[dict[str, Any]], nodes: int, seed: int) -> None:
    print(f"\nadversarial simulation: {nodes} nodes, seed {seed}, virtual mode")
    print(
        f"{'adv':>5} {'sybils':>6} | {'lookup':>15} | {'record get':>14} | "
        f"{'provider lookup':>15} | {'value get':>7} | forged v/r/stale | impostor | "
        "Sybils in tables | wall"
    )
    for r in rows:
        print(
            f"{100 * r['fraction']:4.0f}% {r['sybils']:>6} | "
            f"{_pct(r['lookup'])} {r['lookups']:>8} | "
            f"{_pct(r['record_get'])} {r['record_gets']:>7} | "
            f"{_pct(r['provider_lookup'])} {r['provider_lookups']:>8} | "
            f"{_pct(r['value_get'])} | "
            f"{r['forged_values_accepted']:>4} / {r['forged_records_accepted']} / "
            f"{r['stale_records_accepted']:<5} | {r['lookups_impersonated']:>8} | "
            f"{_pct(r['sybil_share_of_tables']):>16} | {r['wall_s']:.0f} s"
        )


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--fractions", default=",".join(str(f) for f in FRACTIONS), help="comma-separated"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--adv-hosts",
        type=int,
        default=0,
        help="addresses the Sybils share (1: one host; default 0: one address each)",
    )
    parser.add_argument(
        "--random-ids",
        action="store_true",
        help="Sybils with random ids, not ground next to the targets (S/Kademlia's model)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other scenario setting, e.g. adv_impersonate=false (repeatable)",
    )
    parser.add_argument("--label", help="what DHT this is (default: the git commit)")
    args = parser.parse_args()
    if os.environ.get("PYTHONHASHSEED") != "0":  # same seed, same run (set order)
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"}
        )
    configure_logging(None)
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    overrides = {}
    for item in args.set:
        key, _, text = item.partition("=")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    try:
        config_from_mapping(overrides, scenario(args.nodes, args.seed, 0.0))
    except ScenarioError as exc:
        parser.error(str(exc))
    rows = []
    for fraction in fractions:
        config = scenario(
            args.nodes, args.seed, fraction, args.adv_hosts, cluster=not args.random_ids
        )
        config = config_from_mapping(overrides, config)
        t0 = time.perf_counter()
        report = run_simulation(config, progress=False).report
        rows.append(row(report, time.perf_counter() - t0))
        print(
            f"  {100 * fraction:.0f}%: done in {rows[-1]['wall_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    print_table(rows, args.nodes, args.seed)
    where = f"on {args.adv_hosts} shared address(es)" if args.adv_hosts else "each on its own /24"
    ids = "random ids" if args.random_ids else "ids ground next to the targets"
    print(f"  Sybils {where}, {ids}" + "".join(f"; {item}" for item in args.set))
    for r in rows:
        failures = {k: v for k, v in r["errors"].items() if v}
        if failures:
            print(f"  failures at {100 * r['fraction']:.0f}%: {failures}")
    label = args.label or f"commit {commit()}, the DHT in the working tree at run time"
    print(f"({label})")
    if args.json is not None:
        settings = dataclasses.asdict(scenario(args.nodes, args.seed, 0.0))
        out = {"dht": args.label or commit(), "scenario": settings, "rows": rows}
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
