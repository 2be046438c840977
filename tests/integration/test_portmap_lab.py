"""Port mapping against miniupnpd on a lab router (p2pnode/sim/netlab.py ``Lab.upnp``):
a node behind the router maps its TCP and UDP port by UPnP-IGD or NAT-PMP, a
public node downloads from it through the mapping, leases are renewed, and the
mappings are gone from the router after the node stops."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from p2pnode.config import NO_PORT_MAPPING_ENV
from p2pnode.sim.netlab import Lab, Node, Upnpd
from tests.cli_helpers import CLI, cli_env
from tests.conftest import needs_upnp

pytestmark = needs_upnp

DEADLINE = 20.0


def node_env(*, mapping: bool) -> dict[str, str]:
    env = cli_env()
    # The suite turns port mapping off for every node (conftest); these tests
    # run inside lab namespaces, where it may talk to the lab's router.
    if mapping:
        env.pop(NO_PORT_MAPPING_ENV, None)
    else:
        env[NO_PORT_MAPPING_ENV] = "1"
    return env


def start_node(
    lab: Lab, node: Node, home: Path, *extra: str, mapping: bool = False
) -> tuple[subprocess.Popen[str], int]:
    """`p2pnode start` inside a namespace; (process, port) once it is ready."""
    argv = [*CLI, "start", "--home", str(home), "--port", "0", *extra]
    proc = lab.spawn(node, argv, env=node_env(mapping=mapping))
    assert proc.stdout is not None
    banner: list[str] = []
    for line in proc.stdout:  # bounded: the node prints "ready" or exits
        banner.append(line.rstrip())
        if line.strip() == "ready":
            port = re.search(r"--bootstrap \S+:(\d+)", "\n".join(banner))
            assert port, banner
            return proc, int(port.group(1))
    raise AssertionError(
        f"node did not start: {banner} {proc.stderr.read() if proc.stderr else ''}"
    )


def cli_in(lab: Lab, node: Node, home: Path, *args: str) -> str:
    return lab.run(node, [*CLI, "--home", str(home), *args], timeout=60).stdout


def status(lab: Lab, node: Node, home: Path) -> dict[str, Any]:
    return json.loads(cli_in(lab, node, home, "status", "--json"))  # type: ignore[no-any-return]


def wait_for(what: str, check: Any, timeout: float = DEADLINE) -> Any:
    """Poll ``check()`` until it returns something true (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def upnp_lab(
    lab: Lab, *, upnp: bool, natpmp: bool, **opts: int
) -> tuple[Node, Node, Node, Node, Upnpd]:
    net = lab.public_bridge("203.0.113.0/24")
    a = lab.host("a", on=net)
    b = lab.host("b", on=net)
    router = lab.router("r", wan=net, lan="100.64.1.0/24", nat="eim")
    c = lab.host("c", behind=router)
    upnpd = lab.upnp(router, stun=a, upnp=upnp, natpmp=natpmp, **opts)
    return a, b, router, c, upnpd


@pytest.mark.parametrize("method", ["upnp", "pcp"])
def test_a_public_node_downloads_through_the_mapping(lab: Lab, tmp_path: Path, method: str) -> None:
    """Issue 12's failing case (tests/integration/test_nat_lab.py, xfail there),
    with a router that maps: C behind it maps its port, B dials the router's
    address from C's provider record and the DNAT rule brings it to C. The
    router offers one method (miniupnpd's NAT-PMP switch serves PCP too; a node
    with default settings speaks PCP first)."""
    a, b, router, c, upnpd = upnp_lab(lab, upnp=method == "upnp", natpmp=method == "pcp")
    home_a, home_b, home_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _, port_a = start_node(lab, a, home_a)
    bootstrap = f"{a.address}:{port_a}"
    proc_c, port_c = start_node(lab, c, home_c, "--bootstrap", bootstrap, mapping=True)

    def mapped() -> dict[str, Any] | None:
        pm = status(lab, c, home_c)["port_mapping"]
        return pm if len(pm["mappings"]) == 2 else None

    pm = wait_for("C's port mapping", mapped)
    assert pm["method"] == method
    assert pm["external"] == f"{router.address}:{port_c}"
    assert pm["double_nat"] is False
    assert {(m["protocol"], m["external"]) for m in pm["mappings"]} == {
        ("tcp", f"{router.address}:{port_c}"),
        ("udp", f"{router.address}:{port_c}"),
    }
    assert upnpd.mapped_ports() == {("tcp", port_c), ("udp", port_c)}
    asked = "AddPortMapping" if method == "upnp" else "PCP MAP:"
    assert asked in upnpd.log()  # the control for test_no_port_mapping_makes_no_attempt
    print(f"{method}: mapped {pm['mapped_after']} s after start")
    shown = cli_in(lab, c, home_c, "status")
    assert f"port map:   tcp {port_c} -> {router.address}:{port_c} via {method}" in shown, shown

    start_node(lab, b, home_b, "--bootstrap", bootstrap)
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(300_000))
    rid = cli_in(lab, c, home_c, "share", str(data)).strip()

    def provider() -> bool:
        found = json.loads(cli_in(lab, b, home_b, "providers", rid, "--json"))["providers"]
        return len(found) == 1

    wait_for("C as provider", provider)
    got = tmp_path / "got.bin"
    argv = [*CLI, "--home", str(home_b), "get", rid, "-o", str(got)]
    result = lab.run(b, argv, timeout=30, check=False)
    assert result.returncode == 0 and "verified" in result.stdout, result.stderr
    assert got.read_bytes() == data.read_bytes()

    # Stopped, the node removes its mappings from the router.
    cli_in(lab, c, home_c, "stop")
    assert proc_c.wait(timeout=15) == 0
    assert upnpd.mapped_ports() == set(), upnpd.rules()


# Runs a Node in the namespace (on `port`, 0: any) allowed only `methods`, asking
# for `lease` seconds; prints its mapping status once TCP and UDP are mapped and
# `renewals` renewals succeeded, then stops it when told (a line on stdin).
MAPPING_NODE = """
import asyncio, json, sys
from pathlib import Path
from p2pnode import Node, NodeConfig
from p2pnode.nat.portmap_core import PortMapConfig

async def main():
    home, methods, lease, renewals, port = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    portmap = PortMapConfig(methods=tuple(methods.split(",")), lease=lease)
    config = NodeConfig(home=Path(home), port=port, control_api=False, portmap=portmap)
    async with Node(config) as node:
        mapper = node.port_mapper
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20

        def done():
            stats, mapped = mapper.stats(), mapper.status()["mappings"]
            return len(mapped) == 2 and stats.get("renewals_ok", 0) >= renewals

        while not done() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        out = {"port": node.port, "status": mapper.status(), "stats": mapper.stats()}
        print(json.dumps(out), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
    print(json.dumps(mapper.stats()), flush=True)

asyncio.run(main())
"""


def mapping_node(
    lab: Lab, host: Node, home: Path, method: str, *, lease: int, renewals: int = 0, port: int = 0
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """MAPPING_NODE in ``host``: the process and its report, once mapped."""
    argv = [sys.executable, "-c", MAPPING_NODE, str(home), method]
    proc = lab.spawn(host, [*argv, str(lease), str(renewals), str(port)], stdin=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the script's own 20 s deadline
    assert line, proc.stderr.read() if proc.stderr else ""
    return proc, json.loads(line)


@pytest.mark.parametrize("method", ["upnp", "pcp", "natpmp"])
def test_a_short_lease_is_renewed_and_removed_at_stop(
    lab: Lab, tmp_path: Path, method: str
) -> None:
    # Only `method` is allowed to the node; the router offers all three.
    # miniupnpd clamps NAT-PMP/PCP lifetimes to min_lifetime (120 s by default).
    _a, _b, router, c, upnpd = upnp_lab(lab, upnp=True, natpmp=True, min_lifetime=1)
    lease = 3  # renewed at 1.5 s and 3 s (each renewal takes milliseconds)
    proc, report = mapping_node(lab, c, tmp_path / "c", method, lease=lease, renewals=4)
    port, stats, state = report["port"], report["stats"], report["status"]
    # Two rounds of renewal for TCP and UDP, each before the lease ran out:
    # the mappings lived past two lifetimes.
    assert stats["renewals_ok"] >= 4, report
    assert stats.get("leases_expired", 0) == 0, report
    assert state["method"] == method
    assert state["external"] == f"{router.address}:{port}"
    assert upnpd.mapped_ports() == {("tcp", port), ("udp", port)}
    print(f"{method}: mapped {state['mapped_after']} s after start")

    out, err = proc.communicate("stop\n", timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["removals"] == 2
    assert upnpd.mapped_ports() == set(), upnpd.rules()


def test_no_port_mapping_makes_no_attempt(lab: Lab, tmp_path: Path) -> None:
    _a, _b, _router, c, upnpd = upnp_lab(lab, upnp=True, natpmp=True)
    home = tmp_path / "c"
    env = node_env(mapping=True)  # only the flag turns it off here
    argv = [*CLI, "start", "--home", str(home), "--port", "0", "--no-port-mapping"]
    proc = lab.spawn(c, argv, env=env)
    assert proc.stdout is not None
    wait_for("ready", lambda: proc.stdout.readline().strip() == "ready")  # type: ignore[union-attr]
    pm = status(lab, c, home)["port_mapping"]
    assert pm == {"enabled": False, "reason": "turned off", "mappings": []}
    metrics = cli_in(lab, c, home, "status", "-v")
    assert "port map:   off (turned off)" in metrics
    cli_in(lab, c, home, "stop")
    assert proc.wait(timeout=15) == 0
    # miniupnpd logs every SSDP search, SOAP call and NAT-PMP request it gets.
    log = upnpd.log()
    requests = ("SSDP M-SEARCH from", "HTTP REQUEST from", "NAT-PMP request", "PCP request")
    for request in requests:
        assert request not in log, log
    assert upnpd.mapped_ports() == set()


@pytest.mark.parametrize("method", ["upnp", "upnp-igdv1", "pcp", "natpmp"])
def test_a_port_taken_by_another_host_maps_to_another_external_port(
    lab: Lab, tmp_path: Path, method: str
) -> None:
    """Two hosts behind one router listen on the same port: the second gets
    another external port (AddAnyPortMapping on IGDv2, random ports on IGDv1,
    the router's choice with PCP and NAT-PMP) and says so."""
    net = lab.public_bridge("203.0.113.0/24")
    a = lab.host("a", on=net)
    router = lab.router("r", wan=net, lan="100.64.1.0/24", nat="eim")
    first, second = lab.host("c1", behind=router), lab.host("c2", behind=router)
    upnpd = lab.upnp(router, stun=a, igd_v1=method == "upnp-igdv1")
    allowed = method.split("-")[0]
    port = 40123  # inside lab namespaces only
    procs = []
    for host in (first, second):
        proc, report = mapping_node(lab, host, tmp_path / host.name, allowed, lease=60, port=port)
        procs.append(proc)
        assert report["status"]["method"] == allowed, report
    external = {m["protocol"]: m["external"] for m in report["status"]["mappings"]}
    ports = {proto: int(address.rpartition(":")[2]) for proto, address in external.items()}
    assert ports["tcp"] != port and ports["udp"] != port, report
    assert upnpd.mapped_ports() == {
        ("tcp", port),
        ("udp", port),
        ("tcp", ports["tcp"]),
        ("udp", ports["udp"]),
    }
    for proc in procs:
        _, err = proc.communicate("stop\n", timeout=30)
        assert proc.returncode == 0, err
    assert upnpd.mapped_ports() == set(), upnpd.rules()
