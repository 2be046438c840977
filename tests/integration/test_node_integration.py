"""Real nodes in one process on 127.0.0.1: join, find each other, stop, rejoin."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from p2pnode import Node, NodeNotRunning, NodeState
from p2pnode.errors import UsageError
from p2pnode.home import read_control
from tests.helpers import eventually, fast_config


async def _all_find_all(nodes: list[Node]) -> bool:
    for a in nodes:
        for b in nodes:
            if a is b:
                continue
            found = await a.discovery.find_peer(b.node_id)
            if found is None or found.port != b.port:
                return False
    return True


async def test_five_nodes_join_find_each_other_and_rejoin_after_restart(
    homes: Callable[[str], Path],
) -> None:
    first = Node(fast_config(homes("n0")))
    await first.start()
    nodes = [first]
    try:
        seed = (("127.0.0.1", first.port),)
        for i in range(1, 5):
            node = Node(fast_config(homes(f"n{i}"), bootstrap=seed))
            await node.start()
            nodes.append(node)
        for node in nodes[1:]:
            await node.wait_joined(timeout=10)
        await eventually(lambda: _all_find_all(nodes), what="every node finds every other")

        # Stop one node; it saves its contacts. Restart it with no bootstrap at all.
        leaver = nodes.pop(3)
        port = leaver.port
        await leaver.stop()
        assert (homes("n3") / "contacts.json").exists()
        back = Node(fast_config(homes("n3")))
        await back.start()
        nodes.append(back)
        assert back.node_id == leaver.node_id, "identity survives a restart"
        assert back.port != 0 and port != 0
        await back.wait_joined(timeout=10)
        assert back.discovery.contacts(), "rejoined through saved contacts"
        await eventually(lambda: _all_find_all(nodes), what="restarted node found again")
    finally:
        for node in nodes:
            await node.stop()


async def test_second_node_on_same_home_fails_clearly(homes: Callable[[str], Path]) -> None:
    async with Node(fast_config(homes("a"))):
        with pytest.raises(UsageError, match="already running"):
            await Node(fast_config(homes("a"))).start()


async def test_unreachable_bootstrap_is_retried_until_it_comes_up(
    homes: Callable[[str], Path],
) -> None:
    # Find a port that is free now; nothing listens there yet.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    joiner = Node(fast_config(homes("j"), bootstrap=(("localhost", port),)))
    await joiner.start()
    try:
        assert not joiner.discovery.contacts()
        seed_config = fast_config(homes("s"))
        seed = Node(type(seed_config)(**{**seed_config.__dict__, "port": port}))
        await seed.start()
        try:
            await joiner.wait_joined(timeout=15)
            await eventually(lambda: bool(seed.discovery.contacts()), what="seed learns joiner")
        finally:
            await seed.stop()
    finally:
        await joiner.stop()


async def test_control_api_requires_token_and_refuses_browsers(
    homes: Callable[[str], Path],
) -> None:
    async with Node(fast_config(homes("c"))) as node:
        info = read_control(node.home)
        assert info.url == node.api_url
        auth = {"Authorization": f"Bearer {info.token}"}
        async with aiohttp.ClientSession() as http:
            async with http.get(info.url + "/v1/id") as resp:
                assert resp.status == 401
            async with http.get(info.url + "/v1/id", headers={"Authorization": "Bearer x"}) as r:
                assert r.status == 401
            headers = {**auth, "Origin": "http://evil.example"}
            async with http.get(info.url + "/v1/id", headers=headers) as resp:
                assert resp.status == 403
            headers = {**auth, "Host": "evil.example"}
            async with http.get(info.url + "/v1/id", headers=headers) as resp:
                assert resp.status == 403
            async with http.get(info.url + "/v1/id", headers=auth) as resp:
                assert resp.status == 200
                body = await resp.json()
                assert body["peer_id"] == node.peer_id
            async with http.post(info.url + "/v1/dht/put", headers=auth, data=b"[1,") as resp:
                assert resp.status == 400
                assert "JSON" in (await resp.json())["error"]


async def test_control_api_on_a_unix_socket_needs_the_token_too(
    homes: Callable[[str], Path],
) -> None:
    """The same API on <home>/api.sock (how a simulator reaches nodes inside
    network namespaces), owner-only, with the same token and Host rules."""
    async with Node(fast_config(homes("u"))) as node:
        info = read_control(node.home)
        assert info.socket == str(node.home / "api.sock")
        assert (node.home / "api.sock").stat().st_mode & 0o777 == 0o600
        auth = {"Authorization": f"Bearer {info.token}"}
        connector = aiohttp.UnixConnector(path=info.socket)
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get(info.url + "/v1/id") as resp:
                assert resp.status == 401
            async with http.get(info.url + "/v1/id", headers=auth) as resp:
                assert resp.status == 200
                assert (await resp.json())["peer_id"] == node.peer_id


async def test_control_file_removed_at_stop(homes: Callable[[str], Path]) -> None:
    async with Node(fast_config(homes("d"))) as node:
        assert (node.home / "control.json").exists()
        assert (node.home / "api.sock").exists()
    assert not (node.home / "control.json").exists()
    assert not (node.home / "api.sock").exists()


async def test_parts_before_start_are_a_typed_error(homes: Callable[[str], Path]) -> None:
    node = Node(fast_config(homes("e")))
    assert node.state is NodeState.NEW and not node.running
    for part in ("identity", "discovery", "peer_host", "exchange", "api_url"):
        with pytest.raises(NodeNotRunning, match="the node has not started"):
            getattr(node, part)
    async with node:
        assert node.state is NodeState.RUNNING and node.status()["state"] == "running"
        node.discovery  # noqa: B018 - no error once started
        with pytest.raises(UsageError, match="started once"):
            await node.start()
    assert node.state is NodeState.STOPPED


async def test_failed_start_leaves_a_failed_node(homes: Callable[[str], Path]) -> None:
    async with Node(fast_config(homes("f"))):
        second = Node(fast_config(homes("f")))
        with pytest.raises(UsageError, match="already running"):
            await second.start()
        assert second.state is NodeState.FAILED
        await second.stop()  # nothing to stop; no error


async def test_node_without_control_api(homes: Callable[[str], Path]) -> None:
    async with Node(fast_config(homes("g"), control_api=False)) as node:
        assert not (node.home / "control.json").exists()
        assert node.describe()["api"] is None
        with pytest.raises(UsageError, match="without a control API"):
            _ = node.api_url
        assert node.discovery.contacts() == []
