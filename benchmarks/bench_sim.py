#!/usr/bin/env python3
"""Simulator figures: virtual mode at 1,000 and 10,000 nodes (100,000 with --huge),
and one 1,000-node scenario in inprocess and virtual mode side by side (same seed).

    python benchmarks/bench_sim.py                  # 1k + 10k virtual, then 1k inprocess vs virtual
    python benchmarks/bench_sim.py --sizes 1000 --no-compare
    python benchmarks/bench_sim.py --huge           # adds 100,000 nodes (long; ~10 GB RSS)

Each run is its own ``scripts/simulate.py`` process (so peak RSS is that run's),
its report read back from ``report.json``. Printed per run: wall and CPU time,
peak RSS (and per node), simulated events per second, lookup success, hops and RPCs
per lookup next to log2 N. A benchmark prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIMULATE = ROOT / "scripts" / "simulate.py"

# A realistic small workload for any size: join, probe rounds, lookups, puts and
# gets, a few shares each fetched by a few nodes. The join rate scales so a 10k run
# does not spend its whole simulated time joining.
WORKLOAD = [
    "--duration", "30", "--lookups", "500", "--dht-values", "20",
    "--dht-gets-per-value", "3", "--resources", "4", "--fetches-per-resource", "3",
    "--probe-lookups", "20",
]  # fmt: skip


def run(mode: str, nodes: int, seed: int, extra: list[str], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        out = Path(tmp) / "out"
        args = [
            sys.executable, str(SIMULATE), "--mode", mode, "--nodes", str(nodes),
            "--seed", str(seed), "--out", str(out), "--quiet", *WORKLOAD, *extra,
        ]  # fmt: skip
        if mode == "inprocess":
            shm = Path("/dev/shm")
            if shm.is_dir():  # homes on tmpfs start faster (README)
                args += ["--workdir", str(Path(tempfile.mkdtemp(prefix="bench-sim-", dir=shm)))]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M %U %S", *args] if Path("/usr/bin/time").exists() else args,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"{mode} {nodes}: exit {proc.returncode}")
        report = json.loads((out / "report.json").read_text())
    peak_kib = cpu = None
    last = proc.stderr.strip().splitlines()[-1:] if proc.stderr else []
    if last and len(last[0].split()) == 3:
        kib, user, system = last[0].split()
        peak_kib, cpu = int(kib), float(user) + float(system)
    report["_bench"] = {"process_wall": wall, "peak_rss": peak_kib and peak_kib * 1024, "cpu": cpu}
    return report


def row(report: dict[str, Any]) -> dict[str, Any]:
    f = report["figures"]
    wall = report.get("wallclock", {})
    bench = report["_bench"]
    nodes = report["scenario"]["nodes"]
    memory = report.get("memory", {})
    peak = bench["peak_rss"] or wall.get("rss_peak") or memory.get("rss_peak_total")
    return {
        "mode": report["scenario"]["mode"],
        "nodes": nodes,
        "wall_s": wall.get("wall_time", report["run"]["total_time"]),
        "process_wall_s": bench["process_wall"],
        "cpu_s": bench["cpu"],
        "sim_s": report["run"]["total_time"],
        "peak_rss_mib": peak / 2**20 if peak else None,
        # RSS above the simulator's own before any node started (Python, matplotlib).
        "rss_per_node_kib": _per_node(wall.get("rss_per_node") or memory.get("rss_per_node")),
        "events_per_s": wall.get("events_per_second"),
        "lookup_ok": f["lookup_success_rate"],
        "probe_ok": f["probe_success_rate"],
        "hops": f["hops_per_lookup_mean"],
        "rpcs": f["rpcs_per_lookup_mean"],
        "log2n": math.log2(nodes),
        "lookup_p50_ms": (f["lookup_latency_p50_s"] or 0) * 1000,
        "get_ok": f["dht_get_success_rate"],
        "fetch_ok": f["download_success_rate"],
        "joined_s": report["join"]["bootstrap_time"],
        "join_failures": report["join"]["join_failures"],
    }


def _fits(previous: dict[str, Any], nodes: int) -> bool:
    """Whether ``nodes`` should fit in memory, from the last run's per-node RSS."""
    import psutil

    per_node = (previous["rss_per_node_kib"] or 0) * 1024
    need = 1.5 * per_node * nodes + 2**30  # routing tables grow with log N; slack
    available = psutil.virtual_memory().available
    print(
        f"{nodes} nodes: ~{need / 2**30:.1f} GiB needed "
        f"({per_node / 1024:.0f} KiB per node at {previous['nodes']}), "
        f"{available / 2**30:.1f} GiB available",
        flush=True,
    )
    if need > available:
        print(f"skipping {nodes} nodes: not enough memory", flush=True)
        return False
    return True


def _per_node(value: float | None) -> float | None:
    return value / 1024 if value else None


COLUMNS = [
    ("mode", "{}"), ("nodes", "{}"), ("wall_s", "{:.1f}"), ("cpu_s", "{:.1f}"),
    ("sim_s", "{:.1f}"), ("peak_rss_mib", "{:.0f}"), ("rss_per_node_kib", "{:.0f}"),
    ("events_per_s", "{:.0f}"), ("lookup_ok", "{:.3f}"), ("probe_ok", "{:.3f}"),
    ("hops", "{:.2f}"), ("rpcs", "{:.2f}"), ("log2n", "{:.1f}"), ("lookup_p50_ms", "{:.1f}"),
    ("get_ok", "{:.3f}"), ("fetch_ok", "{:.3f}"), ("joined_s", "{:.1f}"),
    ("join_failures", "{}"),
]  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    def cell(r: dict[str, Any], key: str, fmt: str) -> str:
        v = r.get(key)
        return "-" if v is None else fmt.format(v)

    cells = [[k for k, _ in COLUMNS]] + [[cell(r, k, f) for k, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c[i].rjust(widths[i]) for i in range(len(c))) for c in cells)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="1000,10000", help="virtual-mode sizes (comma-separated)")
    p.add_argument("--huge", action="store_true", help="also 100,000 nodes")
    p.add_argument("--no-compare", action="store_true", help="skip inprocess vs virtual")
    p.add_argument("--compare-nodes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--timeout", type=float, default=3600.0, help="per run, seconds")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.huge:
        sizes.append(100_000)
    rows: list[dict[str, Any]] = []
    print(f"virtual mode, seed {args.seed}, workload: {' '.join(WORKLOAD)}", flush=True)
    for n in sizes:
        if n >= 100_000 and rows and not _fits(rows[-1], n):
            continue
        rate = str(max(50, n // 40))  # joins per second: 50 at 1k, 250 at 10k
        rows.append(row(run("virtual", n, args.seed, ["--join-rate", rate], args.timeout)))
        print(table(rows), flush=True)
    compare: list[dict[str, Any]] = []
    if not args.no_compare:
        n = args.compare_nodes
        # Identical flags in both modes; the link delay is given explicitly since the
        # modes' defaults differ (in-process: loopback, 0 ms; virtual: 20 ms).
        same = ["--join-rate", "50", "--latency-ms", "10"]
        print(f"\n{n} nodes, seed {args.seed}, same scenario in both modes ({' '.join(same)}):")
        for mode in ("inprocess", "virtual"):
            compare.append(row(run(mode, n, args.seed, same, args.timeout)))
        print(table(compare))
        a, b = compare
        for key in ("lookup_ok", "probe_ok", "hops", "rpcs"):
            if a[key] and b[key] is not None:
                print(f"  {key}: virtual / inprocess = {b[key] / a[key]:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"virtual": rows, "compare": compare}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
