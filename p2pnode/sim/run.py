"""Run one simulation end to end: plan, nodes, workload, report, clean-up.

Ctrl-C (or SIGTERM) once: the run stops where it is, every node is stopped, the
temporary homes are removed (unless ``keep``) and a partial report is written.
Twice: every child process is SIGKILLed and the simulator exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pnode.sim import vloop
from p2pnode.sim.engine import Cluster, Simulation
from p2pnode.sim.report import build_report, format_table, write_report
from p2pnode.sim.scenario import Scenario, ScenarioConfig, ScenarioError, generate
from p2pnode.sim.stats import Measurements
from p2pnode.sim.vloop import VirtualTimeLoop

log = logging.getLogger(__name__)
EXIT_INTERRUPTED = 130


@dataclass
class Outcome:
    report: dict[str, Any]
    measurements: Measurements
    files: list[Path] = field(default_factory=list)
    workdir: Path | None = None  # kept homes, when keep=True

    @property
    def interrupted(self) -> bool:
        return bool(self.report["run"]["interrupted"])


def make_cluster(
    config: ScenarioConfig, workdir: Path, scenario: Scenario | None = None
) -> Cluster:
    if config.mode == "processes":
        from p2pnode.sim.processes import ProcessCluster

        return ProcessCluster(workdir, config)
    if config.mode == "virtual":
        from p2pnode.sim.virtual import VirtualCluster

        return VirtualCluster(workdir, config, scenario)
    from p2pnode.sim.inprocess import InprocessCluster

    return InprocessCluster(workdir, config)


async def simulate(
    config: ScenarioConfig,
    *,
    out: Path | None = None,
    workdir: Path | None = None,
    keep: bool = False,
    progress: bool = True,
    handle_signals: bool = False,
) -> Outcome:
    """Run ``config``; write the report into ``out`` (if given)."""
    scenario = generate(config)
    own_workdir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="p2pnode-sim-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    cluster = make_cluster(config, work, scenario)
    sim = Simulation(scenario, cluster, progress=progress)
    loop = asyncio.get_running_loop()
    if config.mode == "virtual" and not isinstance(loop, VirtualTimeLoop):
        raise ScenarioError("virtual mode runs under a VirtualTimeLoop: use run_simulation()")
    if isinstance(loop, VirtualTimeLoop):
        wall0, events0, jumps0 = loop.wall_time(), loop.events, loop.jumps
        cpu0 = time.process_time()
    run_task = asyncio.create_task(sim.run(), name="sim-run")
    interrupts = 0

    def on_signal() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            sys.stderr.write("\ninterrupted: stopping every node (Ctrl-C again to kill)\n")
            run_task.cancel()
        else:
            cluster.kill_now()
            if not keep:
                _remove_homes(work, cluster, own_workdir)
            os._exit(EXIT_INTERRUPTED)

    installed = []
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal)
                installed.append(sig)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await run_task
    finally:
        if not run_task.done():
            run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run_task
        await asyncio.shield(sim.close())
        for sig in installed:
            loop.remove_signal_handler(sig)
        if not keep:
            if isinstance(loop, VirtualTimeLoop):  # no thread under virtual time
                _remove_homes(work, cluster, own_workdir)
            else:
                await asyncio.to_thread(_remove_homes, work, cluster, own_workdir)
    m = sim.m
    if isinstance(loop, VirtualTimeLoop):
        wall = loop.wall_time() - wall0
        m.wall = {
            "wall_time": wall,
            # CPU time of this process: the cost, whatever else the machine was running.
            "cpu_time": time.process_time() - cpu0,
            "events": loop.events - events0,
            "events_per_second": (loop.events - events0) / wall if wall > 0 else None,
            "clock_jumps": loop.jumps - jumps0,
            "simulated_time": m.total_time,
            "network": cluster.net.stats.to_json() if hasattr(cluster, "net") else {},
        }
        adversary_wall = getattr(cluster, "adversary_wallclock", lambda: None)()
        if adversary_wall:
            m.wall["adversary"] = adversary_wall
    if getattr(cluster, "hook_missing", False):
        m.notes.append("loss/latency requested but the DHT transport hook was not found")
    if config.mode == "processes" and (config.loss or config.latency_ms or config.jitter_ms):
        m.notes.append("loss/latency/jitter apply to in-process and virtual modes; ignored here")
    report = build_report(
        scenario, m, adversary=getattr(cluster, "adversary_report", lambda: None)()
    )
    files = write_report(report, out, m) if out is not None else []
    return Outcome(report, m, files, work if keep else None)


def run_simulation(config: ScenarioConfig, **kwargs: Any) -> Outcome:
    """Run ``simulate`` on the loop its mode needs (virtual time for virtual mode)."""
    if config.mode == "virtual":
        return vloop.run(lambda: simulate(config, **kwargs))
    return asyncio.run(simulate(config, **kwargs))


def _remove_homes(work: Path, cluster: Cluster, own_workdir: bool) -> None:
    """Remove what the run created: the whole folder if it made it, else the nodes' own."""
    if own_workdir:
        shutil.rmtree(work, ignore_errors=True)
        return
    for node in list(cluster.nodes.values()):
        shutil.rmtree(node.workdir, ignore_errors=True)


def configure_logging(path: Path | None, level: str = "WARNING") -> None:
    """Node logs go to a file, not the terminal (the progress line lives there)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if path is None:
        root.addHandler(logging.NullHandler())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def print_summary(outcome: Outcome, out: Path | None) -> None:
    print(format_table(outcome.report))
    if outcome.files:
        print(f"report: {', '.join(str(p) for p in outcome.files)}")
    if outcome.workdir is not None:
        print(f"homes kept in {outcome.workdir}")
