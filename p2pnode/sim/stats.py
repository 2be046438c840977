"""What a simulation measures, and the arithmetic on it (pure: no I/O, no clocks).

Runners append ``OpResult`` records (one per operation or probe lookup) and
``NodeSample`` records (one per node, at the end) to a ``Measurements``; the
report is computed from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class OpResult:
    """One measured operation. Times are seconds since the run started."""

    kind: str  # share, fetch, put, get, lookup, probe, kill, restart, start
    node: int
    arg: int
    started: float
    ended: float
    ok: bool
    error: str = ""
    phase: str = "workload"  # join, converge, workload
    network_size: int = 0  # nodes running when it started
    nbytes: int = 0  # bytes transferred (fetch) or shared (share)
    verified: bool = False  # fetch: the downloaded bytes hash to what was shared
    rpcs: float | None = None  # DHT RPCs the lookup cost (see Measurements.rpc_source)
    hops: float | None = None  # lookup rounds, when the DHT facade reports them
    skipped: bool = False  # not run: its actor was down or a dependency failed

    @property
    def latency(self) -> float:
        return max(0.0, self.ended - self.started)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["latency"] = round(self.latency, 6)
        return out


@dataclass
class NodeSample:
    index: int
    restarts: int = 0
    alive_at_end: bool = True
    bytes_sent: int = 0  # peer connections (TCP) + DHT (UDP) where known
    bytes_received: int = 0
    dht_bytes_sent: int = 0
    net_bytes_sent: int = 0
    rss_peak: int = 0  # process mode only (psutil on the child)
    routing_table_size: int = 0
    dht_stats: dict[str, Any] = field(default_factory=dict)
    net_stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Measurements:
    started_at: float = 0.0  # wall clock (time.time()) when the run started
    ops: list[OpResult] = field(default_factory=list)
    nodes: list[NodeSample] = field(default_factory=list)
    # (t, nodes running) whenever it changes.
    alive: list[tuple[float, int]] = field(default_factory=list)
    bootstrap_time: float | None = None  # first start -> every node started and joined
    converge_time: float | None = None  # first start -> a probe round fully succeeded
    converge_rounds: int = 0
    probe_pause: float = 0.0  # time joins were paused for checkpoint probe rounds
    join_failures: int = 0
    workload_started: float | None = None
    workload_ended: float | None = None
    total_time: float = 0.0
    # Process RSS: in-process, the one process's peak; processes, the sum of children.
    rss_peak_total: int = 0
    rss_baseline: int = 0  # in-process: RSS before the first node started
    rpc_source: str = ""  # how OpResult.rpcs was obtained
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    # Virtual mode: what the run cost on the real machine (wall time, events, ...).
    wall: dict[str, Any] = field(default_factory=dict)

    def of(self, *kinds: str, phase: str | None = None) -> list[OpResult]:
        return [r for r in self.ops if r.kind in kinds and (phase is None or r.phase == phase)]


# ---------------------------------------------------------------------------- arithmetic


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between closest ranks
    (numpy's default); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError("q must be in 0..100")
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(ordered[lo])
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def distribution(values: Iterable[float]) -> dict[str, float | int | None]:
    vals = [float(v) for v in values]
    if not vals:
        return {
            "count": 0,
            "mean": None,
            "min": None,
            "p50": None,
            "p95": None,
            "p99": None,
            "max": None,
        }
    return {
        "count": len(vals),
        "mean": sum(vals) / len(vals),
        "min": min(vals),
        "p50": percentile(vals, 50),
        "p95": percentile(vals, 95),
        "p99": percentile(vals, 99),
        "max": max(vals),
    }


def ratio(part: int, whole: int) -> float | None:
    return None if whole == 0 else part / whole


def success_summary(results: Sequence[OpResult]) -> dict[str, Any]:
    """Counts that add up: attempted = ok + failed; skipped ones are apart."""
    run = [r for r in results if not r.skipped]
    ok = sum(1 for r in run if r.ok)
    died = sum(1 for r in run if not r.ok and r.error.startswith("down"))
    errors: dict[str, int] = {}
    for r in run:
        if not r.ok:
            key = r.error.split(":", 1)[0] or "error"
            errors[key] = errors.get(key, 0) + 1
    return {
        "planned": len(results),
        "skipped": len(results) - len(run),
        "attempted": len(run),
        "ok": ok,
        "failed": len(run) - ok,
        "success_rate": ratio(ok, len(run)),
        # Leaving out the operations whose own node was killed while they ran.
        "actor_killed": died,
        "success_rate_actor_up": ratio(ok, len(run) - died),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
    }


def success_over_time(
    results: Sequence[OpResult], start: float, end: float, buckets: int = 10
) -> list[dict[str, Any]]:
    """Success rate of the operations started in each of ``buckets`` equal windows."""
    if end <= start or buckets < 1:
        return []
    width = (end - start) / buckets
    ok = [0] * buckets
    total = [0] * buckets
    for r in results:
        if r.skipped:
            continue
        i = min(buckets - 1, max(0, int((r.started - start) / width)))
        total[i] += 1
        ok[i] += int(r.ok)
    rows: list[dict[str, Any]] = [
        {
            "t0": start + i * width,
            "t1": start + (i + 1) * width,
            "ok": ok[i],
            "total": total[i],
            "success_rate": ratio(ok[i], total[i]),
        }
        for i in range(buckets)
    ]
    return rows


def alive_series_at(alive: Sequence[tuple[float, int]], t: float) -> int:
    """Nodes running at time t from a (t, count) step series."""
    count = 0
    for when, n in alive:
        if when > t:
            break
        count = n
    return count


def by_network_size(results: Sequence[OpResult]) -> list[dict[str, Any]]:
    """Per network size (probe rounds at checkpoints): success, mean hops and RPCs."""
    groups: dict[int, list[OpResult]] = {}
    for r in results:
        if not r.skipped:
            groups.setdefault(r.network_size, []).append(r)
    rows = []
    for size in sorted(groups):
        group = groups[size]
        ok = [r for r in group if r.ok]
        rpcs = [r.rpcs for r in group if r.rpcs is not None]
        hops = [r.hops for r in group if r.hops is not None]
        rows.append(
            {
                "nodes": size,
                "log2_nodes": math.log2(size) if size > 0 else None,
                "lookups": len(group),
                "ok": len(ok),
                "success_rate": ratio(len(ok), len(group)),
                "rpcs_mean": sum(rpcs) / len(rpcs) if rpcs else None,
                "rpcs_p95": percentile(rpcs, 95),
                "hops_mean": sum(hops) / len(hops) if hops else None,
                "latency_p50": percentile([r.latency for r in ok], 50),
            }
        )
    return rows


def throughput(results: Sequence[OpResult]) -> dict[str, Any]:
    """Per-download rate (bytes/s) distribution and the aggregate over the busy time."""
    done = [r for r in results if r.ok and r.nbytes > 0 and r.latency > 0]
    rates = [r.nbytes / r.latency for r in done]
    total = sum(r.nbytes for r in done)
    busy = _union_length([(r.started, r.ended) for r in done]) if done else 0.0
    return {
        "downloads": len(done),
        "bytes": total,
        "per_download_bps": distribution(rates),
        "aggregate_bps": total / busy if busy > 0 else None,
        "busy_seconds": busy,
    }


def _union_length(intervals: Iterable[tuple[float, float]]) -> float:
    total = 0.0
    cur_start: float | None = None
    cur_end = 0.0
    for s, e in sorted(intervals):
        if cur_start is None or s > cur_end:
            if cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_start is not None:
        total += cur_end - cur_start
    return total
