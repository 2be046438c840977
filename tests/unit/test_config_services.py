"""NodeConfig.services: the node-wide service limits are part of the node's config,
checked when it is built like its other nested parts (dht, net, exchange)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from p2pnode.config import NodeConfig
from p2pnode.errors import UsageError
from p2pnode.net.config import NetLimits
from p2pnode.services import NodeServiceLimits

HOME = Path("/nonexistent/p2pnode-home")  # never touched: building a config does no I/O


def test_default_limits_are_the_services_defaults() -> None:
    config = NodeConfig(home=HOME)
    assert config.services == NodeServiceLimits()
    assert dataclasses.replace(config) == config


def test_limits_given_are_kept_and_replace_checks_them_again() -> None:
    limits = NodeServiceLimits(max_concurrent=8, max_concurrent_per_peer=2)
    config = NodeConfig(home=HOME, services=limits)
    assert config.services is limits
    with pytest.raises(UsageError, match=r"NodeConfig\.services must be of type"):
        dataclasses.replace(config, services=None)


@pytest.mark.parametrize(
    ("services", "message"),
    [
        (lambda: {"max_concurrent": 8}, "NodeConfig.services must be of type NodeServiceLimits"),
        (lambda: None, "NodeConfig.services must be of type NodeServiceLimits"),
        (NetLimits, "NodeConfig.services must be of type NodeServiceLimits"),
        # Built inside the test: whichever check sees them first names the field.
        (
            lambda: NodeServiceLimits(max_concurrent=2.5),  # type: ignore[arg-type]
            "NodeServiceLimits.max_concurrent must be int",
        ),
        (
            lambda: NodeServiceLimits(max_concurrent_per_peer=True),
            "NodeServiceLimits.max_concurrent_per_peer must be int",
        ),
        (
            lambda: NodeServiceLimits(max_rate_peers=10.0),  # type: ignore[arg-type]
            "NodeServiceLimits.max_rate_peers must be int",
        ),
    ],
)
def test_wrong_services_are_refused_naming_the_field(
    services: Callable[[], Any], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        NodeConfig(home=HOME, services=services())


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"max_concurrent_per_peer": -1}, "max_concurrent_per_peer"),
        ({"stream_idle_timeout": 0.0}, "stream_idle_timeout"),
        ({"stream_idle_timeout": float("nan")}, "stream_idle_timeout"),
        ({"max_rate_peers": 0}, "max_rate_peers"),
        ({"max_concurrent": "8"}, "max_concurrent"),
    ],
)
def test_bad_node_service_limits_name_the_field(changes: dict[str, object], field: str) -> None:
    from p2pnode.services import NodeServiceLimits

    with pytest.raises(UsageError, match=rf"^NodeServiceLimits\.{field} must"):
        NodeServiceLimits(**changes)  # type: ignore[arg-type]
