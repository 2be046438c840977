"""Wire compatibility with a stock ``kademlia.network.Server`` (rpcudp + umsgpack) on
127.0.0.1, both directions: ping, store, find_node, find_value."""

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
    contacts = await ours.bootstrap([("127.0.0.1", port_of(stock))])
    assert [c.node_id for c in contacts] == [stock.node.id]
    assert await ours.ping("127.0.0.1", port_of(stock)) == stock.node.id
    # our STORE reaches it, its find_value answer reaches us
    assert await ours.put("from-us", "hello")
    assert stock.storage.get(digest("from-us")) == "hello"
    # the stock server learnt about us from our requests and stores on us too
    assert await stock.set("from-stock", b"\x00bin")
    assert await ours.get("from-stock") == b"\x00bin"
    for value in (7, 2.5, False, "é"):
        assert await stock.set("typed", value)
        assert await ours.get("typed") == value
    assert await ours.find_peer(stock.node.id) is not None
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
    # stock set stores on us; stock get finds it there (find_value)
    assert await stock.set("k", "v")
    assert ours.stats()["stores_accepted"] >= 1
    stock.storage.data.clear()
    assert await stock.get("k") == "v"
    # we verified the stock node (it asked us things) and can store on it
    await eventually(lambda: len(ours.contacts()) == 1, what="stock server verified")
    assert await ours.put("ours", 123)
    assert stock.storage.get(digest("ours")) == 123
    assert await stock.get("ours") == 123
    # our extra RPCs time out against it without evicting it
    assert await ours.add_provider(os.urandom(20), 4001) == 0
    assert len(ours.contacts()) == 1


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
        assert await stocks[0].set("mixed", "network")
        for node in [ours, *others]:
            assert await node.get("mixed") == "network"
        assert await others[1].put("mixed-2", "again")
        assert await stocks[1].get("mixed-2") == "again"
    finally:
        for server in stocks:
            server.stop()
        for node in others:
            await node.close()
