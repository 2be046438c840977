"""Relays between real nodes on 127.0.0.x: C reserves on the relay R and stops
accepting connections (as behind a NAT: its listener is closed, so a direct dial
is refused); D finds C through the DHT only and reaches it through R, for a
download (the exchange) and for a service call (the services)."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from p2pnode.config import NodeConfig
from p2pnode.exchange.manifest import dht_key
from p2pnode.nat.holepunch_config import HolePunchConfig
from p2pnode.nat.reachability import AutoNatConfig
from p2pnode.nat.relay_core import RelayConfig
from p2pnode.nat.types import Reachability
from p2pnode.node import Node
from p2pnode.services import CallContext
from tests.helpers import can_bind, eventually, fast_config

pytestmark = pytest.mark.usefixtures("no_errors_logged")

DISTINCT_HOSTS = can_bind("127.0.0.5") and can_bind("127.0.0.5", socket.SOCK_STREAM)


def config(home: Path, i: int, seed: tuple[tuple[str, int], ...], relay: RelayConfig) -> NodeConfig:
    host = f"127.0.0.{i + 1}" if DISTINCT_HOSTS else "127.0.0.1"
    # No hole punching, no AutoNAT (its probes open C->D connections D would
    # reuse): these tests are about the relay carrying the bytes.
    quiet = HolePunchConfig(enabled=False)
    base = fast_config(
        home,
        bootstrap=seed,
        control_api=False,
        relay=relay,
        holepunch=quiet,
        autonat=AutoNatConfig(enabled=False, serve=False),
    )
    return replace(base, host=host)


@pytest.fixture
async def net(homes: Callable[[str], Path]) -> AsyncIterator[tuple[Node, Node, Node]]:
    """(R, C, D): R offers a relay, C holds a reservation on it and is hidden."""
    never = RelayConfig(service="never", client="never")
    first = Node(config(homes("n0"), 0, (), never))
    await first.start()
    nodes = [first]
    try:
        seed = ((first.config.host, first.port),)
        r = Node(config(homes("r"), 1, seed, RelayConfig(service="always", client="never")))
        await r.start()
        nodes.append(r)
        to_r = RelayConfig(service="never", client="always", relays=((r.config.host, r.port),))
        c = Node(config(homes("c"), 2, seed, to_r))
        await c.start()
        nodes.append(c)
        d = Node(config(homes("d"), 3, seed, never))
        await d.start()
        nodes.append(d)
        for node in nodes[1:]:
            await node.wait_joined(timeout=10)
        await eventually(lambda: bool(c.relay.client.held), what="a reservation")
        for server in c.peer_host._servers:  # from now on, nobody can dial C
            server.close()
        yield r, c, d
    finally:
        for node in nodes:
            await node.stop()


async def test_a_download_from_a_hidden_node_goes_through_its_relay(
    net: tuple[Node, Node, Node], tmp_path: Path
) -> None:
    r, c, d = net
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(2_000_000))
    info = await c.exchange.share(data)
    await c.discovery.add_provider(dht_key(info.resource_id), c.port)

    async def found() -> bool:
        return any(p.relays for p in await d.exchange.providers(info.resource_id))

    await eventually(found, timeout=10, what="a provider record with relays")
    got = tmp_path / "got.bin"
    await d.exchange.get(info.resource_id, got)
    assert got.read_bytes() == data.read_bytes()
    conn = d.peer_host.connection_to(c.node_id)
    assert conn is not None and conn.via == "relayed"
    assert r.relay.service.stats()["bytes_relayed"] >= 2_000_000
    assert d.status()["net"]["connections_relayed"] == 1


async def echo(request: Any, ctx: CallContext) -> Any:
    return {"echo": request, "by": ctx.peer_id.hex()}


async def test_a_service_call_to_a_hidden_node_goes_through_its_relay(
    net: tuple[Node, Node, Node],
) -> None:
    _r, c, d = net
    c.serve("echo", echo)

    async def found() -> bool:
        return any(p.relays for p in await d.find_service("echo"))

    await eventually(found, timeout=10, what="a service record with relays")
    reply = await d.call("echo", "hi", peer=c.peer_id, timeout=10)
    assert reply == {"echo": "hi", "by": d.node_id.hex()}
    conn = d.peer_host.connection_to(c.node_id)
    assert conn is not None and conn.via == "relayed"


async def test_a_hidden_node_is_found_by_its_id(net: tuple[Node, Node, Node]) -> None:
    r, c, d = net

    async def peer_record() -> bool:
        records = await d.discovery.find_providers(c.node_id)
        return any(p.node_id == c.node_id and p.relays for p in records)

    await eventually(peer_record, timeout=10, what="C's peer record")
    (hop,) = next(p for p in await d.discovery.find_providers(c.node_id)).relays
    assert hop == (r.config.host, r.port, r.node_id)
    status = c.status()["relay"]
    assert status["reservations"] == [{"relay": r.peer_id, "address": f"{r.config.host}:{r.port}"}]


async def test_auto_modes_follow_the_reachability_verdict(homes: Callable[[str], Path]) -> None:
    node = Node(fast_config(homes("auto"), control_api=False))
    await node.start()
    try:
        relay = node.relay
        assert not relay.service.enabled  # no verdict yet: neither side
        assert not relay.client.active()
        relay.reachability = lambda: Reachability.PUBLIC.value  # the verdict's hook
        relay.refresh()
        assert relay.service.enabled and not relay.client.active()
        relay.reachability = lambda: Reachability.PRIVATE.value
        relay.refresh()
        assert not relay.service.enabled and relay.client.active()
    finally:
        await node.stop()
