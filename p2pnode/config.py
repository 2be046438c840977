"""A node's configuration: one frozen dataclass built from CLI flags or by code.

Light to import (the CLI's start-up pays for it): dataclasses and the layers'
config modules only, never the layers themselves. ``NodeServiceLimits`` is the
exception: importing ``p2pnode.services`` loads its asyncio side, so it is imported
when a config is built, not with this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from p2pnode import confcheck
from p2pnode.dht.config import DhtConfig
from p2pnode.errors import UsageError
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.nat.holepunch_config import HolePunchConfig
from p2pnode.nat.portmap_core import PortMapConfig
from p2pnode.nat.reachability import AutoNatConfig
from p2pnode.nat.relay_core import RelayConfig
from p2pnode.net.config import NetLimits

if TYPE_CHECKING:
    from p2pnode.services.core import NodeServiceLimits

HOME_ENV = "P2PNODE_HOME"
# Set (to anything but 0) to start without port mapping, like --no-port-mapping.
NO_PORT_MAPPING_ENV = "P2PNODE_NO_PORT_MAPPING"


def _service_limits_class() -> type[NodeServiceLimits]:
    from p2pnode.services.core import NodeServiceLimits

    return NodeServiceLimits


def _default_service_limits() -> NodeServiceLimits:
    return _service_limits_class()()


def default_home() -> Path:
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs  # only when no home is given: it costs ~15 ms to import

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
    # AutoNAT: dial-back probes of our reachability, and serving them to others.
    autonat: AutoNatConfig = field(default_factory=AutoNatConfig)
    # Node-wide limits of the services served (each service's own: serve(limits=)).
    services: NodeServiceLimits = field(default_factory=_default_service_limits)
    # The circuit relay: offered (public nodes) and used (private ones); p2pnode/nat/relay.py
    relay: RelayConfig = field(default_factory=RelayConfig)
    holepunch: HolePunchConfig = field(default_factory=HolePunchConfig)
    # False: no control API (no listener, no control.json); for many nodes in one
    # process (simulations), where it would cost a file descriptor each.
    control_api: bool = True
    # Map the port on the home router (UPnP-IGD, PCP, NAT-PMP) in the background.
    # Never tried when bound to loopback. CLI: --no-port-mapping.
    port_mapping: bool = True
    portmap: PortMapConfig = field(default_factory=PortMapConfig)

    def __post_init__(self) -> None:
        confcheck.check_types(self)
        if not isinstance(self.home, Path):
            confcheck.fail(self, "home", f"must be a pathlib.Path, got {self.home!r}")
        for name in ("host", "api_host"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                confcheck.fail(self, name, f"must be a host name or address, got {value!r}")
        confcheck.port(self, "port", self.port, zero=True)
        if self.api_port is not None:
            confcheck.port(self, "api_port", self.api_port, zero=True)
        for entry in self.bootstrap:
            if (
                not isinstance(entry, tuple | list)
                or len(entry) != 2
                or not isinstance(entry[0], str)
                or not entry[0]
            ):
                confcheck.fail(self, "bootstrap", f"entries must be (host, port), got {entry!r}")
            confcheck.port(self, "bootstrap", entry[1], zero=False)
        confcheck.positive(self, "save_interval", "bootstrap_max_backoff")
        nested: tuple[tuple[str, type], ...] = (
            ("dht", DhtConfig),
            ("net", NetLimits),
            ("exchange", ExchangeConfig),
            ("autonat", AutoNatConfig),
            ("services", _service_limits_class()),
            ("portmap", PortMapConfig),
            ("relay", RelayConfig),
            ("holepunch", HolePunchConfig),
        )
        for name, kind in nested:
            if not isinstance(getattr(self, name), kind):
                confcheck.fail(self, name, f"must be of type {kind.__name__}")
        # NodeServiceLimits checks its ranges, not its types (2.5 calls, True as 1).
        confcheck.check_types(self.services)
