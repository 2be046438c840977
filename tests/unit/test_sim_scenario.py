"""The simulation's pure parts: scenario generation, config parsing, statistics,
report assembly. No sockets, no processes."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from p2pnode.sim.report import build_report, format_table
from p2pnode.sim.scenario import (
    ScenarioConfig,
    ScenarioError,
    checkpoints,
    config_from_mapping,
    generate,
    load_config,
    probe_pairs,
)
from p2pnode.sim.stats import (
    Measurements,
    OpResult,
    by_network_size,
    distribution,
    percentile,
    success_over_time,
    success_summary,
    throughput,
)

BUSY = ScenarioConfig(
    nodes=50, seeds=3, bootstrap_per_node=2, churn=0.3, restart=0.5, duration=30.0,
    resources=6, fetches_per_resource=4, dht_values=8, lookups=200,
    resource_size=1000, resource_size_max=5000,
)  # fmt: skip


def test_same_seed_same_scenario() -> None:
    a, b = generate(BUSY), generate(dataclasses.replace(BUSY))
    assert a == b
    assert a.digest == b.digest
    assert [r.content() for r in a.resources] == [r.content() for r in b.resources]


def test_different_seed_different_scenario() -> None:
    a = generate(BUSY)
    b = generate(dataclasses.replace(BUSY, seed=BUSY.seed + 1))
    assert a.digest != b.digest
    assert a.ops != b.ops
    assert a.resources[0].content() != b.resources[0].content()


def test_plan_counts_and_invariants() -> None:
    s = generate(BUSY)
    n = BUSY.nodes
    assert len(s.nodes) == n
    assert [p.is_seed for p in s.nodes[:4]] == [True, True, True, False]
    assert s.nodes[0].bootstrap == ()
    for plan in s.nodes[BUSY.seeds :]:
        assert len(plan.bootstrap) == 2
        assert all(b < BUSY.seeds for b in plan.bootstrap)
    assert list(s.ops) == sorted(s.ops)
    kills = [op for op in s.ops if op.kind == "kill"]
    assert len(kills) == round(0.3 * (n - BUSY.seeds))
    assert all(op.node >= BUSY.seeds for op in kills), "seeds are never killed"
    assert s.count("share") == BUSY.resources
    assert s.count("put") == BUSY.dht_values
    assert s.count("get") == BUSY.dht_values * BUSY.dht_gets_per_value
    for op in s.ops:
        if op.kind in ("kill", "restart"):
            continue
        alive = s.alive_at(op.at)
        assert op.node in alive, f"{op} runs on a node the plan has down"
        if op.kind == "lookup":
            assert op.arg in alive and op.arg != op.node
    for r in s.resources:
        assert 1000 <= r.size <= 5000
        assert len(r.content()) == r.size
        fetchers = [op.node for op in s.ops if op.kind == "fetch" and op.arg == r.index]
        sharer = next(op.node for op in s.ops if op.kind == "share" and op.arg == r.index)
        assert len(set(fetchers)) == len(fetchers) and sharer not in fetchers
        t_share = next(op.at for op in s.ops if op.kind == "share" and op.arg == r.index)
        assert all(op.at >= t_share for op in s.ops if op.kind == "fetch" and op.arg == r.index)
    assert all(len(v.value) == BUSY.value_size for v in s.values)


def test_changing_the_workload_does_not_move_the_churn() -> None:
    a = generate(BUSY)
    b = generate(dataclasses.replace(BUSY, lookups=10, dht_values=1))
    churn = [op for op in a.ops if op.kind in ("kill", "restart")]
    assert churn == [op for op in b.ops if op.kind in ("kill", "restart")]


def test_checkpoints_and_probe_pairs() -> None:
    assert checkpoints(5) == ()
    assert checkpoints(20) == (8, 16)
    assert checkpoints(1000) == (8, 16, 32, 64, 128, 256, 512)
    alive = list(range(0, 40, 2))
    pairs = probe_pairs(BUSY, "size-8", alive, 30)
    assert pairs == probe_pairs(BUSY, "size-8", alive, 30)
    assert pairs != probe_pairs(BUSY, "size-16", alive, 30)
    assert all(a != b and a in alive and b in alive for a, b in pairs)
    assert probe_pairs(BUSY, "x", [3], 5) == []


def test_join_schedule_follows_join_rate() -> None:
    s = generate(ScenarioConfig(nodes=5, join_rate=2.0))
    assert [p.join_at for p in s.nodes] == [0.0, 0.5, 1.0, 1.5, 2.0]
    s = generate(ScenarioConfig(nodes=5, join_rate=0))
    assert {p.join_at for p in s.nodes} == {0.0}


def test_config_from_mapping_and_toml(tmp_path: Path) -> None:
    c = config_from_mapping({"nodes": 7, "join-rate": 3, "mode": "processes"})
    assert (c.nodes, c.join_rate, c.mode) == (7, 3.0, "processes")
    assert isinstance(c.join_rate, float)
    with pytest.raises(ScenarioError, match="unknown"):
        config_from_mapping({"nodez": 3})
    with pytest.raises(ScenarioError, match="integer"):
        config_from_mapping({"nodes": "many"})
    with pytest.raises(ScenarioError, match="churn"):
        config_from_mapping({"churn": 1.5})
    with pytest.raises(ScenarioError, match="mode"):
        config_from_mapping({"mode": "threads"})
    path = tmp_path / "s.toml"
    path.write_text('[scenario]\nnodes = 30\nchurn = 0.2\nmode = "inprocess"\nseed = 4\n')
    c = load_config(path, {"seed": 9})
    assert (c.nodes, c.churn, c.seed) == (30, 0.2, 9)
    path.write_text("nodes = [")
    with pytest.raises(ScenarioError):
        load_config(path)


def test_percentile_matches_linear_interpolation() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input
    assert percentile([1.0, 2.0, 3.0, 4.0], 25) == pytest.approx(1.75)
    with pytest.raises(ValueError):
        percentile(values, 101)
    d = distribution([1, 2, 3, 4])
    assert d["count"] == 4 and d["mean"] == 2.5 and d["min"] == 1 and d["max"] == 4
    assert distribution([])["p50"] is None


def _op(kind: str, ok: bool, t: float, dur: float = 1.0, **kw: object) -> OpResult:
    return OpResult(kind, 0, 0, t, t + dur, ok, **kw)  # type: ignore[arg-type]


def test_success_counts_add_up_and_buckets() -> None:
    results = [
        _op("lookup", True, 0.5),
        _op("lookup", False, 1.5, error="timeout: slow"),
        _op("lookup", False, 1.6, error="timeout: slow"),
        _op("lookup", False, 2.5, skipped=True, error="down: x"),
        _op("lookup", True, 9.9),
    ]
    s = success_summary(results)
    assert s["planned"] == 5 and s["skipped"] == 1 and s["attempted"] == 4
    assert s["ok"] + s["failed"] == s["attempted"]
    assert s["success_rate"] == 0.5
    assert s["errors"] == {"timeout": 2}
    rows = success_over_time(results, 0.0, 10.0, buckets=5)
    assert [(r["ok"], r["total"]) for r in rows] == [(1, 3), (0, 0), (0, 0), (0, 0), (1, 1)]
    assert rows[1]["success_rate"] is None


def test_throughput_and_network_size_rows() -> None:
    fetches = [
        _op("fetch", True, 0.0, 2.0, nbytes=2000),
        _op("fetch", True, 1.0, 1.0, nbytes=1000),  # overlaps the first
        _op("fetch", False, 5.0, 1.0),
    ]
    t = throughput(fetches)
    assert t["downloads"] == 2 and t["bytes"] == 3000
    assert t["busy_seconds"] == pytest.approx(2.0)
    assert t["aggregate_bps"] == pytest.approx(1500.0)
    assert t["per_download_bps"]["p50"] == pytest.approx(1000.0)
    probes = [
        _op("probe", True, 0, network_size=8, rpcs=3.0, hops=1.0),
        _op("probe", False, 0, network_size=8, rpcs=5.0),
        _op("probe", True, 0, network_size=16, rpcs=6.0, hops=2.0),
    ]
    rows = by_network_size(probes)
    assert [r["nodes"] for r in rows] == [8, 16]
    assert rows[0]["log2_nodes"] == 3.0 and rows[0]["rpcs_mean"] == 4.0
    assert rows[0]["success_rate"] == 0.5 and rows[0]["hops_mean"] == 1.0


def test_report_from_synthetic_measurements() -> None:
    config = ScenarioConfig(nodes=4, resources=1, dht_values=1, lookups=3)
    scenario = generate(config)
    m = Measurements(bootstrap_time=1.0, converge_time=1.5, workload_started=2.0,
                     workload_ended=10.0, total_time=11.0, rss_peak_total=400 * 2**20,
                     rss_baseline=100 * 2**20)  # fmt: skip
    m.ops += [
        _op("lookup", True, 3.0, 0.01, rpcs=4.0, hops=1.0),
        _op("lookup", False, 4.0, 5.0, error="timeout: x"),
        _op("fetch", True, 5.0, 0.5, nbytes=1000, verified=True),
        _op("probe", True, 1.2, 0.01, network_size=4, phase="converge", rpcs=2.0),
    ]
    r = build_report(scenario, m)
    assert r["lookups"]["ok"] == 1 and r["lookups"]["failed"] == 1
    assert r["lookups"]["latency"]["p50"] == pytest.approx(0.01)
    assert r["downloads"]["verified"] == 1
    assert r["memory"]["rss_per_node"] == 75 * 2**20
    assert r["figures"]["log2_nodes"] == math.log2(4)
    assert r["probes"]["by_network_size"][0]["nodes"] == 4
    table = format_table(r)
    assert "lookup latency p50" in table and "50.0%" in table
