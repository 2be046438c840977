"""Tiny simulations end to end, in each mode: the report's figures are consistent
(counts add up, every download verified against the bytes that were shared) and
a Ctrl-C stops every node it started and removes their homes.

127.0.0.1 and port 0 only; no sleeps as synchronisation (polls with deadlines).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from p2pnode.sim.report import PLOTS, REPORT_FILE
from p2pnode.sim.run import simulate
from p2pnode.sim.scenario import ScenarioConfig

ROOT = Path(__file__).resolve().parents[2]

TINY = ScenarioConfig(
    nodes=5,
    duration=3.0,
    resources=2,
    resource_size=64 * 1024,
    resource_size_max=200 * 1024,
    fetches_per_resource=2,
    dht_values=2,
    dht_gets_per_value=2,
    lookups=10,
    probe_lookups=5,
    converge_timeout=10.0,
    rpc_timeout=1.0,
    drain_timeout=20.0,
    download_timeout=15.0,
    lookup_timeout=10.0,
    dht_timeout=10.0,
)


def check_consistent(report: dict[str, Any]) -> None:
    planned = report["planned"]
    for section, kind in (
        (report["lookups"], "lookup"),
        (report["dht_values"]["put"], "put"),
        (report["dht_values"]["get"], "get"),
        (report["shares"], "share"),
        (report["downloads"], "fetch"),
    ):
        assert section["planned"] == planned[kind], kind
        assert section["skipped"] + section["attempted"] == section["planned"], kind
        assert section["ok"] + section["failed"] == section["attempted"], kind
        assert sum(section["errors"].values()) == section["failed"], kind
        assert "crash" not in section["errors"], (kind, section["errors"])
    downloads = report["downloads"]
    assert downloads["verified"] == downloads["ok"], "every download hashes to what was shared"
    ops = report["ops"]
    for op in ops:
        if op["kind"] == "fetch" and op["ok"]:
            assert op["verified"] and op["nbytes"] > 0
    assert report["churn"]["killed"] == planned["kill"]
    assert report["join"]["started_ok"] + report["join"]["join_failures"] == report["join"]["nodes"]
    assert report["figures"]["nodes"] == report["scenario"]["nodes"]


def check_files(out: Path) -> dict[str, Any]:
    report = json.loads((out / REPORT_FILE).read_text())
    for name in PLOTS.values():
        assert (out / name).stat().st_size > 1000, name
    return report


@pytest.mark.timeout(60)
async def test_inprocess_tiny_network_all_succeeds(tmp_path: Path) -> None:
    work = tmp_path / "work"
    outcome = await simulate(TINY, out=tmp_path / "out", workdir=work, progress=False)
    r = check_files(tmp_path / "out")
    assert r == json.loads(json.dumps(outcome.report, default=str))
    check_consistent(r)
    assert r["join"]["started_ok"] == 5 and r["join"]["converge_time"] is not None
    assert r["downloads"]["ok"] == r["planned"]["fetch"] > 0
    assert r["dht_values"]["get"]["ok"] == r["planned"]["get"] > 0
    assert r["lookups"]["ok"] == r["planned"]["lookup"] > 0
    assert r["lookups"]["latency"]["p50"] is not None
    assert r["nodes"]["bytes_sent_per_node"]["mean"] > 0
    assert r["memory"]["rss_per_node"] is not None
    assert not list(work.glob("n*")), "node homes are removed after the run"


@pytest.mark.timeout(60)
async def test_inprocess_churn_and_impairment_add_up(tmp_path: Path) -> None:
    config = ScenarioConfig(
        **{**TINY.to_json(), "nodes": 8, "churn": 0.5, "restart": 1.0, "downtime": 0.5,
           "downtime_max": 1.0, "duration": 4.0, "loss": 0.05, "latency_ms": 2.0},
    )  # fmt: skip
    outcome = await simulate(config, out=tmp_path / "out", progress=False)
    r = check_files(tmp_path / "out")
    check_consistent(r)
    assert r["churn"]["killed"] == 4
    assert r["churn"]["restarted"] + r["churn"]["restart_failures"] == r["planned"]["restart"]
    dropped = sum(n["dht"].get("sim.datagrams_dropped", 0) for n in r["nodes"]["per_node"])
    sent = sum(n["dht"].get("sim.datagrams_sent", 0) for n in r["nodes"]["per_node"])
    assert sent > 0 and 0 < dropped < sent * 0.2, (dropped, sent)
    assert outcome.workdir is None


@pytest.mark.timeout(90)
async def test_processes_tiny_network_with_a_kill_and_restart(tmp_path: Path) -> None:
    config = ScenarioConfig(
        **{**TINY.to_json(), "mode": "processes", "nodes": 4, "churn": 0.34, "restart": 1.0,
           "downtime": 0.2, "downtime_max": 0.5, "duration": 4.0, "lookups": 3},
    )  # fmt: skip
    outcome = await simulate(config, out=tmp_path / "out", workdir=tmp_path / "w", progress=False)
    r = check_files(tmp_path / "out")
    check_consistent(r)
    assert r["join"]["started_ok"] == 4
    assert r["churn"]["killed"] == 1
    assert r["downloads"]["attempted"] > 0 and r["downloads"]["ok"] > 0
    assert r["dht_values"]["get"]["ok"] > 0, r["dht_values"]["get"]["errors"]
    assert r["memory"]["rss_per_node"] > 10 * 2**20, "a child's peak RSS, from psutil"
    assert outcome.measurements.nodes[0].rss_peak > 0
    assert not list((tmp_path / "w").glob("n*"))


def _node_pids(work: Path) -> list[int]:
    pids = []
    for control in work.glob("n*/home/control.json"):
        try:
            pids.append(int(json.loads(control.read_text())["pid"]))
        except (OSError, ValueError, KeyError):
            continue
    return pids


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(90)
def test_ctrl_c_stops_every_child_and_removes_homes(tmp_path: Path) -> None:
    work, out = tmp_path / "w", tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "simulate.py"), "--mode", "processes",
           "--nodes", "3", "--duration", "120", "--workdir", str(work), "--out", str(out),
           "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 45
        pids: list[int] = []
        while len(pids) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "3 nodes never came up"
            time.sleep(0.05)
            pids = _node_pids(work)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr.decode()
    assert all(_gone(pid) for pid in pids), "every node process ended"
    assert not list(work.glob("n*")), "temporary homes removed"
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["run"]["interrupted"] is True
    assert b"interrupted" in stdout + stderr
    assert os.path.isdir(out)
