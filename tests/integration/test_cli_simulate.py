"""scripts/simulate.py as a user runs it: a tiny virtual network, its outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no display needed

from p2pnode.sim import report as sim_report
from p2pnode.sim.stats import Measurements

ROOT = Path(__file__).resolve().parents[2]


def test_simulate_writes_a_log_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate.py"), "--nodes", "8",
         "--mode", "virtual", "--duration", "5", "--lookups", "10", "--seed", "1",
         "--quiet", "--out", str(out)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    log = (out / "sim.log").read_text()
    # Not empty at the default (WARNING) level: the simulator's own lines are there.
    assert "scenario: " in log and "done; report: " in log and "summary:" in log, log
    for name in sim_report.PLOTS.values():
        assert (out / name).stat().st_size > 0


def test_percentile_labels_do_not_overlap_and_small_networks_are_explained() -> None:
    report = {
        "scenario": {"mode": "virtual", "nodes": 8, "churn": 0.0, "seed": 1},
        "lookups": {"latency": {"p50": 0.0, "p95": 0.0, "p99": 0.0001}},
        "probes": {"by_network_size": [
            {"nodes": 8, "log2_nodes": 3.0, "rpcs_mean": 0.0, "hops_mean": 0.0}
        ]},
    }  # fmt: skip
    fig = Figure()
    sim_report._plot_latency(fig, report, Measurements())
    ax = fig.axes[0]
    # The percentiles are named in the legend, not as text drawn at the lines.
    assert not ax.texts
    legend = ax.get_legend()
    assert legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["p50 = 0.0 ms", "p95 = 0.0 ms", "p99 = 0.1 ms"]

    fig = Figure()
    sim_report._plot_hops(fig, report, Measurements())
    shown = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "every node knows every other" in shown
