"""NAT behaviour in the network-namespace lab (tests/lab.py): what the routers
do before any p2pnode code runs over them. Small socket scripts run inside the
namespaces; every wait is bounded by a socket timeout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_helpers import CLI, cli_env, poll
from tests.conftest import needs_lab
from tests.lab import Lab, Node

pytestmark = needs_lab

PORT = 40000  # inside lab namespaces only: nothing else listens there

# Receives one datagram, answers it, prints who sent it as "ip port".
UDP_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(10)
print("ready", flush=True)
data, peer = s.recvfrom(100)
s.sendto(data, peer)
print(peer[0], peer[1], flush=True)
"""

# From one fixed local port, sends to each "ip:port" and waits for its answer.
UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(5)
for target in sys.argv[2:]:
    ip, port = target.split(":")
    s.sendto(b"hello", (ip, int(port)))
    s.recvfrom(100)
print("answered", flush=True)
"""

TCP_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
s.settimeout(10)
print("ready", flush=True)
conn, peer = s.accept()
conn.sendall(b"hi")
print(peer[0], peer[1], flush=True)
"""

TCP_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(s.recv(2).decode(), flush=True)
"""

# Tries an unsolicited UDP exchange and a TCP connect; prints what happened.
PROBE = """
import socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(1)
u.connect((ip, port))
u.send(b"x")
try:
    u.recv(10)
    print("udp answered")
except socket.timeout:
    print("udp silent")
except ConnectionRefusedError:
    print("udp refused")
try:
    socket.create_connection((ip, port), timeout=1)
    print("tcp connected")
except socket.timeout:
    print("tcp silent")
except ConnectionRefusedError:
    print("tcp refused")
"""


def start_server(lab: Lab, node: Node, script: str, port: int) -> subprocess.Popen[str]:
    proc = lab.spawn(node, [sys.executable, "-c", script, str(port)])
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the script prints "ready" or dies
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
    return proc


def seen_source(proc: subprocess.Popen[str]) -> tuple[str, int]:
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    ip, port = out.split()
    return ip, int(port)


def two_public_hosts_and_one_behind(lab: Lab, nat: str) -> tuple[Node, Node, Node, Node]:
    net = lab.public_bridge("203.0.113.0/24")
    a = lab.host("a", on=net)
    b = lab.host("b", on=net)
    router = lab.router("r", wan=net, lan="100.64.1.0/24", nat=nat)  # type: ignore[arg-type]
    c = lab.host("c", behind=router)
    return a, b, router, c


def udp_sources_seen(lab: Lab, nat: str) -> tuple[Node, list[tuple[str, int]]]:
    """C sends from one local port to A and to B; the sources A and B saw."""
    a, b, router, c = two_public_hosts_and_one_behind(lab, nat)
    servers = [start_server(lab, node, UDP_SERVER, PORT) for node in (a, b)]
    targets = [f"{a.address}:{PORT}", f"{b.address}:{PORT}"]
    client = lab.run(c, [sys.executable, "-c", UDP_CLIENT, "45000", *targets])
    assert client.stdout.strip() == "answered"
    return router, [seen_source(s) for s in servers]


def test_eim_router_keeps_one_mapping_for_two_destinations(lab: Lab) -> None:
    router, seen = udp_sources_seen(lab, "eim")
    assert seen[0] == seen[1] == (str(router.address), 45000), seen


def test_symmetric_router_maps_each_destination_to_its_own_port(lab: Lab) -> None:
    router, seen = udp_sources_seen(lab, "symmetric")
    assert [ip for ip, _ in seen] == [str(router.address)] * 2, seen
    assert seen[0][1] != seen[1][1], seen


def test_tcp_from_behind_nat_arrives_from_the_router(lab: Lab) -> None:
    a, _b, router, c = two_public_hosts_and_one_behind(lab, "eim")
    server = start_server(lab, a, TCP_SERVER, PORT)
    client = lab.run(c, [sys.executable, "-c", TCP_CLIENT, str(a.address), str(PORT)])
    assert client.stdout.strip() == "hi"
    assert seen_source(server)[0] == str(router.address)


@pytest.mark.parametrize("nat", ["eim", "symmetric", "firewall"])
def test_unsolicited_inbound_to_the_router_is_dropped_silently(lab: Lab, nat: str) -> None:
    a, _b, router, _c = two_public_hosts_and_one_behind(lab, nat)
    started = time.monotonic()
    probe = lab.run(a, [sys.executable, "-c", PROBE, str(router.address), str(PORT)])
    assert probe.stdout.split("\n")[:2] == ["udp silent", "tcp silent"], probe.stdout
    assert time.monotonic() - started < 5


def test_without_the_drop_rule_the_router_refuses(lab: Lab) -> None:
    """The control: the silence above is the drop rule, not a broken lab."""
    net = lab.public_bridge("203.0.113.0/24")
    a = lab.host("a", on=net)
    router = lab.router("r", wan=net, lan="100.64.1.0/24", nat="eim", drop_unsolicited=False)
    probe = lab.run(a, [sys.executable, "-c", PROBE, str(router.address), str(PORT)])
    assert probe.stdout.split("\n")[:2] == ["udp refused", "tcp refused"], probe.stdout


def start_node(lab: Lab, node: Node, home: Path, *extra: str) -> list[str]:
    """`p2pnode start` inside a namespace; its banner up to "ready"."""
    proc = lab.spawn(
        node, [*CLI, "start", "--home", str(home), "--port", "0", *extra], env=cli_env()
    )
    assert proc.stdout is not None
    banner: list[str] = []
    for line in proc.stdout:  # bounded: the node prints "ready" or exits
        banner.append(line.rstrip())
        if line.strip() == "ready":
            return banner
    raise AssertionError(
        f"node did not start: {banner} {proc.stderr.read() if proc.stderr else ''}"
    )


def cli_in(lab: Lab, node: Node, home: Path, *args: str) -> str:
    return lab.run(node, [*CLI, "--home", str(home), *args], timeout=60).stdout


def test_node_behind_eim_nat_joins_a_public_node_and_downloads(lab: Lab, tmp_path: Path) -> None:
    """Issue 12's setting with real nodes: A public, C behind an eim router.
    C dials out, so this works today; the reverse direction is what's left."""
    net = lab.public_bridge("203.0.113.0/24")
    a = lab.host("a", on=net)
    router = lab.router("r", wan=net, lan="100.64.1.0/24", nat="eim")
    c = lab.host("c", behind=router)
    home_a, home_c = tmp_path / "a", tmp_path / "c"
    banner = start_node(lab, a, home_a)
    port = re.search(r"--bootstrap \S+:(\d+)", "\n".join(banner))
    assert port, banner
    start_node(lab, c, home_c, "--bootstrap", f"{a.address}:{port.group(1)}")

    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(300_000))
    rid = cli_in(lab, a, home_a, "share", str(data)).strip()

    def found() -> bool:
        out = cli_in(lab, c, home_c, "providers", rid, "--json")
        return len(json.loads(out)["providers"]) == 1

    poll(found, timeout=15)
    got = tmp_path / "got.bin"
    assert "verified" in cli_in(lab, c, home_c, "get", rid, "-o", str(got))
    assert got.read_bytes() == data.read_bytes()
    # A knows C by the router's address: the traffic did cross the NAT.
    peers = cli_in(lab, a, home_a, "peers")
    assert str(router.address) in peers and str(c.address) not in peers, peers


@pytest.mark.xfail(
    # Not strict since AutoNAT: C's probe request to B opens a C->B connection for
    # a few seconds, and B's get may reuse it (the pool is keyed by peer id), so
    # the download sometimes works. Strict again once relays/punching make it always.
    strict=False,
    reason="issue 12: C's provider record names the router's address and nothing is mapped there",
)
def test_public_node_downloads_from_a_node_behind_eim_nat(lab: Lab, tmp_path: Path) -> None:
    """Issue 12's first failure: C, behind an eim router that drops unsolicited
    inbound, shares; B, public, finds C as provider and downloads from it.
    Today B dials the router, which drops the SYN: the get times out."""
    a, b, router, c = two_public_hosts_and_one_behind(lab, "eim")
    home_a, home_b, home_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    banner = start_node(lab, a, home_a)
    port = re.search(r"--bootstrap \S+:(\d+)", "\n".join(banner))
    assert port, banner
    bootstrap = f"{a.address}:{port.group(1)}"
    start_node(lab, b, home_b, "--bootstrap", bootstrap)
    start_node(lab, c, home_c, "--bootstrap", bootstrap)

    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(300_000))
    rid = cli_in(lab, c, home_c, "share", str(data)).strip()

    def found() -> bool:
        out = cli_in(lab, b, home_b, "providers", rid, "--json")
        return len(json.loads(out)["providers"]) == 1

    poll(found, timeout=15)
    got = tmp_path / "got.bin"
    argv = [*CLI, "--home", str(home_b), "get", rid, "-o", str(got)]
    result = lab.run(b, argv, timeout=20, check=False)
    why = f"router {router.address}: {result.stderr}"
    assert result.returncode == 0 and "verified" in result.stdout, why
    assert got.read_bytes() == data.read_bytes()
