"""The metrics collector on a fake stats source: names, types, labels, the
catch-all family, per-CPL buckets, per-node registries."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from p2pnode.control.api import MetricsSnapshot
from p2pnode.control.metrics import (
    NodeCollector,
    NodeMetrics,
    PsutilProcessCollector,
    bucket_sizes,
)
from p2pnode.errors import NodeNotRunning

OWN = bytes(20)


def _id(cpl: int, tail: int = 0) -> bytes:
    """An id sharing exactly ``cpl`` leading bits with OWN (all zeros)."""
    return ((1 << (159 - cpl)) | tail).to_bytes(20, "big")


def snapshot(**over: object) -> MetricsSnapshot:
    snap: MetricsSnapshot = {
        "node_id": OWN,
        "peer_id": "peer-a",
        "version": "9.9.9",
        "uptime": 12.5,
        "joined": True,
        "dht": {
            "rpc_sent.ping": 3,
            "rpc_received.find_node": 7,
            "rpc_timeout.store": 1,
            "dropped.rate_limited": 2,
            "bytes_sent": 1000,
            "contacts": 3,
            "stores_accepted": 4,
            "some_new_counter": 5,
        },
        "dht_contact_ids": [_id(0), _id(2), _id(2, tail=1)],
        "net": {
            "connections_open": 2,
            "connections_handshaking": 1,
            "bytes_in": 4096,
            "idle_closed": 6,
            "write_pauses": 8,
            "evicted_handshakes": 5,
            "rejected_per_subnet": 9,
            "rejected_memory": 11,
            "memory_used": 1 << 20,
        },
        "exchange": {"pieces_served": 10, "bytes_served": 2_621_440, "downloads_active": 1},
    }
    snap.update(over)  # type: ignore[typeddict-item]
    return snap


def scrape(source: Callable[[], MetricsSnapshot]) -> dict[str, Metric]:
    registry = CollectorRegistry()
    registry.register(NodeCollector(source))
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict[str, Metric], family: str, name: str | None = None, **labels: str) -> float:
    found = [
        s.value for s in fams[family].samples if s.name == (name or family) and s.labels == labels
    ]
    assert len(found) == 1, (family, labels, fams[family].samples)
    return found[0]


def test_known_counters_and_gauges_get_their_names_types_and_labels() -> None:
    fams = scrape(snapshot)
    assert fams["p2pnode_dht_rpcs_sent"].type == "counter"
    assert sample(fams, "p2pnode_dht_rpcs_sent", "p2pnode_dht_rpcs_sent_total", type="ping") == 3
    assert (
        sample(
            fams,
            "p2pnode_dht_rpcs_received",
            "p2pnode_dht_rpcs_received_total",
            type="find_node",
        )
        == 7
    )
    assert (
        sample(fams, "p2pnode_dht_rpc_timeouts", "p2pnode_dht_rpc_timeouts_total", type="store")
        == 1
    )
    assert (
        sample(
            fams,
            "p2pnode_dht_dropped_datagrams",
            "p2pnode_dht_dropped_datagrams_total",
            reason="rate_limited",
        )
        == 2
    )
    assert sample(fams, "p2pnode_dht_sent_bytes", "p2pnode_dht_sent_bytes_total") == 1000
    assert fams["p2pnode_dht_routing_table_contacts"].type == "gauge"
    assert sample(fams, "p2pnode_dht_routing_table_contacts") == 3
    stores = "p2pnode_dht_store_requests"
    assert sample(fams, stores, f"{stores}_total", result="accepted") == 4
    assert sample(fams, stores, f"{stores}_total", result="refused") == 0

    assert fams["p2pnode_net_connections"].type == "gauge"
    assert sample(fams, "p2pnode_net_connections", state="open") == 2
    assert sample(fams, "p2pnode_net_connections", state="handshaking") == 1
    assert sample(fams, "p2pnode_net_received_bytes", "p2pnode_net_received_bytes_total") == 4096
    closed = "p2pnode_net_connections_closed"
    assert sample(fams, closed, f"{closed}_total", reason="idle") == 6
    assert sample(fams, closed, f"{closed}_total", reason="slow_reader") == 0
    # the budgets' counters (issue 11) have names of their own
    assert sample(fams, closed, f"{closed}_total", reason="evicted_handshake") == 5
    refused = "p2pnode_net_connections_refused"
    assert sample(fams, refused, f"{refused}_total", reason="per_subnet") == 9
    requests = "p2pnode_net_requests_refused"
    assert sample(fams, requests, f"{requests}_total", reason="memory") == 11
    assert fams["p2pnode_net_memory_used_bytes"].type == "gauge"
    assert sample(fams, "p2pnode_net_memory_used_bytes") == 1 << 20

    assert sample(fams, "p2pnode_exchange_served_pieces", "p2pnode_exchange_served_pieces_total")
    assert sample(fams, "p2pnode_exchange_active_downloads") == 1

    assert sample(fams, "p2pnode_info", version="9.9.9", peer_id="peer-a") == 1
    assert sample(fams, "p2pnode_uptime_seconds") == 12.5
    assert sample(fams, "p2pnode_joined") == 1


def test_counters_not_known_yet_go_to_the_events_family() -> None:
    fams = scrape(snapshot)
    dht_events = "p2pnode_dht_events"
    assert fams[dht_events].type == "counter"
    assert sample(fams, dht_events, f"{dht_events}_total", event="some_new_counter") == 5
    assert sample(fams, "p2pnode_net_events", "p2pnode_net_events_total", event="write_pauses") == 8
    assert "p2pnode_exchange_events" not in fams, "no family without samples"


def test_download_counters_appear_once_the_exchange_reports_them() -> None:
    assert "p2pnode_exchange_fetched_bytes" not in scrape(snapshot)
    exchange = {"pieces_fetched": 3, "bytes_fetched": 3 << 18, "pieces_failed_verification": 1}
    fams = scrape(lambda: snapshot(exchange=exchange))
    fetched = "p2pnode_exchange_fetched_bytes"
    assert fams[fetched].type == "counter"
    assert sample(fams, fetched, f"{fetched}_total") == 3 << 18
    failed = "p2pnode_exchange_verification_failures"
    assert sample(fams, failed, f"{failed}_total") == 1
    assert "p2pnode_exchange_events" not in fams


def test_every_name_is_prefixed_unique_and_counters_end_in_total() -> None:
    registry = CollectorRegistry()
    registry.register(NodeCollector(snapshot))
    text = generate_latest(registry).decode()
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            assert name.startswith("p2pnode_"), name
            assert name.endswith("_total") == (kind == "counter"), line


def test_buckets_by_common_prefix_length() -> None:
    assert bucket_sizes(OWN, []) == []
    assert bucket_sizes(OWN, [_id(0), _id(2), _id(2, tail=5)]) == [1, 0, 2]
    assert bucket_sizes(OWN, [_id(159)]) == [0] * 159 + [1]
    fams = scrape(snapshot)
    buckets = fams["p2pnode_dht_routing_table_bucket_contacts"]
    assert [(s.labels["cpl"], s.value) for s in buckets.samples] == [
        ("0", 1),
        ("1", 0),
        ("2", 2),
    ]


def test_a_node_not_running_yields_no_node_metrics() -> None:
    def stopped() -> MetricsSnapshot:
        raise NodeNotRunning("not started")

    assert scrape(stopped) == {}


def test_each_node_has_its_own_registry_and_the_global_one_is_untouched() -> None:
    a = NodeMetrics(lambda: snapshot(peer_id="a"))
    b = NodeMetrics(lambda: snapshot(peer_id="b"))
    a.api_lookup_seconds.labels("get").observe(0.2)
    text_a, text_b = generate_latest(a.registry).decode(), generate_latest(b.registry).decode()
    assert 'peer_id="a"' in text_a and 'peer_id="b"' not in text_a
    assert 'peer_id="b"' in text_b
    hist = "p2pnode_control_dht_lookup_duration_seconds_count"
    assert f'{hist}{{operation="get"}} 1.0' in text_a
    assert hist not in text_b
    assert "process_cpu_seconds_total" in text_a
    assert "p2pnode_" not in generate_latest(REGISTRY).decode()


def test_psutil_process_collector_gives_the_standard_process_metrics() -> None:
    registry = CollectorRegistry()
    registry.register(PsutilProcessCollector())
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert fams["process_cpu_seconds"].type == "counter"
    assert sample(fams, "process_cpu_seconds", "process_cpu_seconds_total") > 0
    assert sample(fams, "process_resident_memory_bytes") > 2**20
    assert sample(fams, "process_open_fds") > 0
    assert sample(fams, "process_start_time_seconds") > 1e9
