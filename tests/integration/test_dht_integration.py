"""Real Discovery nodes on 127.0.0.1, port 0, short timeouts; conditions are polled
with a deadline, never waited for with a fixed sleep."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from p2pnode.dht import Contact, DhtConfig, Discovery, ProviderRecord
from p2pnode.dht.records import sign_provider_record
from p2pnode.errors import UsageError
from p2pnode.identity import Identity
from tests.helpers import can_bind, eventually

FAST = DhtConfig(ksize=8, rpc_timeout=0.5, lookup_timeout=5.0)


pytestmark = pytest.mark.usefixtures("no_errors_logged")


@pytest.fixture
async def make_node() -> AsyncIterator[Callable[..., object]]:
    made: list[Discovery] = []

    async def make(config: DhtConfig = FAST, host: str = "127.0.0.1") -> Discovery:
        node = Discovery(Identity.generate(), config)
        await node.listen(host, 0)
        made.append(node)
        return node

    yield make
    for node in made:
        await node.close()


async def network(
    make: Callable[..., object],
    count: int,
    config: DhtConfig = FAST,
    hosts: tuple[str, ...] = (),
) -> list[Discovery]:
    """``count`` nodes bootstrapped off the first; node i listens at ``hosts[i]``
    (127.0.0.1 past the end)."""
    nodes: list[Discovery] = [
        await make(config, hosts[i] if i < len(hosts) else "127.0.0.1")  # type: ignore[misc]
        for i in range(count)
    ]
    first = ("127.0.0.1", nodes[0].port)
    joined = await asyncio.gather(*(node.bootstrap([first]) for node in nodes[1:]))
    assert all(len(contacts) == 1 for contacts in joined)
    return nodes


async def test_listen_and_close() -> None:
    node = Discovery(Identity.generate(), FAST)
    with pytest.raises(UsageError):
        _ = node.port
    port = await node.listen("127.0.0.1", 0)
    assert node.port == port > 0
    assert node.stats()["background_tasks"] == 4  # the maintenance loops (queues: the core)
    await node.close()
    await node.close()  # idempotent
    assert node.stats()["background_tasks"] == 0
    with pytest.raises(UsageError):
        await node.get("x")


async def test_nodes_bootstrap_and_find_each_other(make_node: Callable[..., object]) -> None:
    nodes = await network(make_node, 8)
    for node in nodes:
        others = {n.node_id for n in nodes if n is not node}
        await eventually(
            lambda node=node: len(node.contacts()) >= 3,  # type: ignore[misc]
            timeout=10,
            what="routing tables filled",
        )
        assert {c.node_id for c in node.contacts()} <= others
    for asker in (nodes[1], nodes[7]):
        for target in nodes:
            if target is asker:
                continue
            contact = await asker.find_peer(target.node_id)
            assert contact == Contact(
                target.node_id, "127.0.0.1", target.port, contact.last_seen, contact.rtt
            )
            assert contact.last_seen is not None
    assert await nodes[3].find_peer(os.urandom(20)) is None
    closest = await nodes[2].closest(nodes[5].node_id)
    assert closest[0].node_id == nodes[5].node_id
    assert len(closest) == len({c.node_id for c in closest}) == 7


async def test_put_and_get_across_the_network(make_node: Callable[..., object]) -> None:
    nodes = await network(make_node, 6)
    values: list[str | bytes | int | float | bool] = ["text", b"\x00bytes", 42, 1.5, True]
    for i, value in enumerate(values):
        assert await nodes[i].put(f"key-{i}", value)
    for i, value in enumerate(values):
        reader = nodes[(i + 3) % len(nodes)]
        assert await reader.get(f"key-{i}") == value
    assert await nodes[0].get("missing") is None
    with pytest.raises(UsageError):
        await nodes[0].put("big", b"x" * (FAST.max_value_bytes + 1))
    with pytest.raises(UsageError):
        await nodes[0].put("list", [1, 2])  # type: ignore[arg-type]


async def test_bootstrap_unreachable_returns_empty(make_node: Callable[..., object]) -> None:
    node: Discovery = await make_node()  # type: ignore[misc]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        result = await node.bootstrap(
            [("127.0.0.1", port), ("not-an-ip", 5), ("::1", port), ("127.0.0.1", node.port)]
        )
    assert result == []
    assert node.contacts() == []
    assert await node.ping("127.0.0.1", port) is None


@pytest.mark.skipif(not can_bind("127.0.0.3"), reason="needs 127.0.0.2 and 127.0.0.3")
async def test_providers_found_from_several_nodes(make_node: Callable[..., object]) -> None:
    """The providers are on three hosts (127.0.0.1-3): a holder's answer lists one
    record per host (storage.get_records, a fair sample against one host's flood),
    so providers sharing one address would be found one per answer."""
    hosts = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
    nodes = await network(make_node, 7, hosts=hosts)
    key = os.urandom(20)
    accepted = await asyncio.gather(
        *(n.add_provider(key, 5000 + i) for i, n in enumerate(nodes[:3]))
    )
    assert all(count >= 1 for count in accepted)
    found = await nodes[6].find_providers(key)
    assert {(r.node_id, r.host, r.port) for r in found} == {
        (n.node_id, hosts[i], 5000 + i) for i, n in enumerate(nodes[:3])
    }
    # Records that live on different nodes are all collected (no stop at the first answer).
    # (Signed by their providers: a holder hands out only records that verify.)
    other = os.urandom(20)
    for i, holder in enumerate(nodes[1:5]):
        expires = int(holder.clock.now()) + 3600
        record = sign_provider_record(
            Identity.generate(), other, [("127.0.0.9", 6000 + i)], 1, expires
        )
        assert holder._protocol.providers.add_record(record, "127.0.0.9")  # type: ignore[union-attr]
    found = await nodes[0].find_providers(other)
    assert sorted(r.port for r in found) == [6000, 6001, 6002, 6003]
    assert len(await nodes[0].find_providers(other, want=2)) == 2
    # our own record is included locally
    assert ProviderRecord(nodes[0].node_id, "127.0.0.1", 5000) in await nodes[0].find_providers(key)


async def test_provider_republish_and_remove(make_node: Callable[..., object]) -> None:
    config = DhtConfig(ksize=8, rpc_timeout=0.5, lookup_timeout=5.0, provider_republish=0.2)
    nodes = await network(make_node, 3, config)
    key = os.urandom(20)
    await nodes[0].add_provider(key, 4444)
    late: Discovery = await make_node(config)  # type: ignore[misc]
    await late.bootstrap([("127.0.0.1", nodes[1].port)])

    def late_has_record() -> bool:
        return any(e.node_id == nodes[0].node_id for e in late._protocol.providers.get(key))  # type: ignore[union-attr]

    await eventually(late_has_record, timeout=10, what="republished provider record")
    nodes[0].remove_provider(key)
    assert nodes[0].stats()["announced_keys"] == 0
    assert all(r.node_id != nodes[0].node_id for r in nodes[0]._protocol.providers.get(key))  # type: ignore[union-attr]


async def test_value_republish_reaches_late_nodes(make_node: Callable[..., object]) -> None:
    config = DhtConfig(ksize=8, rpc_timeout=0.5, lookup_timeout=5.0, value_republish=0.2)
    nodes = await network(make_node, 2, config)
    assert await nodes[0].put("k", "v")
    late: Discovery = await make_node(config)  # type: ignore[misc]
    await late.bootstrap([("127.0.0.1", nodes[1].port)])
    await eventually(lambda: late.stats()["stored_values"] == 1, timeout=10, what="republish")


async def test_close_while_a_lookup_runs(make_node: Callable[..., object]) -> None:
    config = DhtConfig(ksize=8, rpc_timeout=30.0, lookup_timeout=60.0)
    node: Discovery = await make_node(config)  # type: ignore[misc]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        lookup = asyncio.create_task(node.bootstrap([("127.0.0.1", silent.getsockname()[1])]))
        await eventually(lambda: node.stats()["outstanding_rpcs"] == 1, what="ping sent")
        await node.close()
        async with asyncio.timeout(2):
            assert await lookup == []


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
async def test_ipv6_dual_stack(make_node: Callable[..., object]) -> None:
    v6: Discovery = await make_node(FAST, "::")
    v4: Discovery = await make_node(FAST, "127.0.0.1")
    only6: Discovery = await make_node(FAST, "::1")
    assert await v4.bootstrap([("127.0.0.1", v6.port)])
    assert await only6.bootstrap([("::1", v6.port)])
    await eventually(lambda: len(v6.contacts()) == 2, what="v6 node verified both")
    assert {c.host for c in v6.contacts()} == {"127.0.0.1", "::1"}
    assert await v4.put("dual", "stack")
    assert await v6.get("dual") == "stack"
    assert await v6.ping("127.0.0.1", v4.port) == v4.node_id


def test_config_checked() -> None:
    bad: dict[str, Any]
    for bad in ({"ksize": 0}, {"max_datagram": 1000}, {"ksize": 80}):
        with pytest.raises(UsageError):  # from DhtConfig itself, or from Discovery
            Discovery(Identity.generate(), DhtConfig(**bad))
    with pytest.raises(UsageError):
        Discovery(b"short", FAST)


async def test_misuse_is_a_usage_error(make_node: Callable[..., object]) -> None:
    unstarted = Discovery(Identity.generate(), FAST)
    with pytest.raises(UsageError):
        await unstarted.closest(os.urandom(20))
    await unstarted.close()  # closing a never started node is fine
    node: Discovery = await make_node()  # type: ignore[misc]
    with pytest.raises(UsageError):
        await node.listen("127.0.0.1", 0)
    for call in (
        node.add_provider(b"short", 4001),
        node.add_provider(os.urandom(20), 0),
        node.find_providers(os.urandom(32)),
        node.find_peer(b""),
        node.closest(b"k" * 19),
        node.put(5, "v"),  # type: ignore[arg-type]
        node.get(None),  # type: ignore[arg-type]
    ):
        with pytest.raises(UsageError):
            await call
    assert await node.ping("localhost", 1) is None
    assert node.contacts() == []
    assert await node.put(b"alone", b"still stored here")
    assert await node.get(b"alone") == b"still stored here"


async def test_lookups_stop_early_instead_of_waiting_on_dead_contacts(
    make_node: Callable[..., object],
) -> None:
    slow = DhtConfig(ksize=8, rpc_timeout=5.0, lookup_timeout=20.0, lookup_stall=0.3)
    nodes = await network(make_node, 8, slow)
    seeker, target = nodes[0], nodes[7]
    key = os.urandom(20)
    assert await target.add_provider(key, 4321) >= 1
    # Half the network dies without a word; the seeker still lists them as contacts.
    for dead in nodes[2:6]:
        await dead.close()
    proto = seeker._protocol
    assert proto is not None
    node = proto.router.node_for(target.node_id)
    assert node is not None
    proto.router.remove_contact(node)  # so find_peer has to look it up
    loop = asyncio.get_running_loop()
    started = loop.time()
    found = await seeker.find_peer(target.node_id)
    assert found is not None and found.port == target.port
    providers = await seeker.find_providers(key, want=16)
    assert [r.port for r in providers] == [4321]
    # Both stopped once they had their answer, not after the dead contacts' timeouts.
    assert loop.time() - started < slow.rpc_timeout


async def test_lookup_stall_follows_the_measured_round_trip(
    make_node: Callable[..., object],
) -> None:
    a, _ = await network(make_node, 2)
    proto = a._protocol
    assert proto is not None
    assert proto.srtt is not None and proto.srtt < 0.1, "bootstrap ping measured the RTT"
    for srtt, stall in ((None, FAST.lookup_stall), (0.001, 0.25), (0.2, 0.8), (5.0, 1.0)):
        proto.srtt = srtt
        assert a._stall(proto) == pytest.approx(stall)
