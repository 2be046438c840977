"""GET /metrics on a real node's control API, scraped over HTTP and read with
prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path

import aiohttp
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from p2pnode import Node
from p2pnode.dht import codec
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.home import read_control
from tests.helpers import eventually, fast_config

EXCHANGE = ExchangeConfig(fsync=False, stale_check_interval=0, progress_interval=0.0)


async def scrape(node: Node, **headers: str) -> tuple[int, str, str]:
    info = read_control(node.home)
    sent = {"Authorization": f"Bearer {info.token}", **headers}
    async with aiohttp.ClientSession() as http, http.get(info.url + "/metrics", headers=sent) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


async def families(node: Node) -> dict[str, Metric]:
    status, content_type, text = await scrape(node)
    assert status == 200, text
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Metric], name: str, **labels: str) -> float:
    """The value of the sample ``name{labels}``: a counter's sample ends in _total, a
    histogram's in _bucket, _count or _sum; the family's name does not."""
    base = name
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        base = base.removesuffix(suffix)
    family = fams[base if base in fams else name]
    found = [s.value for s in family.samples if s.name == name and s.labels == labels]
    assert len(found) == 1, f"{name}{labels}: {[(s.name, s.labels) for s in family.samples]}"
    return found[0]


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


async def test_metrics_scraped_with_a_real_parser_move_with_dht_and_exchange_work(
    homes: Callable[[str], Path], tmp_path: Path
) -> None:
    data = os.urandom(300 * 1024)
    blob = _write(tmp_path / "files" / "blob", data)
    seeder = Node(fast_config(homes("seeder"), exchange=EXCHANGE))
    await seeder.start()
    try:
        getter = Node(
            fast_config(homes("getter"), (("127.0.0.1", seeder.port),), exchange=EXCHANGE)
        )
        await getter.start()
        try:
            await getter.wait_joined(timeout=10)
            before = await families(seeder)

            # DHT work through the control API (timed), then an exchange download.
            info = read_control(seeder.home)
            auth = {"Authorization": f"Bearer {info.token}"}
            async with aiohttp.ClientSession() as http:
                # A signed (mutable) record, read back at the address the put gives.
                body = {"key": "metrics-key", "value": "v"}
                async with http.post(info.url + "/v1/dht/put", json=body, headers=auth) as r:
                    assert r.status == 200, await r.text()
                    put = await r.json()
                assert put["remote"] == 1  # the getter proved its id and took it
                params = {"key": put["address"]}
                async with http.get(info.url + "/v1/dht/get", params=params, headers=auth) as r:
                    assert r.status == 200, await r.text()
                    assert (await r.json())["value"] == "v"
            shared = await seeder.exchange.share(blob)
            await eventually(
                lambda: getter.exchange.providers(shared.resource_id), what="provider record"
            )
            got = await getter.exchange.get(shared.resource_id, tmp_path / "copy")
            assert got.size == len(data)

            after = await families(seeder)
            got_fams = await families(getter)
        finally:
            await getter.stop()
    finally:
        await seeder.stop()

    # Names and types, as Prometheus reads them (counters without _total).
    types = {name: f.type for name, f in after.items()}
    for name in (
        "p2pnode_dht_rpcs_sent",
        "p2pnode_dht_rpcs_received",
        "p2pnode_dht_rpc_timeouts",
        "p2pnode_dht_dropped_datagrams",
        "p2pnode_net_received_bytes",
        "p2pnode_net_sent_bytes",
        "p2pnode_net_connections_opened",
        "p2pnode_net_handshake_failures",
        "p2pnode_net_connections_closed",
        "p2pnode_exchange_served_pieces",
        "p2pnode_exchange_served_bytes",
        "process_cpu_seconds",
    ):
        assert types.get(name) == "counter", (name, types.get(name))
    for name in (
        "p2pnode_info",
        "p2pnode_joined",
        "p2pnode_dht_routing_table_contacts",
        "p2pnode_dht_routing_table_bucket_contacts",
        "p2pnode_net_connections",
        "p2pnode_exchange_active_downloads",
        "p2pnode_exchange_resources",
        "process_resident_memory_bytes",
        "process_open_fds",
    ):
        assert types.get(name) == "gauge", (name, types.get(name))
    assert types["p2pnode_control_dht_lookup_duration_seconds"] == "histogram"

    # Labels: each node its own registry, RPC types and connection states.
    assert value(after, "p2pnode_info", version="0.1.0", peer_id=seeder.peer_id) == 1
    assert value(got_fams, "p2pnode_info", version="0.1.0", peer_id=getter.peer_id) == 1
    rpc_types = {s.labels["type"] for s in after["p2pnode_dht_rpcs_sent"].samples}
    assert {"ping", "identify", "find_node", "find_value", "store", "add_provider"} <= rpc_types
    states = {s.labels["state"] for s in after["p2pnode_net_connections"].samples}
    assert states == {"open", "handshaking"}

    # Values moved with the work done.
    def grew(name: str, **labels: str) -> bool:
        return value(after, name, **labels) > value(before, name, **labels)

    assert grew("p2pnode_dht_rpcs_sent_total", type="store")
    # the getter proved its id to the seeder, and the seeder its own to the getter
    assert value(after, "p2pnode_dht_rpcs_sent_total", type="identify") >= 1
    assert value(after, "p2pnode_dht_rpcs_received_total", type="identify") >= 1
    assert grew("p2pnode_dht_rpcs_received_total", type="find_node") or grew(
        "p2pnode_dht_rpcs_received_total", type="add_provider"
    )
    assert grew("p2pnode_dht_sent_bytes_total")
    assert grew("p2pnode_net_sent_bytes_total")
    assert grew("p2pnode_exchange_served_pieces_total")
    assert value(after, "p2pnode_exchange_served_bytes_total") >= len(data)
    assert value(after, "p2pnode_exchange_resources") == 1
    assert value(got_fams, "p2pnode_net_received_bytes_total") >= len(data)
    assert value(got_fams, "p2pnode_net_connections_opened_total", direction="outbound") >= 1
    assert value(after, "p2pnode_net_connections_opened_total", direction="inbound") >= 1
    assert value(got_fams, "p2pnode_exchange_active_downloads") == 0
    assert value(got_fams, "p2pnode_exchange_fetched_bytes_total") == len(data)
    assert value(got_fams, "p2pnode_exchange_fetched_pieces_total") >= 1
    assert value(got_fams, "p2pnode_exchange_verification_failures_total") == 0
    assert value(after, "p2pnode_joined") == 1

    contacts = value(after, "p2pnode_dht_routing_table_contacts")
    assert contacts >= 1
    buckets = after["p2pnode_dht_routing_table_bucket_contacts"].samples
    assert sum(s.value for s in buckets) == contacts
    assert [int(s.labels["cpl"]) for s in buckets] == list(range(len(buckets)))

    hist = "p2pnode_control_dht_lookup_duration_seconds"
    assert value(after, f"{hist}_count", operation="put") == 1
    assert value(after, f"{hist}_count", operation="get") == 1
    assert value(after, f"{hist}_sum", operation="put") > 0
    assert value(after, f"{hist}_bucket", operation="put", le="+Inf") == 1
    assert not (before[hist].samples if hist in before else []), "no lookup before the calls"

    assert value(after, "process_cpu_seconds_total") > 0
    assert value(after, "process_resident_memory_bytes") > 10 * 2**20
    assert value(after, "process_open_fds") > 0


async def test_metrics_need_the_token_and_negotiate_openmetrics(
    homes: Callable[[str], Path],
) -> None:
    async with Node(fast_config(homes("n"))) as node:
        info = read_control(node.home)
        url = info.url + "/metrics"
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as r:
                assert r.status == 401
                assert "p2pnode_" not in await r.text()
            async with http.get(url, headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            async with http.get(url, headers={"Authorization": info.token}) as r:
                assert r.status == 401, "the Bearer scheme is required"
            # A browser page may not read them either.
            cross = {"Authorization": f"Bearer {info.token}", "Origin": "http://evil.example"}
            async with http.get(url, headers=cross) as r:
                assert r.status == 403
        status, content_type, text = await scrape(
            node, Accept="application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        )
        assert status == 200
        assert content_type.startswith("application/openmetrics-text; version=1.0.0")
        assert text.rstrip().endswith("# EOF")
        assert "p2pnode_dht_rpcs_sent_total{type=" in text


async def test_a_store_refused_for_want_of_a_token_shows_in_the_metrics(
    homes: Callable[[str], Path],
) -> None:
    async with Node(fast_config(homes("n"))) as node:
        port = node.discovery.port
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect(("127.0.0.1", port))
            # A stock kademlia store: no token, so refused (answered False).
            stock_store = codec.encode_request(b"m" * 20, "store", [b"n" * 20, b"k" * 20, "v"])
            await loop.sock_sendall(sock, stock_store)
            async with asyncio.timeout(5):
                answer = await loop.sock_recv(sock, 2048)
        reply = codec.decode_datagram(answer, codec.Limits())
        assert isinstance(reply, codec.Response) and reply.payload is False
        assert node.discovery.stats()["stores_refused_token"] == 1
        fams = await families(node)
        refused = [
            s.value
            for s in fams["p2pnode_dht_store_requests"].samples
            if s.name.endswith("_total") and s.labels.get("result") != "accepted"
        ]
        assert sum(refused) == 1
