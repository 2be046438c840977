"""IPv6 and dual-stack listening (issue 12, item 7), on loopback: a node on
"::" takes IPv4 and IPv6 peers on one port; IPv6 addresses travel in provider
records; an IPv4-only and an IPv6-only node exchange through it."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from p2pnode.node import Node
from tests.helpers import eventually, fast_config


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = [
    pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here"),
    pytest.mark.usefixtures("no_errors_logged"),
]


async def test_dual_stack_node_joins_ipv4_and_ipv6_nodes_that_exchange_through_it(
    homes: Callable[[str], Path], tmp_path: Path
) -> None:
    hub = Node(dataclasses.replace(fast_config(homes("hub")), host="::"))
    await hub.start()
    started = [hub]
    try:
        port = hub.port
        v4 = Node(fast_config(homes("v4"), bootstrap=(("127.0.0.1", port),)))
        await v4.start()
        started.append(v4)
        v6_config = fast_config(homes("v6"), bootstrap=(("::1", port),))
        v6 = Node(dataclasses.replace(v6_config, host="::1"))
        await v6.start()
        started.append(v6)
        await v4.wait_joined(10)
        await v6.wait_joined(10)
        # one port, both families; IPv4 peers are plain IPv4, not ::ffff:127.0.0.1
        addresses = sorted(p["address"] for p in hub.peers())
        assert addresses == sorted([f"127.0.0.1:{v4.port}", f"[::1]:{v6.port}"]), addresses

        data = tmp_path / "data.bin"
        data.write_bytes(os.urandom(200_000))
        # the IPv6-only node shares: its record carries an IPv6 address
        shared = await v6.exchange.share(data)

        async def provided_over_v6() -> bool:
            found = await hub.exchange.providers(shared.resource_id)
            return any(r.host == "::1" for r in found)

        await eventually(provided_over_v6, 15, what="a provider record with ::1")
        got = tmp_path / "from_v6.bin"
        await hub.exchange.get(shared.resource_id, got)
        assert got.read_bytes() == data.read_bytes()

        # the IPv4-only node shares; the IPv6-only node finds it through the hub
        other = tmp_path / "other.bin"
        other.write_bytes(os.urandom(150_000))
        shared4 = await v4.exchange.share(other)

        async def found_by_v6() -> bool:
            return bool(await v6.exchange.providers(shared4.resource_id))

        await eventually(found_by_v6, 15, what="the IPv4 node's record, seen from IPv6")
        got4 = tmp_path / "from_v4.bin"
        await v6.exchange.get(shared4.resource_id, got4)
        assert got4.read_bytes() == other.read_bytes()

        # the hub serves IPv4 and IPv6 downloaders on its one TCP socket
        third = tmp_path / "third.bin"
        third.write_bytes(os.urandom(100_000))
        shared_hub = await hub.exchange.share(third)
        for node in (v4, v6):
            await eventually(
                lambda n=node: n.exchange.providers(shared_hub.resource_id), 15, what="hub"
            )
            dest = tmp_path / f"hub_{node.port}.bin"
            await node.exchange.get(shared_hub.resource_id, dest)
            assert dest.read_bytes() == third.read_bytes()
        seen = sorted(c.peername[0] for c in hub.peer_host.connections_to(v4.node_id))
        assert seen and all(host == "::ffff:127.0.0.1" for host in seen), seen
    finally:
        for node in reversed(started):
            await node.stop()
