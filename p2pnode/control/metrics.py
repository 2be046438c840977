"""Prometheus metrics of one node, served by the control API at ``GET /metrics``.

The data path pays nothing: :class:`NodeCollector` reads the counters the parts
already keep (``Discovery.stats()``, ``PeerHost.stats()``, ``Exchange.stats()``,
``Services.stats()`` and the per-service figures of ``Node.services()``, through
``NodeAPI.metrics_snapshot``) when Prometheus scrapes, and turns them into
metric families. The one metric updated as things happen is the duration of the
DHT lookups made through the control API (a histogram, per API call).

Names follow Prometheus' conventions (and kubo's): the ``p2pnode_`` prefix, a
subsystem (``dht``, ``net``, ``exchange``, ``services``, ``portmap``), base units
(seconds, bytes) in the name, ``_total`` on counters. The process figures are the
standard ``process_*`` ones. A counter that a part adds later and this module does
not know yet is not lost: it is
exported as ``p2pnode_<subsystem>_events_total{event="<its name>"}``.

Each node has its own :class:`~prometheus_client.CollectorRegistry` (several nodes
run in one process in tests and simulations); the global registry is never used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from p2pnode.control.api import MetricsSnapshot
from p2pnode.errors import P2PError
from p2pnode.services.messages import ServiceErrorCode

log = logging.getLogger(__name__)

NAMESPACE = "p2pnode"
ID_BITS = 160
# DHT lookups on a LAN take milliseconds; across the internet, up to seconds.
# What ServicesCore.admit refuses with; the other codes are outcomes of admitted calls.
_ADMISSION_CODES = (
    ServiceErrorCode.NOT_FOUND,
    ServiceErrorCode.BAD_REQUEST,
    ServiceErrorCode.TOO_LARGE,
    ServiceErrorCode.OVERLOADED,
)
LOOKUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class _Family:
    """One exported metric family: ``p2pnode_<subsystem>_<name>``."""

    name: str
    help: str
    label: str | None = None  # the label its keys differ by, if any
    gauge: bool = False


@dataclass
class _Subsystem:
    """How the keys of one part's ``stats()`` map to metric families.

    ``keys``: a stats key -> (family, label value or None); ``prefixes``: keys
    ``<prefix><value>`` -> (family, label value); any other key is a counter of the
    catch-all ``events`` family. Keys named here are exported even when the part
    has not counted them yet (a Counter holds a key only once it is incremented);
    ``optional`` keys only when the part reports them (counters it may not keep)."""

    name: str
    keys: dict[str, tuple[_Family, str | None]]
    prefixes: dict[str, _Family] = field(default_factory=dict)
    optional: dict[str, tuple[_Family, str | None]] = field(default_factory=dict)

    def events(self) -> _Family:
        return _Family(
            "events_total",
            f"Other {self.name} counters, by their internal name (see the README)",
            label="event",
        )


def _one(family: _Family, *keys: tuple[str, str]) -> dict[str, tuple[_Family, str | None]]:
    """Keys that share a labelled family: (stats key, label value) pairs."""
    return {key: (family, value) for key, value in keys}


def _plain(*families: tuple[str, str, str, bool]) -> dict[str, tuple[_Family, str | None]]:
    """Keys with a family each: (stats key, name, help, gauge)."""
    return {key: (_Family(name, text, gauge=gauge), None) for key, name, text, gauge in families}


_DHT = _Subsystem(
    "dht",
    keys={
        **_plain(
            ("datagrams_sent", "datagrams_sent_total", "UDP datagrams sent", False),
            ("datagrams_received", "datagrams_received_total", "UDP datagrams received", False),
            ("bytes_sent", "sent_bytes_total", "Bytes of UDP datagrams sent", False),
            ("bytes_received", "received_bytes_total", "Bytes of UDP datagrams received", False),
            ("responses_received", "responses_received_total", "RPC answers received", False),
            ("failures", "rpc_failures_total", "RPCs to a contact that failed", False),
            ("evictions", "evictions_total", "Contacts evicted after failed RPCs", False),
            ("contacts", "routing_table_contacts", "Contacts in the routing table", True),
            ("stored_values", "stored_values", "Values stored for the network", True),
            ("provider_records", "provider_records", "Provider records held", True),
            ("provider_keys", "provider_keys", "Keys with provider records held", True),
            ("outstanding_rpcs", "outstanding_rpcs", "RPCs sent and not yet answered", True),
            ("own_values", "own_values", "Values this node put and republishes", True),
            ("announced_keys", "announced_keys", "Keys this node announces", True),
            ("welcome_queue", "welcome_queue", "New contacts waiting to be sent values", True),
            ("verify_queue", "verify_queue", "Provider records waiting to be verified", True),
            ("verify_in_flight", "verify_in_flight", "Provider verifications running", True),
            ("head_pings", "head_pings", "Pings of full buckets' heads in flight", True),
            (
                "rate_limited_sources",
                "rate_limited_sources",
                "Sources tracked by the limiter",
                True,
            ),
            ("background_tasks", "background_tasks", "Background tasks of the DHT", True),
        ),
        **_one(
            _Family("store_requests_total", "STORE requests received, by result", label="result"),
            ("stores_accepted", "accepted"),
            ("stores_refused", "refused"),
            ("stores_refused_token", "refused_token"),
        ),
        **_one(
            _Family(
                "provider_requests_total", "ADD_PROVIDER requests received, by result", "result"
            ),
            ("providers_accepted", "accepted"),
            ("providers_refused", "refused"),
            ("providers_refused_token", "refused_token"),
            ("providers_refused_foreign_address", "refused_foreign_address"),
            ("providers_refused_bad_record", "refused_bad_record"),
            ("providers_refused_id_mismatch", "refused_id_mismatch"),
            ("providers_refused_bad_signature", "refused_bad_signature"),
            ("providers_refused_expired", "refused_expired"),
            ("providers_refused_too_far_future", "refused_too_far_future"),
        ),
        **_one(
            _Family("id_proofs_total", "Contacts asked to prove their id, by outcome", "result"),
            ("proofs_started", "started"),
            ("proofs_ok", "ok"),
            ("proofs_failed", "failed"),
            ("proofs_dropped", "dropped"),
        ),
        **_plain(
            (
                "identify_answered",
                "identify_answered_total",
                "Proofs of our id sent (identify answers)",
                False,
            ),
            (
                "unproven_contacts",
                "unproven_contacts",
                "Contacts that did not prove their id",
                True,
            ),
        ),
    },
    prefixes={
        "rpc_sent.": _Family("rpcs_sent_total", "RPC requests sent, by type", label="type"),
        "rpc_received.": _Family(
            "rpcs_received_total", "RPC requests received, by type", label="type"
        ),
        "rpc_timeout.": _Family(
            "rpc_timeouts_total", "RPC requests sent that timed out, by type", label="type"
        ),
        "dropped.": _Family(
            "dropped_datagrams_total", "Datagrams received and dropped, by reason", label="reason"
        ),
        "table_refused.": _Family(
            "table_refusals_total", "Contacts the routing table refused, by rule", label="reason"
        ),
        "provider_records_dropped.": _Family(
            "provider_records_dropped_total",
            "Provider records in answers that did not verify, by reason",
            label="reason",
        ),
        "records_rejected.": _Family(
            "records_rejected_total",
            "Values found by record lookups that did not verify, by reason",
            label="reason",
        ),
    },
)

_CONNECTIONS = _Family("connections", "Peer connections, by state", gauge=True, label="state")
_OPENED = _Family("connections_opened_total", "Peer connections begun, by direction", "direction")
_HANDSHAKE_FAILED = _Family(
    "handshake_failures_total", "Noise handshakes that failed, by reason", label="reason"
)
_CLOSED = _Family(
    "connections_closed_total", "Connections closed by this node, by reason", label="reason"
)
_REFUSED = _Family(
    "connections_refused_total", "Connections refused over a limit, by limit", label="reason"
)
_REQUESTS_REFUSED = _Family(
    "requests_refused_total", "Peer requests refused, by reason", label="reason"
)
_CANCELS = _Family(
    "request_cancels_total",
    "Request cancels (the mux's): sent, received (a handler stopped), too late "
    "(the request was answered), bogus (more than the peer's requests), and answers "
    "that crossed our cancel",
    label="event",
)
_MESSAGE_ERRORS = _Family(
    "message_errors_total", "Messages that could not be handled, by reason", label="reason"
)

_NET = _Subsystem(
    "net",
    keys={
        **_one(
            _CONNECTIONS, ("connections_open", "open"), ("connections_handshaking", "handshaking")
        ),
        **_one(_OPENED, ("connections_accepted", "inbound"), ("connections_dialed", "outbound")),
        **_one(
            _HANDSHAKE_FAILED, ("handshake_failures", "error"), ("handshake_timeouts", "timeout")
        ),
        **_one(
            _CLOSED,
            ("idle_closed", "idle"),
            ("evicted_idle", "evicted_idle"),
            ("evicted_idle_inbound", "evicted_idle_inbound"),
            ("evicted_handshakes", "evicted_handshake"),
            ("closed_memory", "memory"),
            ("closed_slow_reader", "slow_reader"),
            ("closed_misbehaving", "misbehaving"),
            ("tampered_chunks", "tampered"),
            ("oversized_frames", "oversized_frame"),
            ("protocol_errors", "protocol_error"),
        ),
        **_one(
            _REFUSED,
            ("rejected_max_connections", "max_connections"),
            ("rejected_max_connections_out", "max_connections_out"),
            ("rejected_per_ip", "per_ip"),
            ("rejected_per_subnet", "per_subnet"),
            ("rejected_handshakes_per_subnet", "handshakes_per_subnet"),
        ),
        **_one(
            _REQUESTS_REFUSED,
            ("rate_limited", "rate_limited"),
            ("rejected_busy", "busy"),
            ("rejected_memory", "memory"),
        ),
        **_one(
            _MESSAGE_ERRORS,
            ("unknown_messages", "unknown"),
            ("bad_messages", "bad"),
            ("unexpected_responses", "unexpected_response"),
            ("duplicate_requests", "duplicate_request"),
            ("remote_errors", "remote_error"),
            ("handler_errors", "handler_error"),
        ),
        **_one(
            _CANCELS,
            ("cancels_sent", "sent"),
            ("cancels_received", "received"),
            ("cancels_too_late", "too_late"),
            ("cancels_bogus", "bogus"),
            ("answers_after_cancel", "answer_after_cancel"),
        ),
        **_plain(
            ("bytes_in", "received_bytes_total", "Bytes received on peer connections", False),
            ("bytes_out", "sent_bytes_total", "Bytes sent on peer connections", False),
            ("frames_in", "frames_received_total", "Frames received", False),
            ("frames_out", "frames_sent_total", "Frames sent", False),
            ("requests_out", "requests_sent_total", "Requests sent to peers", False),
            ("requests_in", "requests_received_total", "Requests received from peers", False),
            ("request_timeouts", "request_timeouts_total", "Requests that got no answer", False),
            ("dial_failures", "dial_failures_total", "Dials that failed", False),
            ("connections_inbound", "inbound_connections", "Inbound connections", True),
            ("connections_outbound", "outbound_connections", "Outbound connections", True),
            ("handshakes_inbound", "inbound_handshakes", "Inbound handshakes under way", True),
            ("memory_used", "memory_used_bytes", "Bytes held for peers (memory budget)", True),
            ("memory_peak", "memory_peak_bytes", "Most bytes held for peers so far", True),
            ("memory_budget", "memory_budget_bytes", "The node-wide memory budget", True),
            ("heap_trims", "heap_trims_total", "Heap given back after closed connections", False),
            ("handlers_inflight", "handlers_in_flight", "Request handlers running", True),
            ("peers", "connected_peers", "Peers with a connection", True),
        ),
    },
)

_EXCHANGE = _Subsystem(
    "exchange",
    keys={
        **_plain(
            ("pieces_served", "served_pieces_total", "Pieces sent to peers", False),
            ("bytes_served", "served_bytes_total", "Bytes of pieces sent to peers", False),
            ("stale", "stale_resources_total", "Served resources found changed on disk", False),
            ("downloads_active", "active_downloads", "Downloads running", True),
            ("resources", "resources", "Resources in the store (any state)", True),
            ("piece_requests_queued", "queued_piece_requests", "Piece requests queued", True),
        ),
        **_one(
            _Family("piece_requests_refused_total", "Piece requests refused, by reason", "reason"),
            ("rejected_busy", "busy"),
        ),
    },
    # The download side: exported once Exchange.stats() reports these counters.
    optional=_plain(
        ("pieces_fetched", "fetched_pieces_total", "Pieces downloaded and verified", False),
        ("bytes_fetched", "fetched_bytes_total", "Bytes of pieces downloaded and verified", False),
        (
            "pieces_failed_verification",
            "verification_failures_total",
            "Pieces downloaded that failed verification",
            False,
        ),
    ),
)


_REFUSED_CALLS = _Family(
    "refused_total", "Calls refused at admission, all services, by reason", label="reason"
)

_SERVICES = _Subsystem(
    "services",
    keys={
        # The codes admission refuses with (services/core.py); others come by prefix.
        **_one(
            _REFUSED_CALLS,
            *((f"refused_{code}", str(code)) for code in _ADMISSION_CODES),
        ),
        **_plain(
            (
                "in_flight",
                "running_calls",
                "Calls and streams running, all services (what max_concurrent bounds)",
                True,
            ),
            ("services", "served", "Services this node serves", True),
            ("streams_open", "streams_open", "Streams open to callers", True),
        ),
    },
    prefixes={"refused_": _REFUSED_CALLS},
)


_RELAY_REFUSED = _Family(
    "refused_total", "Reservations and circuits the relay refused, by limit", label="reason"
)
_RELAY_ENDED = _Family("circuits_ended_total", "Relayed circuits ended, by reason", label="reason")
_RELAY_CIRCUITS = _Family("circuits", "Relayed circuits open, by state", label="state", gauge=True)
_RELAY = _Subsystem(
    "relay",
    keys={
        **_plain(
            ("enabled", "enabled", "1 while this node offers a relay", True),
            ("reservations", "reservations", "Reservations held on this relay", True),
            ("bytes_relayed", "relayed_bytes_total", "Bytes the relay spliced", False),
            ("client_reservations_held", "client_reservations", "Our reservations", True),
        ),
        **_one(_RELAY_CIRCUITS, ("circuits_pending", "pending"), ("circuits_live", "live")),
    },
    prefixes={"refused.": _RELAY_REFUSED, "ended.": _RELAY_ENDED},
)


def _service_families(served: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
    """Per-service figures (``Node.services()``), labelled by service name: the
    operator chooses the names, so their number stays small."""
    prefix = f"{NAMESPACE}_services"
    calls = CounterMetricFamily(
        f"{prefix}_calls",
        "Calls ended on this node, by service and result: ok, or the error code "
        "(refusals at admission included)",
        labels=["service", "result"],
    )
    admitted = CounterMetricFamily(
        f"{prefix}_admitted", "Calls admitted (past the limits), by service", labels=["service"]
    )
    errors = CounterMetricFamily(
        f"{prefix}_errors",
        "Calls refused or failed, by service and error code",
        labels=["service", "code"],
    )
    in_flight = GaugeMetricFamily(
        f"{prefix}_in_flight", "Calls and streams running, by service", labels=["service"]
    )
    p50 = GaugeMetricFamily(
        f"{prefix}_latency_p50_seconds",
        "Median duration of the last successful calls, by service",
        labels=["service"],
    )
    announced = GaugeMetricFamily(
        f"{prefix}_announced_to_nodes",
        "DHT nodes that took the last announcement, by service",
        labels=["service"],
    )
    for service in served:
        name = str(service["name"])
        admitted.add_metric([name], service.get("calls", 0))
        calls.add_metric([name, "ok"], service.get("ok", 0))
        counted = service.get("errors", {})
        # Every code from the start (at zero): rate() needs the series before its first error.
        for code in dict.fromkeys([*map(str, ServiceErrorCode), *counted]):
            calls.add_metric([name, code], counted.get(code, 0))
            errors.add_metric([name, code], counted.get(code, 0))
        in_flight.add_metric([name], service.get("in_flight", 0))
        if service.get("p50_ms") is not None:  # no successful call yet: no sample
            p50.add_metric([name], service["p50_ms"] / 1000)
        announced.add_metric([name], service.get("announced_to", 0))
    yield from (calls, admitted, errors, in_flight, p50, announced)


_NAT = _Subsystem(
    "nat",
    keys={
        **_plain(
            (
                "reachability_tcp",
                "reachability_tcp",
                "TCP reachability verdict: 1 public, 0 private, -1 unknown",
                True,
            ),
            (
                "reachability_udp",
                "reachability_udp",
                "UDP reachability verdict: 1 public, 0 private, -1 unknown",
                True,
            ),
            ("probes_started", "probes_total", "AutoNAT dial-back probes we asked for", False),
            (
                "verdict_changes",
                "verdict_changes_total",
                "Reachability verdict changes",
                False,
            ),
            (
                "dial_backs_served",
                "dial_backs_served_total",
                "Dial-backs this node made for others",
                False,
            ),
        ),
        **_one(
            _Family(
                "dial_back_refusals_total", "Dial-back requests refused, by reason", label="reason"
            ),
            ("refused_rate", "rate"),
            ("refused_concurrency", "concurrency"),
            ("refused_not_direct", "not_direct"),
            ("refused_no_address", "no_address"),
            ("refused_own_limits", "own_limits"),
        ),
    },
)


_PORTMAP_ATTEMPTS = _Family(
    "attempts_total",
    "Port mapping attempts (find a router, map TCP and UDP), by outcome",
    label="outcome",
)
_PORTMAP_RENEWALS = _Family("renewals_total", "Port mapping renewals, by outcome", label="outcome")
_PORTMAP_REMOVALS = _Family(
    "removals_total", "Port mappings removed at stop, by outcome", label="outcome"
)
_PORTMAP = _Subsystem(
    "portmap",
    keys={
        **_one(_PORTMAP_ATTEMPTS, ("attempts_mapped", "mapped"), ("attempts_failed", "failed")),
        **_one(_PORTMAP_RENEWALS, ("renewals_ok", "ok"), ("renewals_failed", "failed")),
        **_one(
            _PORTMAP_REMOVALS,
            ("removals", "ok"),
            ("removals_failed", "failed"),
            ("removals_timed_out", "timed_out"),
        ),
        **_plain(
            ("leases_expired", "leases_expired_total", "Mappings lost (renewal failed)", False),
        ),
    },
    optional={"attempts": (_Family("started_total", "Port mapping attempts started"), None)},
)


def _families(sub: _Subsystem, stats: dict[str, int]) -> Iterator[Metric]:
    """The metric families of one part's stats, known keys first."""
    values: dict[_Family, list[tuple[str | None, float]]] = {}
    for key, (family, label) in sub.keys.items():
        values.setdefault(family, []).append((label, stats.get(key, 0)))
    events = sub.events()
    for key, value in stats.items():
        if key in sub.keys:
            continue
        if key in sub.optional:
            family, label = sub.optional[key]
            values.setdefault(family, []).append((label, value))
            continue
        for prefix, family in sub.prefixes.items():
            if key.startswith(prefix):
                values.setdefault(family, []).append((key[len(prefix) :], value))
                break
        else:
            values.setdefault(events, []).append((key, value))
    for family, samples in values.items():
        yield _metric(f"{NAMESPACE}_{sub.name}_{family.name}", family, samples)


def _metric(name: str, family: _Family, samples: list[tuple[str | None, float]]) -> Metric:
    labels = [family.label] if family.label else []
    metric: GaugeMetricFamily | CounterMetricFamily
    if family.gauge:
        metric = GaugeMetricFamily(name, family.help, labels=labels)
    else:
        # The client adds the _total suffix back on the sample.
        metric = CounterMetricFamily(name.removesuffix("_total"), family.help, labels=labels)
    for label, value in samples:
        metric.add_metric([label] if label is not None else [], value)
    return metric


def bucket_sizes(own_id: bytes, contact_ids: Iterable[bytes]) -> list[int]:
    """Contacts per common-prefix length with ``own_id`` (0 = differs in the first
    bit), from 0 to the longest prefix present: libp2p's per-CPL bucket view."""
    mine = int.from_bytes(own_id, "big")
    counts: dict[int, int] = {}
    for node_id in contact_ids:
        cpl = ID_BITS - (int.from_bytes(node_id, "big") ^ mine).bit_length()
        counts[cpl] = counts.get(cpl, 0) + 1
    return [counts.get(cpl, 0) for cpl in range(max(counts) + 1)] if counts else []


class NodeCollector(Collector):
    """Reads a node's counters at scrape time and yields them as metric families."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        try:
            snap = self._snapshot()
        except P2PError as exc:  # stopping: its parts are gone
            log.debug("no node metrics: %s", exc)
            return []
        return list(self._node_metrics(snap))

    def _node_metrics(self, snap: MetricsSnapshot) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            f"{NAMESPACE}_info",
            "Node identity and version (always 1)",
            labels=["version", "peer_id"],
        )
        info.add_metric([snap["version"], snap["peer_id"]], 1)
        yield info
        yield GaugeMetricFamily(
            f"{NAMESPACE}_uptime_seconds", "Seconds since the node started", value=snap["uptime"]
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_joined",
            "1 once the node has joined the network (or is its first node)",
            value=1 if snap["joined"] else 0,
        )
        yield from _families(_DHT, snap["dht"])
        buckets = GaugeMetricFamily(
            f"{NAMESPACE}_dht_routing_table_bucket_contacts",
            "Routing-table contacts by common prefix length with this node's id",
            labels=["cpl"],
        )
        for cpl, size in enumerate(bucket_sizes(snap["node_id"], snap["dht_contact_ids"])):
            buckets.add_metric([str(cpl)], size)
        yield buckets
        yield from _families(_NET, snap["net"])
        yield from _families(_EXCHANGE, snap["exchange"])
        # .get: a snapshot built before services existed (tests) still scrapes.
        yield from _families(_SERVICES, snap.get("services", {}))
        yield from _families(_RELAY, snap.get("relay", {}))
        yield from _service_families(snap.get("services_served", []))
        yield from _families(_NAT, snap.get("nat", {}))
        # Only when port mapping runs (not on loopback, not with --no-port-mapping).
        if snap.get("portmap"):
            yield from _families(_PORTMAP, snap["portmap"])


class PsutilProcessCollector(Collector):
    """The standard ``process_*`` metrics through psutil, where there is no /proc
    for prometheus-client's own ProcessCollector (macOS, Windows)."""

    def collect(self) -> Iterable[Metric]:
        proc = psutil.Process()
        with proc.oneshot():
            cpu = proc.cpu_times()
            memory = proc.memory_info()
            started = proc.create_time()
            fds = proc.num_fds() if hasattr(proc, "num_fds") else None
        out: list[Metric] = [
            CounterMetricFamily(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                value=cpu.user + cpu.system,
            ),
            GaugeMetricFamily(
                "process_resident_memory_bytes", "Resident memory size in bytes.", memory.rss
            ),
            GaugeMetricFamily(
                "process_virtual_memory_bytes", "Virtual memory size in bytes.", memory.vms
            ),
            GaugeMetricFamily(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                started,
            ),
        ]
        if fds is not None:
            out.append(
                GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", fds)
            )
        return out


@dataclass
class NodeMetrics:
    """One node's registry: its collector, the process metrics and the histogram of
    the DHT lookups the control API makes."""

    snapshot: Callable[[], MetricsSnapshot]
    registry: CollectorRegistry = field(init=False)
    api_lookup_seconds: Histogram = field(init=False)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(self.snapshot))
        if os.path.exists("/proc/self/stat"):
            ProcessCollector(registry=self.registry)
        else:
            self.registry.register(PsutilProcessCollector())
        self.api_lookup_seconds = Histogram(
            "control_dht_lookup_duration_seconds",
            "Duration of the DHT lookups made through the control API, by operation",
            labelnames=["operation"],
            namespace=NAMESPACE,
            buckets=LOOKUP_BUCKETS,
            registry=self.registry,
        )
