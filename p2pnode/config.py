"""A node's configuration: one frozen dataclass built from CLI flags or by code."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from p2pnode.dht.config import DhtConfig
from p2pnode.errors import UsageError
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.net.config import NetLimits

HOME_ENV = "P2PNODE_HOME"


def default_home() -> Path:
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("p2pnode", appauthor=False))


def parse_host_port(text: str) -> tuple[str, int]:
    """Parse ``host:port`` or ``[v6]:port``; raise UsageError on anything else."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise UsageError(f"bad address {text!r}: expected [ipv6]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise UsageError(f"bad address {text!r}: expected host:port")
        if ":" in host:
            raise UsageError(f"bad address {text!r}: write IPv6 as [addr]:port")
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"bad port in {text!r}") from None
    if not 0 < port < 65536:
        raise UsageError(f"port out of range in {text!r}")
    return host, port


@dataclass(frozen=True)
class NodeConfig:
    home: Path = field(default_factory=default_home)
    host: str = "0.0.0.0"
    port: int = 0
    bootstrap: tuple[tuple[str, int], ...] = ()
    api_host: str = "127.0.0.1"
    # None: a free port, written to the home. 0 is the same.
    api_port: int | None = None
    # Save the routing table this often (seconds) and at stop.
    save_interval: float = 60.0
    # Retry unreachable bootstrap addresses with backoff up to this delay.
    bootstrap_max_backoff: float = 60.0
    dht: DhtConfig = field(default_factory=DhtConfig)
    net: NetLimits = field(default_factory=NetLimits)
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)
