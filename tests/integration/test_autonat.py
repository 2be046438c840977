"""AutoNAT between real nodes on 127.0.0.1: dial-backs confirm both transports,
the verdict shows in ``Node.reachability``, ``id`` and ``status``, and the change
hook fires."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from p2pnode import Node
from p2pnode.nat.reachability import ReachabilityChanged
from p2pnode.nat.types import Reachability
from tests.helpers import eventually, fast_config
from tests.integration.test_metrics import families, value


async def test_two_public_nodes_find_each_other_public(homes: Callable[[str], Path]) -> None:
    first = Node(fast_config(homes("a")))
    await first.start()
    second = Node(fast_config(homes("b"), bootstrap=(("127.0.0.1", first.port),)))
    changes: list[ReachabilityChanged] = []
    second_started = time.monotonic()
    await second.start()
    second.on_reachability_change(changes.append)
    try:
        await second.wait_joined(timeout=10)

        def public(node: Node) -> bool:
            status = node.reachability
            return status.tcp is status.udp is Reachability.PUBLIC

        await eventually(lambda: public(second), timeout=15, what="second node public")
        took = time.monotonic() - second_started
        await eventually(lambda: public(first), timeout=15, what="first node public")
        status = second.reachability
        assert status.overall is Reachability.PUBLIC and status.dht_mode == "server"
        assert {(c.transport, c.new) for c in changes} == {
            ("tcp", Reachability.PUBLIC),
            ("udp", Reachability.PUBLIC),
        }
        assert status.addresses and status.addresses[0] == f"127.0.0.1:{second.port}"
        assert took < 5, took
        described = second.describe()
        assert described["reachability"] == "public"
        assert described["reachable_addresses"][0] == f"127.0.0.1:{second.port}"
        nat = second.status()["nat"]
        assert nat["probe_tcp_success"] >= 1 and nat["probe_udp_success"] >= 1
        assert first.status()["nat"]["dial_backs_served"] >= 1
        fams = await families(second)
        assert value(fams, "p2pnode_nat_reachability_tcp") == 1
        assert value(fams, "p2pnode_nat_reachability_udp") == 1
        assert value(fams, "p2pnode_nat_probes_total") >= 1
        assert value(fams, "p2pnode_nat_dial_back_refusals_total", reason="rate") == 0
    finally:
        await second.stop()
        await first.stop()


async def test_a_port_mapping_is_probed_and_makes_the_node_public(
    homes: Callable[[str], Path],
) -> None:
    """The port mapper's input: a mapping restarts the verdict from unknown and
    the servers are asked to dial the mapped port (here: our own, on loopback)."""
    first = Node(fast_config(homes("a")))
    await first.start()
    second = Node(fast_config(homes("b"), bootstrap=(("127.0.0.1", first.port),)))
    await second.start()
    try:
        await eventually(
            lambda: second.reachability.tcp is Reachability.PUBLIC, what="public at first"
        )
        changed = second.reachability_changed
        second.mapping_changed(("127.0.0.1", second.port))
        assert changed.is_set()  # the verdict went back to unknown
        assert second.reachability.tcp is Reachability.UNKNOWN
        assert second.autonat.core.probe_ports(1, 1) == (second.port, second.port)
        await eventually(
            lambda: second.reachability.tcp is Reachability.PUBLIC, what="public via the mapping"
        )
        assert second.status()["nat"]["mapping_changes"] == 1
    finally:
        await second.stop()
        await first.stop()
