"""Relays in the network-namespace lab (p2pnode/sim/netlab.py), with real p2pnode processes:
C sits behind a symmetric NAT that drops unsolicited inbound (no mapping, no
punching: only a relay reaches it). Public A and B offer relays; C reserves on
them and announces relay addresses in its provider records. Public B and D
(behind another NAT) find C through the DHT only and download through a relay.

Only A offers a relay: a relay holds a peer connection to C (the reservation's),
which it would simply reuse (as B would any connection C opened to it)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from p2pnode.sim.netlab import Lab, Node
from tests.cli_helpers import CLI, poll
from tests.conftest import needs_lab
from tests.integration.test_nat_lab import cli_in, start_node

pytestmark = needs_lab


def status(lab: Lab, node: Node, home: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(cli_in(lab, node, home, "status", "--json"))
    return out


def test_nodes_behind_nat_get_from_a_node_behind_symmetric_nat_through_a_relay(
    lab: Lab, tmp_path: Path
) -> None:
    net = lab.public_bridge("203.0.113.0/24")
    a = lab.host("a", on=net)
    b = lab.host("b", on=net)
    r1 = lab.router("r1", wan=net, lan="100.64.1.0/24", nat="symmetric")
    r2 = lab.router("r2", wan=net, lan="100.64.2.0/24", nat="eim")
    c = lab.host("c", behind=r1)
    d = lab.host("d", behind=r2)
    homes = {n: tmp_path / n for n in "abcd"}
    banner = start_node(lab, a, homes["a"], "--relay-service", "always")
    port = re.search(r"--bootstrap \S+:(\d+)", "\n".join(banner))
    assert port, banner
    join = ["--bootstrap", f"{a.address}:{port.group(1)}"]
    start_node(lab, b, homes["b"], *join, "--relay-service", "never")
    # C names its relay: asking B or D for one would leave a peer connection
    # from C to them open, which they would reuse instead of a relay.
    relay = f"{a.address}:{port.group(1)}"
    start_node(lab, c, homes["c"], *join, "--relay-client", "always", "--relay", relay)
    start_node(lab, d, homes["d"], *join)

    # C holds a reservation on A before it shares.
    poll(lambda: len(status(lab, c, homes["c"])["relay"]["reservations"]) == 1, timeout=20)
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(1_000_000))
    rid = cli_in(lab, c, homes["c"], "share", str(data)).strip()

    getters = ((b, "b"), (d, "d"))
    for getter, name in getters:

        def found(getter: Node = getter, name: str = name) -> bool:
            out = cli_in(lab, getter, homes[name], "providers", rid, "--json")
            return any(p["relays"] for p in json.loads(out)["providers"])

        poll(found, timeout=20)
    # Both at once: a getter that finished would serve the file itself (and
    # B, public, would then be reached directly).
    gets = {
        name: lab.spawn(
            getter,
            [*CLI, "--home", str(homes[name]), "get", rid, "-o", str(tmp_path / f"got-{name}")],
        )
        for getter, name in getters
    }
    for _getter, name in getters:
        out, err = gets[name].communicate(timeout=40)
        assert gets[name].returncode == 0 and "verified" in out, err
        assert (tmp_path / f"got-{name}").read_bytes() == data.read_bytes()
    # D, behind its own NAT, can reach C (symmetric: no punching) only through
    # the relay. B is public: C's own connections to it (its dial-back probes,
    # or a reversal) may carry B's download instead.
    net_stats = status(lab, d, homes["d"])["net"]
    assert net_stats.get("relay_dials_ok", 0) >= 1, net_stats
    assert net_stats["connections_relayed"] >= 1, net_stats

    # D finds C by its id (C is in no one's routing table as a server: its peer
    # record names its relay).
    c_id = status(lab, c, homes["c"])["peer_id"]
    found = json.loads(cli_in(lab, d, homes["d"], "dht", "find-peer", c_id, "--json"))
    assert [r["host"] for r in found["relays"]] == [str(a.address)], found

    relayed = status(lab, a, homes["a"])["relay"]["service"]
    assert relayed["circuits_opened"] >= 1, relayed
    assert relayed["bytes_relayed"] >= 1_000_000, relayed
    accepted = status(lab, c, homes["c"])["relay"]["client"]
    assert accepted["circuits_accepted"] >= 1, accepted
