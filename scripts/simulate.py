#!/usr/bin/env python3
"""A local multi-node p2pnode network, a workload and a report.

    python scripts/simulate.py                                   # ~20 nodes, under a minute
    python scripts/simulate.py --nodes 200 --mode inprocess --churn 0.3 --seed 7 --out report/
    python scripts/simulate.py --nodes 20 --mode processes       # real `p2pnode start` children
    python scripts/simulate.py --nodes 10000 --mode virtual      # in-memory network, virtual time
    sudo python scripts/simulate.py --nodes 20 --mode processes --nat eim=0.3,symmetric=0.2
    python scripts/simulate.py --config scenario.toml --seed 3   # flags override the file

Every scenario setting is a flag (``--join-rate``, ``--lookups``, ...; see --help)
and a key of the TOML file (top level or a [scenario] table). The run is a pure
function of the settings and --seed. The report goes to --out (report.json and
PNG plots) and a summary table to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pnode.sim.report import format_table
from p2pnode.sim.run import EXIT_INTERRUPTED, configure_logging, print_summary, run_simulation
from p2pnode.sim.scenario import (
    MODES,
    OPTIONAL_INTS,
    ScenarioConfig,
    ScenarioError,
    config_from_mapping,
    load_config,
)
from p2pnode.sim.vloop import VirtualTimeDeadlock

HELP = {
    "nodes": "number of nodes",
    "mode": "inprocess: Node objects in one event loop; processes: `p2pnode start` children; "
    "virtual: DHT + peer hosts over an in-memory network in virtual time (deterministic)",
    "seed": "random seed: same seed and settings, same scenario",
    "seeds": "bootstrap (seed) nodes",
    "bootstrap_per_node": "seed addresses given to each joining node",
    "join_rate": "nodes started per second (0: as fast as --join-concurrency allows)",
    "churn": "fraction of non-seed nodes killed abruptly during the workload",
    "restart": "fraction of the killed nodes restarted after a downtime",
    "loss": "datagram loss probability (in-process: DHT only; virtual: every datagram)",
    "latency_ms": "one-way delay in ms (in-process: DHT datagrams only, default 0; "
    "virtual: every packet, default 20)",
    "jitter_ms": "extra one-way delay, uniform 0..jitter ms",
    "bandwidth_mbit": "virtual mode: each host's uplink in Mbit/s (0 = unlimited)",
    "duration": "workload phase length in seconds",
    "control_api": "in-process: run each node's control API (if NodeConfig can turn it off)",
    "adversarial": "virtual mode: fraction 0..0.5 of the nodes that are colluding Sybils "
    "(ids ground next to the workload's keys; eclipse, forge, spam providers, drop stores)",
    "dht_records": "signed records put (first, then latest version) and got (default: "
    "10 with --adversarial, else 0)",
    "provider_lookups_per_resource": "find_providers per resource by non-holders (default: "
    "3 with --adversarial, else 0)",
    "adv_grind_tries": "Ed25519 keys tried in all to place Sybil ids next to target keys",
    "adv_cluster": "grind Sybil ids next to the workload's keys (false: random ids, "
    "S/Kademlia's adversary model)",
    "nat": "processes mode, as root: place non-seed nodes behind home routers in a "
    "network-namespace lab, e.g. eim=0.3,symmetric=0.2,firewall=0.1 (the rest public); "
    "the report shows downloads by (sharer, downloader) placement",
    "adv_hosts": "IP addresses the Sybils share, each in its own /24 (1: one cheap host, "
    "Sybils on successive ports); 0: each Sybil its own address",
}


def _flag_type(f: dataclasses.Field[Any]) -> Any:
    if f.name in ("rpc_timeout", "latency_ms"):
        return float
    if f.name in OPTIONAL_INTS:
        return int
    default = f.default
    if isinstance(default, bool):
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Simulate a local p2pnode network and report on it.",
    )
    parser.add_argument("--config", type=Path, help="scenario TOML file (flags override it)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("sim-report"),
        help="folder for report.json, the plots and sim.log (default sim-report)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="folder for the node homes (default: a temporary one)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the node homes (and their logs) after the run"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="level of the nodes' lines in <out>/sim.log (the simulator's own, at INFO, "
        "are always there)",
    )
    group = parser.add_argument_group("scenario (also settable in --config)")
    defaults = ScenarioConfig()
    for f in dataclasses.fields(ScenarioConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {
            "dest": f"scenario_{f.name}",
            "metavar": f.name.upper() if f.name != "mode" else None,
            "default": None,
            "type": _flag_type(f),
            "help": HELP.get(f.name, f.name.replace("_", " "))
            + f" (default {getattr(defaults, f.name)})",
        }
        if f.name == "mode":
            kwargs["choices"] = MODES
        group.add_argument(flag, **kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {
        key.removeprefix("scenario_"): value
        for key, value in vars(args).items()
        if key.startswith("scenario_") and value is not None
    }
    try:
        if args.config is not None:
            config = load_config(args.config, overrides)
        else:
            config = config_from_mapping(overrides)
    except ScenarioError as exc:
        parser.error(str(exc))
    if config.mode == "virtual" and os.environ.get("PYTHONHASHSEED") != "0":
        # Same seed, same run: str/bytes hashing (set order) must not vary per process.
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"}
        )
    configure_logging(args.out / "sim.log", args.log_level)
    # The simulator's own lines (scenario, phases, outcome) at INFO whatever the
    # nodes' level: a quiet run used to leave sim.log empty.
    simlog = logging.getLogger("p2pnode.sim")
    simlog.setLevel(min(logging.INFO, logging.getLevelName(args.log_level)))
    simlog.info("scenario: %s", json.dumps(dataclasses.asdict(config), default=str))
    simlog.info("node log lines at %s and above", args.log_level)
    try:
        outcome = run_simulation(
            config,
            out=args.out,
            workdir=args.workdir,
            keep=args.keep,
            progress=not args.quiet,
            handle_signals=True,
        )
    except VirtualTimeDeadlock as exc:
        print(f"simulate.py: {exc}", file=sys.stderr)
        return 1
    print_summary(outcome, args.out)
    simlog.info(
        "%s; report: %s",
        "interrupted" if outcome.interrupted else "done",
        ", ".join(str(p) for p in outcome.files) or "none",
    )
    simlog.info("summary:\n%s", format_table(outcome.report))
    return EXIT_INTERRUPTED if outcome.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
