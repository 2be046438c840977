"""The simulation report: every figure as JSON, a terminal table and PNG plots.

``build_report`` is pure (measurements in, a JSON-able dict out);
``format_table`` renders its headline figures; ``write_report`` writes
``report.json`` and the plots (matplotlib, Agg backend) into a folder.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from p2pnode.dht.config import DhtConfig
from p2pnode.sim.scenario import Scenario, plan_placement
from p2pnode.sim.stats import (
    Measurements,
    OpResult,
    by_network_size,
    distribution,
    ratio,
    success_over_time,
    success_summary,
    throughput,
)

REPORT_FILE = "report.json"
PLOTS = {
    "lookup_latency": "lookup_latency.png",
    "hops_vs_log2n": "hops_vs_log2n.png",
    "success_over_time": "success_over_time.png",
    "throughput": "throughput.png",
}


def build_report(
    scenario: Scenario, m: Measurements, adversary: dict[str, Any] | None = None
) -> dict[str, Any]:
    config = scenario.config
    lookups = m.of("lookup", phase="workload")
    ok_lookups = [r for r in lookups if r.ok and not r.skipped]
    probes = m.of("probe")
    fetches = m.of("fetch")
    gets = m.of("get")
    start_ops = m.of("start")
    w0 = m.workload_started if m.workload_started is not None else 0.0
    # Buckets over the scheduled workload window (operations start inside it; the
    # drain after it only waits for the slow ones), about one per second, 5..30.
    w1 = w0 + config.duration
    buckets = max(5, min(30, round(config.duration)))
    n_alive_end = sum(1 for s in m.nodes if s.alive_at_end)
    bytes_sent = [s.bytes_sent for s in m.nodes]
    rss_nodes = [s.rss_peak for s in m.nodes if s.rss_peak > 0]
    if config.mode in ("inprocess", "virtual"):
        rss_per_node = (
            (m.rss_peak_total - m.rss_baseline) / config.nodes if m.rss_peak_total else None
        )
        rss_note = "in-process: (peak RSS of the simulator - RSS before any node) / nodes"
    else:
        rss_per_node = sum(rss_nodes) / len(rss_nodes) if rss_nodes else None
        rss_note = "processes: mean over children of each child's peak RSS (psutil)"
    verified = sum(1 for r in fetches if r.ok and r.verified)
    final_probe_size = max((r.network_size for r in probes), default=0)

    report: dict[str, Any] = {
        "scenario": config.to_json(),
        "scenario_digest": scenario.digest,
        "planned": {
            kind: scenario.count(kind)
            for kind in ("share", "fetch", "put", "get", "lookup", "kill", "restart")
        },
        "run": {
            "started_at": m.started_at,
            "total_time": m.total_time,
            "workload_started": m.workload_started,
            "workload_ended": m.workload_ended,
            "interrupted": m.interrupted,
            "notes": list(m.notes),
        },
        "join": {
            "nodes": config.nodes,
            "started_ok": sum(1 for r in start_ops if r.ok and r.phase == "join"),
            "join_failures": m.join_failures,
            "bootstrap_time": m.bootstrap_time,
            # Joins pause while a checkpoint probe round runs (hops vs log2 N).
            "probe_pause": m.probe_pause,
            "bootstrap_time_without_probes": (
                None if m.bootstrap_time is None else m.bootstrap_time - m.probe_pause
            ),
            "converge_time": m.converge_time,
            "converge_rounds": m.converge_rounds,
            "start_latency": distribution(r.latency for r in start_ops if r.ok),
            # Nodes that failed to start or join, by category, and the first few messages.
            "start_errors": success_summary([r for r in start_ops if r.phase == "join"])["errors"],
            "start_error_examples": [
                {"node": r.node, "error": r.error} for r in start_ops if not r.ok
            ][:10],
        },
        "lookups": {
            **success_summary(lookups),
            "latency": distribution(r.latency for r in ok_lookups),
            "rpcs_per_lookup": distribution(r.rpcs for r in lookups if r.rpcs is not None),
            "hops_per_lookup": distribution(r.hops for r in lookups if r.hops is not None),
            "rpc_source": m.rpc_source,
        },
        "probes": {
            **success_summary(probes),
            "by_network_size": by_network_size(probes),
            "final_network_size": final_probe_size,
        },
        "dht_values": {
            "put": success_summary(m.of("put")),
            "get": {
                **success_summary(gets),
                "latency": distribution(r.latency for r in gets if r.ok),
            },
        },
        "shares": success_summary(m.of("share")),
        "downloads": {
            **success_summary(fetches),
            "verified": verified,
            "latency": distribution(r.latency for r in fetches if r.ok),
            "throughput": throughput(fetches),
        },
        "churn": {
            "killed": len(m.of("kill")),
            "restarted": sum(1 for r in m.of("restart") if r.ok),
            "restart_failures": sum(1 for r in m.of("restart") if not r.ok),
            "alive_at_end": n_alive_end,
            "alive_series": [[round(t, 3), n] for t, n in m.alive],
            "success_over_time": {
                "lookup": success_over_time(lookups, w0, w1, buckets),
                "get": success_over_time(gets, w0, w1, buckets),
                "fetch": success_over_time(fetches, w0, w1, buckets),
            },
        },
        "nodes": {
            "bytes_sent_per_node": distribution(bytes_sent),
            "dht_bytes_sent_per_node": distribution(s.dht_bytes_sent for s in m.nodes),
            "net_bytes_sent_per_node": distribution(s.net_bytes_sent for s in m.nodes),
            "routing_table_size": distribution(
                s.routing_table_size for s in m.nodes if s.alive_at_end
            ),
            "rss_peak_per_child": distribution(rss_nodes),
            "per_node": [
                {
                    "index": s.index,
                    "alive_at_end": s.alive_at_end,
                    "restarts": s.restarts,
                    "bytes_sent": s.bytes_sent,
                    "bytes_received": s.bytes_received,
                    "routing_table_size": s.routing_table_size,
                    "rss_peak": s.rss_peak,
                    "dht": s.dht_stats,
                    "net": s.net_stats,
                }
                for s in m.nodes
            ],
        },
        "memory": {
            "rss_per_node": rss_per_node,
            "rss_peak_total": m.rss_peak_total,
            "rss_peak_total_per_node": (m.rss_peak_total / config.nodes) or None,
            "rss_baseline": m.rss_baseline,
            "how": rss_note,
        },
        "ops": [r.to_json() for r in m.ops],
    }
    if adversary is not None or scenario.records or scenario.count("providers"):
        report["adversarial"] = _adversarial(scenario, m, adversary)
    if config.nat:
        report["nat"] = _nat(scenario, m)
    report["figures"] = _headline(report)
    if config.mode == "virtual":
        _split_wallclock(report, m)
    return report


# Simulated figures are a pure function of the settings and the seed in virtual mode;
# what the run cost on this machine is not, so it lives apart, under "wallclock".
def _split_wallclock(report: dict[str, Any], m: Measurements) -> None:
    memory = report.pop("memory")
    wall: dict[str, Any] = {
        "started_at": report["run"].pop("started_at"),
        **m.wall,
        "rss_peak": memory["rss_peak_total"],
        "rss_baseline": memory["rss_baseline"],
        "rss_per_node": memory["rss_per_node"],
        "how": "peak RSS of the simulator (psutil, sampled), minus RSS before any node, / nodes",
    }
    report["figures"].pop("rss_per_node_bytes", None)
    report["nodes"].pop("rss_peak_per_child", None)
    for row in report["nodes"]["per_node"]:
        row.pop("rss_peak", None)
    report["wallclock"] = wall


def _count_errors(results: Sequence[OpResult], category: str) -> int:
    return sum(1 for r in results if not r.skipped and r.error.split(":", 1)[0] == category)


def _adversarial(
    scenario: Scenario, m: Measurements, adversary: dict[str, Any] | None
) -> dict[str, Any]:
    """Success of honest requesters (every workload actor is honest) against the
    Sybils: peer lookups, signed-record gets, provider lookups; forged answers
    accepted, by kind."""
    config = scenario.config
    lookups = m.of("lookup", phase="workload")
    record_gets = m.of("get_record")
    providers = m.of("providers")
    gets = m.of("get")
    return {
        "fraction": config.adversarial,
        "adversaries": len(scenario.adversaries),
        # The setting to compare with S/Kademlia's (k, disjoint paths d).
        "dht": {
            "k": DhtConfig().ksize,
            "alpha": DhtConfig().alpha,
            "lookup_paths": getattr(DhtConfig(), "lookup_paths", 1),
        },
        "honest_nodes": config.nodes - len(scenario.adversaries),
        "success": {
            "lookup": success_summary(lookups)["success_rate"],
            "record_get": success_summary(record_gets)["success_rate"],
            "provider_lookup": success_summary(providers)["success_rate"],
            "value_get": success_summary(gets)["success_rate"],
            "download": success_summary(m.of("fetch"))["success_rate"],
        },
        "record_puts": success_summary(m.of("put_record")),
        "record_gets": success_summary(record_gets),
        "provider_lookups": success_summary(providers),
        "forged_accepted": {
            "values": _count_errors(gets, "forged"),
            "records": _count_errors(record_gets, "forged"),
            "stale_records": _count_errors(record_gets, "stale"),
        },
        "lookups_impersonated": _count_errors(lookups, "impersonated"),
        "routing_tables": _sybil_share(scenario, m),
        "provider_lookups_only_fake": _count_errors(providers, "only-fake"),
        "adversary": adversary,
    }


def _nat(scenario: Scenario, m: Measurements) -> dict[str, Any]:
    """--nat: where the nodes sat, and downloads by (sharer's, downloader's)
    placement: the connectivity matrix of the run."""
    placement = plan_placement(scenario.config)
    sharer = {op.arg: op.node for op in scenario.ops if op.kind == "share"}
    pairs: dict[str, list[OpResult]] = {}
    for r in m.of("fetch"):
        if r.arg in sharer:
            key = f"{placement[sharer[r.arg]]} -> {placement[r.node]}"
            pairs.setdefault(key, []).append(r)
    return {
        "placement": dict(sorted(Counter(placement).items())),
        "downloads": {key: success_summary(rs) for key, rs in sorted(pairs.items())},
    }


def _sybil_share(scenario: Scenario, m: Measurements) -> dict[str, Any]:
    """How much of the honest nodes' routing tables the Sybils hold at the end."""
    honest = [
        s
        for s in m.nodes
        # (a restarted node's counters add up over its lives: left out)
        if s.alive_at_end
        and not s.restarts
        and s.index not in scenario.adversaries
        and s.routing_table_size
    ]
    shares = [int(s.dht_stats.get("contacts_sybil", 0)) / s.routing_table_size for s in honest]
    return {
        "sybil_share": distribution(shares),
        "contacts": sum(s.routing_table_size for s in honest),
        "sybil_contacts": sum(int(s.dht_stats.get("contacts_sybil", 0)) for s in honest),
    }


def simulated_part(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its wall-clock section: identical for one seed (virtual)."""
    return {k: v for k, v in report.items() if k != "wallclock"}


def _headline(r: dict[str, Any]) -> dict[str, Any]:
    lat = r["lookups"]["latency"]
    tp = r["downloads"]["throughput"]
    return {
        "nodes": r["join"]["nodes"],
        "mode": r["scenario"]["mode"],
        "bootstrap_time_s": r["join"]["bootstrap_time"],
        "converge_time_s": r["join"]["converge_time"],
        "lookup_success_rate": r["lookups"]["success_rate"],
        "lookup_success_rate_source_up": r["lookups"]["success_rate_actor_up"],
        "lookup_latency_p50_s": lat["p50"],
        "lookup_latency_p95_s": lat["p95"],
        "lookup_latency_p99_s": lat["p99"],
        "rpcs_per_lookup_mean": r["lookups"]["rpcs_per_lookup"]["mean"],
        "hops_per_lookup_mean": r["lookups"]["hops_per_lookup"]["mean"],
        "log2_nodes": math.log2(r["join"]["nodes"]) if r["join"]["nodes"] else None,
        "probe_success_rate": r["probes"]["success_rate"],
        "dht_get_success_rate": r["dht_values"]["get"]["success_rate"],
        "download_success_rate": r["downloads"]["success_rate"],
        "downloads_verified": r["downloads"]["verified"],
        "download_throughput_p50_Bps": tp["per_download_bps"]["p50"],
        "download_throughput_aggregate_Bps": tp["aggregate_bps"],
        "bytes_sent_per_node_mean": r["nodes"]["bytes_sent_per_node"]["mean"],
        "rss_per_node_bytes": r["memory"]["rss_per_node"],
        "killed": r["churn"]["killed"],
        "restarted": r["churn"]["restarted"],
        **_adversarial_headline(r.get("adversarial")),
    }


def _adversarial_headline(a: dict[str, Any] | None) -> dict[str, Any]:
    if a is None:
        return {}
    return {
        "adversarial_fraction": a["fraction"],
        "record_get_success_rate": a["success"]["record_get"],
        "provider_lookup_success_rate": a["success"]["provider_lookup"],
        "forged_values_accepted": a["forged_accepted"]["values"],
        "forged_records_accepted": a["forged_accepted"]["records"]
        + a["forged_accepted"]["stale_records"],
    }


# ---------------------------------------------------------------------------- terminal


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def _fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _fmt_bytes(v: float | None) -> str:
    if v is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"  # pragma: no cover


def _fmt_num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _count(summary: dict[str, Any]) -> str:
    s = f"{summary['ok']}/{summary['attempted']} ({_fmt_pct(summary['success_rate'])}"
    if summary["actor_killed"]:
        s += f"; {_fmt_pct(summary['success_rate_actor_up'])} if its node stayed up"
    s += ")"
    if summary["skipped"]:
        s += f", {summary['skipped']} skipped"
    return s


def format_table(r: dict[str, Any]) -> str:
    lat = r["lookups"]["latency"]
    tp = r["downloads"]["throughput"]
    churn = r["churn"]
    rows: list[tuple[str, str]] = [
        (
            "mode / nodes / seed",
            f"{r['scenario']['mode']} / {r['join']['nodes']} / {r['scenario']['seed']}",
        ),
        (
            "nodes started",
            f"{r['join']['started_ok']} ({r['join']['join_failures']} failed"
            + "".join(f"; {n} {k}" for k, n in r["join"].get("start_errors", {}).items())
            + ")",
        ),
        (
            "time to bootstrap (all joined)",
            _fmt_s(r["join"]["bootstrap_time"])
            + f" ({_fmt_s(r['join']['probe_pause'])} of it in checkpoint probes)",
        ),
        (
            "time to converge (probe round 100%)",
            _fmt_s(r["join"]["converge_time"]) + f" ({r['join']['converge_rounds']} round(s))",
        ),
        ("lookups ok", _count(r["lookups"])),
        (
            "lookup latency p50 / p95 / p99",
            f"{_fmt_s(lat['p50'])} / {_fmt_s(lat['p95'])} / {_fmt_s(lat['p99'])}",
        ),
        (
            "RPCs per lookup (mean / p95)",
            f"{_fmt_num(r['lookups']['rpcs_per_lookup']['mean'])} / "
            f"{_fmt_num(r['lookups']['rpcs_per_lookup']['p95'])}",
        ),
        (
            "hops per lookup (mean) vs log2(N)",
            f"{_fmt_num(r['lookups']['hops_per_lookup']['mean'])} vs "
            f"{_fmt_num(r['figures']['log2_nodes'])}",
        ),
        ("probe lookups ok", _count(r["probes"])),
        ("DHT puts ok", _count(r["dht_values"]["put"])),
        ("DHT gets ok", _count(r["dht_values"]["get"])),
        ("shares ok", _count(r["shares"])),
        ("downloads ok", _count(r["downloads"]) + f", {r['downloads']['verified']} verified"),
        (
            "download throughput p50 / aggregate",
            f"{_fmt_bytes(tp['per_download_bps']['p50'])}/s / {_fmt_bytes(tp['aggregate_bps'])}/s",
        ),
        (
            "bytes sent per node (mean / max)",
            f"{_fmt_bytes(r['nodes']['bytes_sent_per_node']['mean'])} / "
            f"{_fmt_bytes(r['nodes']['bytes_sent_per_node']['max'])}",
        ),
        ("peak RSS per node", _fmt_bytes((r.get("memory") or r["wallclock"])["rss_per_node"])),
        (
            "churn: killed / restarted / alive at end",
            f"{churn['killed']} / {churn['restarted']} / {churn['alive_at_end']}",
        ),
        ("total time", _fmt_s(r["run"]["total_time"])),
    ]
    adv = r.get("adversarial")
    if adv is not None:
        rows[-1:-1] = _adversarial_rows(adv)
    nat = r.get("nat")
    if nat is not None:
        placed = ", ".join(f"{kind} {n}" for kind, n in nat["placement"].items())
        rows[-1:-1] = [("placement (lab)", placed)] + [
            (f"downloads {pair}", _count(summary)) for pair, summary in nat["downloads"].items()
        ]
    wall = r.get("wallclock")
    if wall is not None:
        rows[-1] = ("total time (simulated)", _fmt_s(r["run"]["total_time"]))
        rows.append(
            (
                "wall time / peak RSS / events per s",
                f"{_fmt_s(wall.get('wall_time'))} / {_fmt_bytes(wall.get('rss_peak'))} / "
                f"{_fmt_num(wall.get('events_per_second'), 0)}",
            )
        )
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    if r["run"]["interrupted"]:
        lines.append("(interrupted: partial figures)")
    for note in r["run"]["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _adversarial_rows(a: dict[str, Any]) -> list[tuple[str, str]]:
    forged = a["forged_accepted"]
    rows = [
        (
            "adversarial nodes (Sybils)",
            f"{a['adversaries']} of {a['adversaries'] + a['honest_nodes']} "
            f"({_fmt_pct(a['fraction'])})",
        ),
        ("signed-record puts ok", _count(a["record_puts"])),
        ("signed-record gets ok", _count(a["record_gets"])),
        ("provider lookups ok (an honest one)", _count(a["provider_lookups"])),
        (
            "forged accepted: values / records / stale",
            f"{forged['values']} / {forged['records']} / {forged['stale_records']}",
        ),
        ("lookups answered by an impostor", str(a["lookups_impersonated"])),
        (
            "Sybils in honest routing tables (mean)",
            _fmt_pct(a.get("routing_tables", {}).get("sybil_share", {}).get("mean")),
        ),
    ]
    adversary = a.get("adversary")
    if adversary:
        acts = adversary["actions"]
        grinding = adversary["grinding"]
        bits = grinding.get("prefix_bits", {})
        rows.append(
            (
                "Sybil ids: tries / prefix bits mean",
                f"{grinding.get('tries', 0)} / {_fmt_num(bits.get('mean'))}",
            )
        )
        rows.append(
            (
                "Sybils sent: forged / stale / fake providers",
                f"{acts.get('forged_values_sent', 0) + acts.get('forged_records_sent', 0)} / "
                f"{acts.get('stale_records_sent', 0)} / "
                f"{acts.get('fake_provider_records_sent', 0)}",
            )
        )
    return rows


# ---------------------------------------------------------------------------- files


def write_report(report: dict[str, Any], out: Path, m: Measurements) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_FILE
    path.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    return [path, *write_plots(report, out, m)]


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_plots(report: dict[str, Any], out: Path, m: Measurements) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, draw in (
        ("lookup_latency", _plot_latency),
        ("hops_vs_log2n", _plot_hops),
        ("success_over_time", _plot_success),
        ("throughput", _plot_throughput),
    ):
        fig = plt.figure(figsize=(8, 5))
        try:
            draw(fig, report, m)
            fig.tight_layout(rect=(0, 0.03, 1, 1))
            path = out / PLOTS[name]
            fig.savefig(path, dpi=100)
            written.append(path)
        finally:
            plt.close(fig)
    return written


def _title(report: dict[str, Any], what: str) -> str:
    s = report["scenario"]
    return f"{what} — {s['mode']}, {s['nodes']} nodes, churn {s['churn']:.0%}, seed {s['seed']}"


def _plot_latency(fig: Any, report: dict[str, Any], m: Measurements) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    work = [r.latency * 1000 for r in m.of("lookup") if r.ok and not r.skipped]
    probe = [r.latency * 1000 for r in m.of("probe") if r.ok]
    if work or probe:
        ax1.hist(
            [x for x in (work, probe) if x],
            bins=40,
            label=[lbl for lbl, x in (("workload", work), ("probes", probe)) if x],
        )
    lat = report["lookups"]["latency"]
    for q, style in (("p50", "--"), ("p95", "-."), ("p99", ":")):
        if lat[q] is not None:
            # Values in the legend, not as text by the lines: close percentiles
            # (all ~0 ms in virtual mode) would print on top of each other.
            ms = lat[q] * 1000
            ax1.axvline(ms, color="k", linestyle=style, label=f"{q} = {ms:.1f} ms")
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=8)
    ax1.set_xlabel("lookup latency (ms)")
    ax1.set_ylabel("lookups")
    plotted = False
    for series, label in ((work, "workload"), (probe, "probes")):
        xs = sorted(x for x in series if x > 0)  # log axis; virtual mode has 0 ms lookups
        if xs:
            ax2.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
            plotted = True
    if plotted:
        ax2.set_xscale("log")
        ax2.legend()
    elif work or probe:
        ax2.text(
            0.5,
            0.5,
            "every lookup took 0 ms\n(answered from the routing table)",
            transform=ax2.transAxes,
            ha="center",
        )
    ax2.set_xlabel("lookup latency (ms, log)")
    ax2.set_ylabel("CDF (successful lookups)")
    ax2.grid(True, alpha=0.3)
    fig.suptitle(_title(report, "Lookup latency"))


def _plot_hops(fig: Any, report: dict[str, Any], m: Measurements) -> None:
    ax = fig.subplots()
    rows = [r for r in report["probes"]["by_network_size"] if r["nodes"] > 1]
    xs = [r["log2_nodes"] for r in rows]
    rpcs = [r["rpcs_mean"] for r in rows]
    hops = [r["hops_mean"] for r in rows]
    if any(v is not None for v in rpcs):
        ax.plot(
            [x for x, v in zip(xs, rpcs, strict=True) if v is not None],
            [v for v in rpcs if v is not None],
            "o-",
            label="RPCs per lookup (mean)",
        )
    if any(v is not None for v in hops):
        ax.plot(
            [x for x, v in zip(xs, hops, strict=True) if v is not None],
            [v for v in hops if v is not None],
            "s-",
            label="hops per lookup (mean)",
        )
    if xs:
        ax.plot(xs, xs, "k--", alpha=0.5, label="log2(N)")
        # Up to k nodes, every node holds every other in its routing table, so a
        # find_peer answers from the table: 0 hops, 0 RPCs. Mark where that ends.
        k = DhtConfig().ksize
        ax.axvline(math.log2(k), color="grey", linestyle=":", label=f"N = k = {k}")
        if max(xs) <= math.log2(k):
            ax.text(
                0.5,
                0.5,
                f"N <= k = {k}: every node knows every other,\n"
                "so lookups answer from the routing table (0 hops)",
                transform=ax.transAxes,
                ha="center",
                fontsize=9,
            )
    ax.set_xlabel("log2(N), N = nodes in the network")
    ax.set_ylabel("per lookup")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.set_title(_title(report, "Lookup cost vs network size"), fontsize=10)
    fig.text(
        0.01,
        0.01,
        "RPCs: find_node requests the source sent during find_peer (stats delta).\n"
        "Hops: answers on the path to the target; 0 = already in the routing table "
        "(always, while N <= k).",
        fontsize=7,
    )


def _plot_success(fig: Any, report: dict[str, Any], m: Measurements) -> None:
    ax = fig.subplots()
    series = report["churn"]["success_over_time"]
    for kind, style in (("lookup", "o-"), ("get", "s-"), ("fetch", "^-")):
        rows = [r for r in series[kind] if r["success_rate"] is not None]
        if rows:
            ax.plot(
                [(r["t0"] + r["t1"]) / 2 for r in rows],
                [100 * r["success_rate"] for r in rows],
                style,
                label=f"{kind} success %",
            )
    ax.set_ylim(0, 105)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("success rate (%)")
    ax.grid(True, alpha=0.3)
    alive = m.alive
    if alive:
        ax2 = ax.twinx()
        ts = [t for t, _ in alive] + [m.total_time]
        ns = [n for _, n in alive] + [alive[-1][1]]
        ax2.step(ts, ns, where="post", color="grey", alpha=0.6, label="nodes running")
        ax2.set_ylabel("nodes running")
        ax2.set_ylim(0, max(ns) * 1.1 + 1)
        ax2.legend(loc="lower right")
    if m.workload_started is not None:
        ax.axvline(m.workload_started, color="k", linestyle=":", alpha=0.5)
        # Operations start inside the workload window; after it only stragglers finish.
        ax.set_xlim(0, m.workload_started + 1.1 * max(report["scenario"]["duration"], 1.0))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left")
    ax.set_title(_title(report, "Success over time"), fontsize=10)


def _plot_throughput(fig: Any, report: dict[str, Any], m: Measurements) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    fetches: Sequence[OpResult] = m.of("fetch")
    ok = [r for r in fetches if r.ok and r.latency > 0]
    bad = [r for r in fetches if not r.ok and not r.skipped]
    if ok:
        ax1.scatter(
            [r.started for r in ok],
            [r.nbytes / r.latency / 2**20 for r in ok],
            label="verified download",
            s=14,
        )
    if bad:
        ax1.scatter(
            [r.started for r in bad],
            [0.0] * len(bad),
            marker="x",
            color="red",
            label="failed download",
        )
    ax1.set_xlabel("start (s since run start)")
    ax1.set_ylabel("throughput (MiB/s)")
    ax1.grid(True, alpha=0.3)
    if ok or bad:
        ax1.legend()
    if ok:
        ax2.scatter([r.nbytes / 2**10 for r in ok], [r.latency for r in ok], s=14)
    ax2.set_xlabel("resource size (KiB)")
    ax2.set_ylabel("download time (s)")
    ax2.grid(True, alpha=0.3)
    tp = report["downloads"]["throughput"]
    agg = tp["aggregate_bps"]
    fig.suptitle(
        _title(report, "Transfers") + (f"\naggregate {agg / 2**20:.1f} MiB/s" if agg else ""),
        fontsize=10,
    )


def success_rate_text(ok: int, total: int) -> str:
    return _fmt_pct(ratio(ok, total))
