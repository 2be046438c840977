"""``--mode virtual`` end to end: every workload runs, the figures add up, and the
simulated part of the report is a pure function of the seed (byte for byte)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from p2pnode.sim.report import simulated_part
from p2pnode.sim.run import run_simulation
from p2pnode.sim.scenario import ScenarioConfig
from p2pnode.sim.virtual import VirtualNode
from tests.integration.test_sim_smoke import TINY, check_consistent, check_files

SMALL = dataclasses.replace(
    TINY,
    mode="virtual",
    nodes=24,
    duration=20.0,
    churn=0.3,
    restart=0.6,
    downtime=2.0,
    downtime_max=5.0,
    jitter_ms=15.0,
    loss=0.02,
)


def _run(config: ScenarioConfig, out: Path | None = None) -> dict[str, Any]:
    return run_simulation(config, out=out, progress=False).report


def _bytes(report: dict[str, Any]) -> bytes:
    return json.dumps(simulated_part(report), sort_keys=True).encode()


def test_virtual_run_is_consistent_and_writes_its_report(tmp_path: Path) -> None:
    report = _run(SMALL, tmp_path)
    check_consistent(report)
    assert check_files(tmp_path)["scenario"]["mode"] == "virtual"
    assert report["join"]["join_failures"] == 0
    assert report["downloads"]["verified"] >= 1
    assert report["lookups"]["ok"] >= 0.8 * report["lookups"]["attempted"]
    assert report["dht_values"]["get"]["ok"] >= 1
    assert report["churn"]["killed"] == report["planned"]["kill"] > 0
    assert report["churn"]["restarted"] >= 1
    wall = report["wallclock"]
    assert wall["events"] > 0 and wall["wall_time"] > 0 and wall["rss_peak"] > 0
    assert "memory" not in report and "started_at" not in report["run"]


def test_same_seed_same_simulated_report_other_seed_another() -> None:
    first = _bytes(_run(SMALL))
    assert first == _bytes(_run(SMALL))
    assert first != _bytes(_run(dataclasses.replace(SMALL, seed=SMALL.seed + 1)))


def test_a_node_that_fails_to_start_is_counted_and_the_run_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start = VirtualNode.start

    async def failing(self: VirtualNode, bootstrap: list[tuple[str, int]], port: int = 0) -> None:
        if self.index == 3:  # as the control API's listener did when fds ran out
            raise IndexError("list index out of range")
        await start(self, bootstrap, port)

    monkeypatch.setattr(VirtualNode, "start", failing)
    report = _run(dataclasses.replace(SMALL, nodes=8, churn=0.0, duration=3.0))
    assert report["join"]["started_ok"] == 7
    assert report["join"]["join_failures"] == 1
    assert report["join"]["start_errors"] == {"crash": 1}
    assert "IndexError" in report["join"]["start_error_examples"][0]["error"]
