"""Churn: a third of a 20-node network dies at once, in the middle of transfers.

Twenty real Nodes run in this process on 127.0.0.1 (port 0). Eight resources are
shared, each by two or three providers (each from its own copy of the file). Then
seven nodes are killed at the same moment with ``Node.abort`` (the in-process
equivalent of ``kill -9``: every socket closed at once, TCP connections reset,
nothing saved, nothing said to anyone), among them the node everyone bootstrapped
from, every provider of one resource, and one provider of a resource that is being
downloaded right then (its piece requests are held until the kill, so the download
is provably mid-transfer). Afterwards:

- the download that was in flight completes from the surviving provider;
- every resource that still has a live provider is found by ``exchange.providers``
  (listing at least one live provider) and downloaded by a surviving node that did
  not have it, bytes compared;
- the resource whose providers all died fails cleanly (an error, not a hang).

Rules: port 0 only, no sleep used as synchronisation (events set by the code under
test, or polling with a deadline), every node stopped at the end.

DHT: ``ksize=8`` rather than the default 20, so that a provider record lives on 8
of the 20 nodes rather than on all of them (with k=20 churn could not lose a
record); killing 7 nodes can then remove some holders of a record but never all
of them.

Node i listens on 127.0.0.(i+1), as separate hosts would: a DHT holder lists one
provider record per host in an answer (a fair sample against one address's flood),
so providers sharing 127.0.0.1 would be found one per answer.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from p2pnode.config import NodeConfig
from p2pnode.dht.config import DhtConfig
from p2pnode.errors import P2PError
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.manifest import build_manifest, dht_key
from p2pnode.exchange.messages import GetPiece
from p2pnode.node import Node
from p2pnode.wire.messages import Message
from tests.helpers import can_bind, eventually, fast_config

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("no_errors_logged"),
    pytest.mark.skipif(not can_bind("127.0.0.20"), reason="needs 127.0.0.1-20"),
]

NODES = 20
KILLED = NODES // 3 + 1  # 7: "a third", rounded up
RESOURCES = 8
PIECE = 256 * 1024
DHT = DhtConfig(ksize=8, rpc_timeout=1.0, lookup_timeout=8.0)
EXCHANGE = ExchangeConfig(
    piece_timeout=5.0,
    manifest_timeout=5.0,
    rediscover_attempts=2,
    rediscover_delay=0.2,
    fsync=False,
    io_threads=2,
    stale_check_interval=0,
)

Handler = Callable[[bytes, Message], Awaitable[Message]]


@dataclass
class Resource:
    rid: bytes
    data: bytes
    providers: list[int]  # node indices


MakeNetwork = Callable[[DhtConfig], Awaitable[list[Node]]]


@pytest.fixture
async def make_network(tmp_path: Path) -> AsyncIterator[MakeNetwork]:
    """Starts NODES nodes, all bootstrapped from the first; stops them all at the end
    (``stop`` after ``abort`` does nothing)."""
    nodes: list[Node] = []

    async def make(dht: DhtConfig) -> list[Node]:
        def config(i: int, bootstrap: tuple[tuple[str, int], ...]) -> NodeConfig:
            base = fast_config(tmp_path / f"n{i:02d}", bootstrap=bootstrap)
            return replace(base, host=f"127.0.0.{i + 1}", dht=dht, exchange=EXCHANGE)

        seed = Node(config(0, ()))
        await seed.start()
        nodes.append(seed)
        boot = (("127.0.0.1", seed.port),)
        rest = [Node(config(i, boot)) for i in range(1, NODES)]
        for node in rest:
            await node.start()
            nodes.append(node)
        await asyncio.gather(*(n.wait_joined(timeout=10) for n in rest))
        # Everyone knows at least k others (its lookup of its own id found them).
        await eventually(
            lambda: all(len(n.discovery.contacts()) >= dht.ksize for n in nodes),
            timeout=10,
            what="routing tables to fill",
        )
        return nodes

    try:
        yield make
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


def hold_pieces(inner: Handler, released: asyncio.Event, asked: asyncio.Event) -> Handler:
    """A handler that holds every piece request until ``released`` (forever if it is
    never set: the node dies with the requests in flight)."""

    async def handler(remote: bytes, msg: Message) -> Message:
        if isinstance(msg, GetPiece):
            asked.set()
            await released.wait()
        return await inner(remote, msg)

    return handler


async def test_a_third_of_the_network_dies_at_once(
    make_network: MakeNetwork, tmp_path: Path
) -> None:
    nodes = await make_network(DHT)
    rng = random.Random(4)

    # -- who provides what, and who dies -------------------------------------------
    # Resource 0: every provider dies. Resource 1: downloaded during the kill, from
    # one provider that dies and one that survives. Resources 2..7: random providers
    # (2 or 3), some of which die. The seed (node 0) dies too.
    doomed_all = [1, 2]  # the providers of resource 0
    mid_doomed, mid_survivor, mid_downloader = 3, 10, 11  # resource 1
    killed = {0, *doomed_all, mid_doomed}
    others = [i for i in range(1, NODES) if i not in killed | {mid_survivor, mid_downloader}]
    killed |= set(rng.sample(others, KILLED - len(killed)))
    assert len(killed) == KILLED
    survivors = [i for i in range(NODES) if i not in killed]

    plan: list[list[int]] = [doomed_all, [mid_doomed, mid_survivor]]
    for _ in range(2, RESOURCES):
        plan.append(rng.sample(range(1, NODES), rng.choice([2, 3])))
    for providers in plan[2:]:  # only resource 0 may lose every provider
        if not set(providers) - killed:
            providers.append(next(i for i in survivors if i not in providers and i))
    # and at least one of the random ones loses a provider but keeps one
    if not any(set(p) & killed and set(p) - killed for p in plan[2:]):
        plan[2] = [next(iter(killed - {0})), survivors[1]]

    # -- share ---------------------------------------------------------------------
    resources: list[Resource] = []
    for r, providers in enumerate(plan):
        data = os.urandom(rng.randrange(2, 7) * PIECE + rng.randrange(PIECE))
        rid = b""
        for i in providers:
            src = tmp_path / f"src-n{i:02d}" / f"res{r}.bin"
            src.parent.mkdir(exist_ok=True)
            src.write_bytes(data)
            info = await nodes[i].exchange.share(src)
            assert not rid or info.resource_id == rid
            rid = info.resource_id
        resources.append(Resource(rid, data, providers))

    async def listed(res: Resource, asker: Node, only_live: bool) -> bool:
        wanted = {nodes[i].node_id for i in res.providers if not only_live or i not in killed}
        found = {p.node_id for p in await asker.exchange.providers(res.rid)}
        return bool(wanted & found) if only_live else wanted <= found

    for res in resources:
        asker = nodes[survivors[-1]]
        await eventually(lambda res=res, a=asker: listed(res, a, False), timeout=10)

    # -- a download in flight when the kill comes ----------------------------------
    released = asyncio.Event()  # set after the kill: the survivor then serves
    never = asyncio.Event()  # never set: the doomed provider dies holding requests
    asked = {mid_doomed: asyncio.Event(), mid_survivor: asyncio.Event()}
    for i, gate in ((mid_doomed, never), (mid_survivor, released)):
        nodes[i].peer_host.set_handler(hold_pieces(nodes[i].exchange.handle, gate, asked[i]))
    mid = resources[1]
    mid_dest = tmp_path / "mid.bin"
    in_flight = asyncio.create_task(nodes[mid_downloader].exchange.get(mid.rid, mid_dest))
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*(e.wait() for e in asked.values()))
        assert not in_flight.done()

        # -- the kill: all at once -------------------------------------------------
        await asyncio.gather(*(nodes[i].abort() for i in killed))
        released.set()
        async with asyncio.timeout(20):
            got = await in_flight
    finally:
        if not in_flight.done():
            in_flight.cancel()
            await asyncio.gather(in_flight, return_exceptions=True)
    assert got.state == "complete" and mid_dest.read_bytes() == mid.data
    live = [n for i, n in enumerate(nodes) if i not in killed]
    assert all(n.status()["joined"] for n in live)

    # -- every resource with a live provider: found and downloaded -----------------
    jobs: list[tuple[int, int]] = []
    for r, res in enumerate(resources):
        holders = set(res.providers) | ({mid_downloader} if r == 1 else set())
        if not set(res.providers) - killed:
            continue
        # A survivor that neither provides nor already has it; each job its own.
        taken = {j for j, _ in jobs}
        downloader = next(i for i in survivors if i not in holders | taken)
        jobs.append((downloader, r))

    async def fetch(downloader: int, r: int) -> None:
        res = resources[r]
        asker = nodes[downloader]
        found = await asker.exchange.providers(res.rid)
        live_ids = {nodes[i].node_id for i in res.providers if i not in killed}
        assert live_ids & {p.node_id for p in found}, f"resource {r}: no live provider listed"
        dest = tmp_path / f"after-n{downloader:02d}-res{r}.bin"
        got = await asker.exchange.get(res.rid, dest)
        assert got.state == "complete"
        assert dest.read_bytes() == res.data, f"resource {r}"

    assert len(jobs) == RESOURCES - 1  # all but resource 0
    async with asyncio.timeout(30):
        await asyncio.gather(*(fetch(d, r) for d, r in jobs))

    # -- the resource nobody alive provides: a clean failure, in bounded time ------
    orphan = resources[0]
    asker = nodes[survivors[0]]
    with pytest.raises(P2PError):
        async with asyncio.timeout(20):
            await asker.exchange.get(orphan.rid, tmp_path / "orphan.bin")
    assert not (tmp_path / "orphan.bin").exists()


def distance(node: Node, key: bytes) -> int:
    return int.from_bytes(node.node_id, "big") ^ int.from_bytes(key, "big")


async def test_live_providers_stay_findable_when_every_record_holder_dies(
    make_network: MakeNetwork, tmp_path: Path
) -> None:
    """Churn at its worst for one resource: the k nodes that hold its provider
    records die at once; its two providers (the nodes farthest from its key) live.
    The providers notice their holders are gone and announce again."""
    dht = replace(DHT, ksize=4, provider_check_interval=0.5)
    nodes = await make_network(dht)
    src = tmp_path / "shared.bin"
    data = os.urandom(2 * PIECE + 5)
    src.write_bytes(data)
    manifest, _ = await asyncio.to_thread(build_manifest, src)
    key = dht_key(manifest.resource_id)
    by_distance = sorted(range(1, NODES), key=lambda i: distance(nodes[i], key))
    providers = by_distance[-2:]
    for i in providers:
        info = await nodes[i].exchange.share(src)
        assert info.resource_id == manifest.resource_id
    holders = [
        i
        for i, node in enumerate(nodes)
        if i not in providers and node.discovery.stats()["provider_records"] > 0
    ]
    assert len(holders) >= dht.ksize, holders
    await asyncio.gather(*(nodes[i].abort() for i in holders))

    askers = [i for i in range(NODES) if i not in holders and i not in providers][:3]
    live = {nodes[i].node_id for i in providers}

    async def finds(i: int) -> bool:
        found = await nodes[i].exchange.providers(manifest.resource_id)
        return bool(live & {p.node_id for p in found})

    async def all_find() -> bool:
        return all(await asyncio.gather(*(finds(i) for i in askers)))

    await eventually(all_find, timeout=20, interval=0.2, what="askers find a live provider")
    # (An asker may find a provider itself before the providers' next holder check:
    # wait for the re-announcement rather than race it.)
    await eventually(
        lambda: sum(n.discovery.stats().get("provider_reannounced", 0) for n in nodes) >= 1,
        timeout=10,
        what="providers announce again",
    )
