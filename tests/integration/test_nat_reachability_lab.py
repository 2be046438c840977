"""Reachability through the network-namespace lab (p2pnode/sim/netlab.py), real
``p2pnode start`` processes: public nodes find themselves public; nodes behind an
eim, a symmetric and a firewall router find themselves private over TCP and UDP
(AutoNAT dial-backs), become DHT clients (gone from the public nodes' routing
tables) and still get their provider records stored and found. Every wait is a
poll with a deadline; times to verdict are printed (pytest -s)."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from p2pnode.sim.netlab import Lab, Node
from tests.cli_helpers import CLI, cli_env, poll
from tests.conftest import needs_lab
from tests.integration.test_nat_lab import cli_in

pytestmark = needs_lab


def spawn_node(lab: Lab, node: Node, home: Path, *extra: str) -> subprocess.Popen[str]:
    argv = [*CLI, "start", "--home", str(home), "--port", "0", *extra]
    return lab.spawn(node, argv, env=cli_env())


def read_banner(proc: subprocess.Popen[str]) -> list[str]:
    """Its start-up lines up to "ready" (bounded: it prints "ready" or exits)."""
    assert proc.stdout is not None
    banner: list[str] = []
    for line in proc.stdout:
        banner.append(line.rstrip())
        if line.strip() == "ready":
            return banner
    raise AssertionError(f"node did not start: {banner}")


def read_line_with(proc: subprocess.Popen[str], text: str, timeout: float) -> str:
    """The next line of its output containing ``text``, waiting at most ``timeout``
    (a reader thread: select() cannot see lines already in the file's buffer; the
    thread ends at EOF, when the lab kills the process)."""
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in stdout], daemon=True).start()
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if text in line:
            return line.strip()
    raise AssertionError(f"no line with {text!r} within {timeout} s")


def ident(lab: Lab, node: Node, home: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(cli_in(lab, node, home, "id", "--json"))
    return out


def wait_verdict(
    lab: Lab, node: Node, home: Path, want: str, timeout: float = 20
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def decided() -> bool:
        seen.update(ident(lab, node, home))
        return seen.get("tcp") == want and seen.get("udp") == want

    try:
        poll(decided, timeout=timeout)
    except AssertionError:
        status = json.loads(cli_in(lab, node, home, "status", "--json"))
        raise AssertionError(f"not {want}: {seen} {status['nat']}") from None
    return seen


def test_public_nodes_are_public_and_nodes_behind_routers_are_private_dht_clients(
    lab: Lab, tmp_path: Path
) -> None:
    # Three public hosts in three /24s (the DHT keeps few contacts per /24, and a
    # private verdict needs three servers on distinct IPs): A on the public
    # bridge, B and D behind plain routed "ISP" routers (no NAT, no drop rule).
    net = lab.public_bridge("203.0.113.0/24")
    a = lab.host("a", on=net)
    isp1 = lab.router(
        "isp1", wan=net, lan="198.51.100.0/24", nat="firewall", drop_unsolicited=False
    )
    isp2 = lab.router("isp2", wan=net, lan="192.0.2.0/24", nat="firewall", drop_unsolicited=False)
    publics = [a, lab.host("b", behind=isp1), lab.host("d", behind=isp2)]
    behind: dict[str, tuple[Node, Node]] = {}
    for i, nat in enumerate(("eim", "symmetric", "firewall"), start=1):
        router = lab.router(f"r{i}", wan=net, lan=f"100.64.{i}.0/24", nat=nat)  # type: ignore[arg-type]
        behind[nat] = (router, lab.host(f"c{i}", behind=router))
    # (The lab routes the bridge to every routed LAN: the ISPs' and the firewall's.)
    homes = {name: tmp_path / name for name in ("a", "b", "d", "eim", "symmetric", "firewall")}

    first = spawn_node(lab, publics[0], homes["a"])
    banner = read_banner(first)
    match = re.search(r"--bootstrap (\S+):(\d+)", "\n".join(banner))
    assert match, banner
    # "join with" on a public lab host names its lab address (no loopback)
    assert match.group(1) == str(publics[0].address), banner
    bootstrap = f"{publics[0].address}:{match.group(2)}"
    # Started together (their banners read after): B and D, then the private nodes.
    pending = [
        spawn_node(lab, host, homes[name], "--bootstrap", bootstrap)
        for host, name in zip(publics[1:], ("b", "d"), strict=True)
    ]
    for proc in pending:
        read_banner(proc)
    started = time.monotonic()
    pending = [
        spawn_node(lab, host, homes[nat], "--bootstrap", bootstrap)
        for nat, (_router, host) in behind.items()
    ]
    for proc in pending:
        read_banner(proc)

    # -- public nodes: public over TCP and UDP, reachable at their lab address --
    public_times = {}
    for host, name in zip(publics, ("a", "b", "d"), strict=True):
        status = wait_verdict(lab, host, homes[name], "public")
        public_times[name] = status["time_to_verdict"]
        assert status["reachability"] == "public" and status["dht_mode"] == "server"
        assert status["reachable_addresses"][0] == f"{host.address}:{status['port']}", status
        assert status["bootstrap"] == f"--bootstrap {host.address}:{status['port']}"

    print("time to public verdict after start (a: first node, alone at first):", public_times)
    # `start` on A printed the verdict, with a join address that works from afar
    # (one line per change: TCP's comes first, then UDP's makes it public)
    line = read_line_with(first, "reachability: public", timeout=10)
    assert f"join with: --bootstrap {publics[0].address}:" in line, line

    # -- behind each router: private over TCP and UDP, a DHT client --
    times = {}
    for nat, (_router, host) in behind.items():
        status = wait_verdict(lab, host, homes[nat], "private")
        times[nat] = (round(time.monotonic() - started, 2), status["time_to_verdict"])
        assert status["reachability"] == "private" and status["dht_mode"] == "client"
        assert status["reachable_addresses"] == []
    print("time to private verdict (wall since start of the private nodes; per node):", times)

    private_ids = {ident(lab, host, homes[nat])["peer_id"] for nat, (_, host) in behind.items()}

    def gone_from_public_tables() -> bool:
        for host, name in zip(publics, ("a", "b", "d"), strict=True):
            peers = json.loads(cli_in(lab, host, homes[name], "peers", "--json"))["peers"]
            if private_ids & {p["peer_id"] for p in peers}:
                return False
        return True

    try:
        poll(gone_from_public_tables, timeout=15)
    except AssertionError:
        report = []
        keys = ("clients_refused", "clients_removed", "reproofs_requested", "proofs_failed")
        for host, name in zip(publics, ("a", "b", "d"), strict=True):
            peers = json.loads(cli_in(lab, host, homes[name], "peers", "--json"))["peers"]
            dht = json.loads(cli_in(lab, host, homes[name], "status", "--json"))["dht"]
            held = [p for p in peers if p["peer_id"] in private_ids]
            report.append((name, held, {k: dht.get(k) for k in keys}))
        for nat, (_, host) in behind.items():
            dht = json.loads(cli_in(lab, host, homes[nat], "status", "--json"))["dht"]
            report.append(
                (
                    nat,
                    ident(lab, host, homes[nat])["peer_id"],
                    {
                        k: dht.get(k)
                        for k in ("client_hints_sent", "mode_switches", "rpc_sent.identify")
                    },
                )
            )
        raise AssertionError(report) from None

    # -- a private node's provider record is still stored and found --
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(50_000))
    eim_router, eim_host = behind["eim"]
    rid = cli_in(lab, eim_host, homes["eim"], "share", str(data)).strip()

    def found() -> bool:
        out = json.loads(cli_in(lab, publics[1], homes["b"], "providers", rid, "--json"))
        return any(p["host"] == str(eim_router.address) for p in out["providers"])

    poll(found, timeout=15)
    assert gone_from_public_tables()  # sharing did not put it back
