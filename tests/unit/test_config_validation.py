"""Configs check themselves when built: a bad value is a UsageError naming the field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2pnode.config import NodeConfig
from p2pnode.dht.config import DhtConfig
from p2pnode.errors import UsageError
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.net.config import NetLimits

HOME = Path("/nonexistent/p2pnode-home")  # never touched: building a config does no I/O


def test_defaults_are_valid() -> None:
    for config in (DhtConfig(), NetLimits(), ExchangeConfig(), NodeConfig(home=HOME)):
        assert dataclasses.replace(config) == config


@pytest.mark.parametrize(
    ("cls", "changes", "field"),
    [
        (DhtConfig, {"ksize": 0}, "DhtConfig.ksize"),
        (DhtConfig, {"alpha": -1}, "DhtConfig.alpha"),
        (DhtConfig, {"max_failures": 0}, "DhtConfig.max_failures"),
        (DhtConfig, {"rpc_timeout": 0.0}, "DhtConfig.rpc_timeout"),
        (DhtConfig, {"lookup_timeout": -1.0}, "DhtConfig.lookup_timeout"),
        (DhtConfig, {"value_ttl": float("nan")}, "DhtConfig.value_ttl"),
        (DhtConfig, {"refresh_interval": -1.0}, "DhtConfig.refresh_interval"),
        (DhtConfig, {"request_rate": 0.0}, "DhtConfig.request_rate"),
        (DhtConfig, {"request_burst": 0.5}, "DhtConfig.request_burst"),
        (DhtConfig, {"max_providers_per_response": 0}, "DhtConfig.max_providers_per_response"),
        (DhtConfig, {"verify_queue_max": -1}, "DhtConfig.verify_queue_max"),
        (NetLimits, {"max_frame": 100}, "NetLimits.max_frame"),
        (NetLimits, {"max_connections": 0}, "NetLimits.max_connections"),
        (NetLimits, {"max_inflight_per_connection": 0}, "NetLimits.max_inflight_per_connection"),
        (NetLimits, {"handshake_timeout": 0.0}, "NetLimits.handshake_timeout"),
        (NetLimits, {"idle_timeout": -5.0}, "NetLimits.idle_timeout"),
        (NetLimits, {"trim_after": 0.0}, "NetLimits.trim_after"),
        (NetLimits, {"write_buffer_high": 0}, "NetLimits.write_buffer_high"),
        (NetLimits, {"request_rate": -1.0}, "NetLimits.request_rate"),
        (NetLimits, {"strike_decay": -1.0}, "NetLimits.strike_decay"),
        (ExchangeConfig, {"requests_per_peer": 0}, "ExchangeConfig.requests_per_peer"),
        (ExchangeConfig, {"piece_timeout": 0.0}, "ExchangeConfig.piece_timeout"),
        (ExchangeConfig, {"io_threads": 0}, "ExchangeConfig.io_threads"),
        (ExchangeConfig, {"hash_workers": -1}, "ExchangeConfig.hash_workers"),
        (ExchangeConfig, {"busy_backoff": 0.0}, "ExchangeConfig.busy_backoff"),
        (ExchangeConfig, {"stale_check_interval": -1.0}, "ExchangeConfig.stale_check_interval"),
        (ExchangeConfig, {"serve_max_reads": 0}, "ExchangeConfig.serve_max_reads"),
    ],
)
def test_out_of_range_values_name_their_field(
    cls: type[Any], changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(UsageError, match=rf"^{field} must"):
        cls(**changes)
    with pytest.raises(UsageError, match=rf"^{field} must"):
        dataclasses.replace(cls(), **changes)  # replace() checks again


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DhtConfig(ksize=0.5), "DhtConfig.ksize must be int"),
        (lambda: DhtConfig(ksize=True), "DhtConfig.ksize must be int"),
        (lambda: DhtConfig(rpc_timeout="5"), "DhtConfig.rpc_timeout must be float"),
        (lambda: NetLimits(encrypt=1), "NetLimits.encrypt must be true or false"),
        (lambda: ExchangeConfig(fsync=None), "ExchangeConfig.fsync must be true or false"),
    ],
)
def test_wrong_types_are_refused(build: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build()


def test_numbers_may_be_given_as_int_for_float_fields() -> None:
    assert DhtConfig(rpc_timeout=2).rpc_timeout == 2
    assert ExchangeConfig(stale_check_interval=0).stale_check_interval == 0


def test_zero_where_zero_has_a_meaning() -> None:
    # 0: no rate limit; run periodic jobs as often as allowed; never check; no pacing.
    NetLimits(request_rate=0.0, request_burst=0.0, max_strikes=0.0)
    DhtConfig(refresh_interval=0.0, provider_republish=0.0, welcome_store_rate=0.0)
    ExchangeConfig(stale_check_interval=0, progress_interval=0.0, rediscover_attempts=0)


def test_dht_pairs_are_consistent() -> None:
    with pytest.raises(UsageError, match=r"DhtConfig\.max_datagram must leave 256 bytes"):
        DhtConfig(max_datagram=1000)
    DhtConfig(max_datagram=1200, max_value_bytes=900)  # exactly enough room
    with pytest.raises(UsageError, match=r"DhtConfig.max_response_contacts must be at least ksize"):
        DhtConfig(ksize=80)
    DhtConfig(ksize=80, max_response_contacts=80)


def test_net_burst_needs_a_rate() -> None:
    with pytest.raises(UsageError, match=r"NetLimits\.request_burst is set but request_rate is 0"):
        NetLimits(request_burst=10.0)
    assert NetLimits(request_rate=10.0).request_burst == 0.0  # 0: the burst is the rate


def test_exchange_backoff_ceiling_is_above_the_start() -> None:
    with pytest.raises(UsageError, match=r"ExchangeConfig\.busy_backoff_max must be at least"):
        ExchangeConfig(busy_backoff=1.0, busy_backoff_max=0.5)
    ExchangeConfig(busy_backoff=0.5, busy_backoff_max=0.5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"port": -1}, r"NodeConfig.port must be a port \(0..65535\)"),
        ({"port": 65536}, "NodeConfig.port must be a port"),
        ({"port": 1.5}, "NodeConfig.port must be int"),
        ({"api_port": 70000}, "NodeConfig.api_port must be a port"),
        ({"host": ""}, "NodeConfig.host must be a host name or address"),
        ({"api_host": None}, "NodeConfig.api_host must be a host name or address"),
        ({"home": "/tmp/n1"}, "NodeConfig.home must be a pathlib.Path"),
        ({"bootstrap": (("h", 0),)}, r"NodeConfig.bootstrap must be a port \(1..65535\)"),
        ({"bootstrap": (("", 4001),)}, r"NodeConfig.bootstrap entries must be \(host, port\)"),
        ({"bootstrap": ("h:4001",)}, r"NodeConfig.bootstrap entries must be \(host, port\)"),
        ({"save_interval": 0.0}, "NodeConfig.save_interval must be more than 0"),
        ({"bootstrap_max_backoff": -1.0}, "NodeConfig.bootstrap_max_backoff must be more than 0"),
        ({"dht": {"ksize": 8}}, "NodeConfig.dht must be of type DhtConfig"),
        ({"net": DhtConfig()}, "NodeConfig.net must be of type NetLimits"),
        ({"exchange": None}, "NodeConfig.exchange must be of type ExchangeConfig"),
        ({"control_api": "no"}, "NodeConfig.control_api must be true or false"),
    ],
)
def test_node_config_checks(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        NodeConfig(**{"home": HOME, **changes})


def test_node_config_accepts_what_the_cli_and_tests_build() -> None:
    config = NodeConfig(
        home=HOME,
        host="::",
        port=4001,
        bootstrap=(("203.0.113.10", 4001), ("example.org", 65535)),
        api_port=0,
        save_interval=0.5,
        bootstrap_max_backoff=0.5,
        dht=DhtConfig(rpc_timeout=1.0),
        control_api=False,
    )
    assert dataclasses.replace(config, port=0).port == 0


def test_importing_the_config_loads_no_layer() -> None:
    """`p2pnode.config` is what the CLI imports to start: it must not pull in asyncio,
    the network stack or the libraries behind it."""
    code = (
        "import sys, p2pnode.config; "
        "heavy = ('asyncio', 'aiohttp', 'kademlia', 'cryptography', 'msgpack', "
        "'p2pnode.node', 'p2pnode.net.host', 'p2pnode.dht.discovery', 'platformdirs'); "
        "print(' '.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""
