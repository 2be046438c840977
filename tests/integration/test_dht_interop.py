"""Wire compatibility with a stock ``kademlia.network.Server`` (rpcudp + umsgpack) on
127.0.0.1, both directions: ping, find_node, find_value, lookups and bootstrapping
through stock nodes.

What changed with proven ids and tokens (intended): a stock node cannot prove its
id (it does not know identify), so it sits in our routing table as an unproven
contact (at most ``max_unproven_per_bucket`` per bucket), a lookup hint we never
store on; and a stock store (no token) into us is refused and counted
(``stores_refused_token``). Stock nodes still read our values (find_value)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from kademlia.network import Server
from kademlia.utils import digest

from p2pnode.dht import DhtConfig, Discovery
from p2pnode.identity import Identity
from tests.helpers import eventually

CONFIG = DhtConfig(ksize=20, rpc_timeout=1.0, lookup_timeout=10.0)


@pytest.fixture
async def stock() -> AsyncIterator[Server]:
    server = Server()
    await server.listen(0, interface="127.0.0.1")
    server.protocol._wait_timeout = 1  # stock default is 5 s
    yield server
    server.stop()


@pytest.fixture
async def ours() -> AsyncIterator[Discovery]:
    node = Discovery(Identity.generate(), CONFIG)
    await node.listen("127.0.0.1", 0)
    yield node
    await node.close()


def port_of(server: Server) -> int:
    return int(server.transport.get_extra_info("sockname")[1])


async def test_we_bootstrap_off_a_stock_server(stock: Server, ours: Discovery) -> None:
    """Changed: our put no longer stores on the stock node (it cannot prove its id,
    so it is never a store target) and its stores into us are refused; its
    find_value answers still reach us, for every value type."""
    contacts = await ours.bootstrap([("127.0.0.1", port_of(stock))])
    assert [c.node_id for c in contacts] == [stock.node.id]
    assert await ours.ping("127.0.0.1", port_of(stock)) == stock.node.id
    assert not ours.core.table.is_proven(stock.node.id)  # a lookup hint only
    await eventually(  # it was asked to identify itself and never answered
        lambda: ours.stats().get("proofs_failed", 0) >= 1, what="proof timed out"
    )
    # our put: stored here, the stock node not asked
    outcome = await ours.put_outcome("from-us", "hello")
    assert (outcome.here, outcome.remote, outcome.asked, outcome.unproven) == (True, 0, 0, 1)
    assert stock.storage.get(digest("from-us")) is None
    assert await stock.get("from-us") == "hello"  # its find_value reaches us
    # the stock server learnt about us from our requests; its stores on us are refused
    refused = ours.stats().get("stores_refused_token", 0)
    await stock.set("from-stock", b"\x00bin")
    assert ours.stats().get("stores_refused_token", 0) == refused + 1
    assert ours.core.storage.get(digest("from-stock")) is None
    # its find_value answers reach us
    stock.storage[digest("from-stock")] = b"\x00bin"
    assert await ours.get("from-stock") == b"\x00bin"
    for i, value in enumerate((7, 2.5, False, "é")):
        stock.storage[digest(f"typed-{i}")] = value
        assert await ours.get(f"typed-{i}") == value
    # find_peer names only a node that proves the id at its address (anyone can
    # list a sought id at its own address); a stock node cannot, so it is not found.
    assert await ours.find_peer(stock.node.id) is None
    assert ours.stats()["dropped.bad_response"] == 0


async def test_a_stock_server_bootstraps_off_us(stock: Server, ours: Discovery) -> None:
    found = await stock.bootstrap([("127.0.0.1", ours.port)])
    assert [n.id for n in found] == [ours.node_id]
    ok, remote_id = await stock.protocol.ping(("127.0.0.1", ours.port), stock.node.id)
    assert ok and remote_id == ours.node_id
    # find_node through us
    ok, listed = await stock.protocol.find_node(
        ("127.0.0.1", ours.port), stock.node.id, os.urandom(20)
    )
    assert ok and isinstance(listed, list)
    # Changed: a stock set (a store without a token) on us is refused and counted.
    await stock.set("k", "v")
    assert ours.stats().get("stores_refused_token", 0) >= 1
    assert ours.stats().get("stores_accepted", 0) == 0
    assert ours.core.storage.get(digest("k")) is None
    # we verified the stock node (it asked us things): an unproven contact
    await eventually(lambda: len(ours.contacts()) == 1, what="stock server verified")
    assert not ours.core.table.is_proven(stock.node.id)
    # our values: stored here, not on it; it finds them on us (find_value)
    outcome = await ours.put_outcome("ours", 123)
    assert (outcome.here, outcome.remote, outcome.unproven) == (True, 0, 1)
    assert stock.storage.get(digest("ours")) is None
    assert await stock.get("ours") == 123
    # our extra RPCs time out against it without evicting it
    assert await ours.add_provider(os.urandom(20), 4001) == 0
    assert len(ours.contacts()) == 1
    assert ours.stats()["dropped.bad_response"] == 0


async def test_stock_nodes_hold_few_places_in_our_table(ours: Discovery) -> None:
    """Stock nodes cannot prove their ids: our table keeps at most
    max_unproven_per_bucket of them per bucket (with ksize 20 and a handful of
    contacts, the table is one bucket), while proven nodes are not limited."""
    stocks = [Server() for _ in range(5)]
    others = [Discovery(Identity.generate(), CONFIG) for _ in range(3)]
    try:
        for server in stocks:
            await server.listen(0, interface="127.0.0.1")
            server.protocol._wait_timeout = 1
        for node in others:
            await node.listen("127.0.0.1", 0)
        for server in stocks:
            assert await ours.ping("127.0.0.1", port_of(server)) == server.node.id
        for node in others:
            assert await ours.ping("127.0.0.1", node.port) == node.node_id
        table = ours.core.table
        await eventually(
            lambda: all(table.is_proven(n.node_id) for n in others), what="others proven"
        )
        stock_ids = {s.node.id for s in stocks}
        in_table = [c.node_id for c in ours.contacts() if c.node_id in stock_ids]
        assert len(in_table) == CONFIG.max_unproven_per_bucket == 2
        assert not any(table.is_proven(i) for i in in_table)
        assert table.refused["unproven_share"] >= len(stocks) - 2
        assert {c.node_id for c in ours.contacts()} >= {n.node_id for n in others}
    finally:
        for server in stocks:
            server.stop()
        for node in others:
            await node.close()


async def test_mixed_network(ours: Discovery) -> None:
    stocks = [Server() for _ in range(2)]
    others = [Discovery(Identity.generate(), CONFIG) for _ in range(2)]
    try:
        for server in stocks:
            await server.listen(0, interface="127.0.0.1")
            server.protocol._wait_timeout = 1
        for node in others:
            await node.listen("127.0.0.1", 0)
        entry = ("127.0.0.1", ours.port)
        for server in stocks:
            await server.bootstrap([entry])
        for node in others:
            assert await node.bootstrap([entry])
        refused = sum(n.stats().get("stores_refused_token", 0) for n in [ours, *others])
        assert await stocks[0].set("mixed", "network")
        # only the other stock node took it; ours refused it, and read it through them
        assert sum(n.stats().get("stores_refused_token", 0) for n in [ours, *others]) > refused
        for node in [ours, *others]:
            assert await node.get("mixed") == "network"
        outcome = await others[1].put_outcome("mixed-2", "again")
        assert outcome.remote >= 1 and outcome.unproven >= 1  # ours, not the stock nodes
        assert all(s.storage.get(digest("mixed-2")) is None for s in stocks)
        assert await stocks[1].get("mixed-2") == "again"
    finally:
        for server in stocks:
            server.stop()
        for node in others:
            await node.close()
