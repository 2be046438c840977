"""In-process runner: many ``p2pnode.Node`` objects in one event loop, each with
its own home and real loopback sockets (UDP + TCP on 127.0.0.1, port 0).

Public hooks used: ``Discovery.wrap_transport`` (``netem.ImpairedTransport`` adds
loss/latency and counts bytes), ``Node.abort`` (an abrupt kill: nothing saved)
and ``Discovery.find_peer_traced`` (queries and hops per lookup).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import resource
from pathlib import Path
from typing import Any

from p2pnode.config import NodeConfig
from p2pnode.dht.config import DhtConfig
from p2pnode.errors import P2PError
from p2pnode.exchange.manifest import resource_id_from_str
from p2pnode.node import Node
from p2pnode.sim import dhtops, netem
from p2pnode.sim.engine import (
    LookupOutcome,
    NodeFailure,
    OneProcessCluster,
    SimNode,
    Traffic,
)
from p2pnode.sim.scenario import ScenarioConfig

log = logging.getLogger(__name__)


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-files limit towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def hard_fd_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


def fds_needed(nodes: int) -> int:
    # UDP + TCP listener + control listener + lock + SQLite (db, wal, shm) + slack for
    # peer connections, pieces being read and control clients.
    return 1024 + nodes * 16


def _find_node_sent(stats: dict[str, Any]) -> int:
    return int(stats.get("rpc_sent.find_node", 0))


def _sum_keys(stats: dict[str, Any], *needles: str) -> int:
    total = 0
    for key, value in stats.items():
        low = key.lower()
        if (
            all(n in low for n in needles)
            and isinstance(value, int)
            and not isinstance(value, bool)
        ):
            total += value
    return total


def net_bytes(stats: dict[str, Any]) -> tuple[int, int]:
    """(sent, received) bytes from the peer host's counters, whatever their exact
    names (``bytes_sent``/``bytes_out``/``tx_bytes`` ...); 0 if there are none."""
    sent = (
        _sum_keys(stats, "bytes", "sent")
        or _sum_keys(stats, "bytes", "out")
        or _sum_keys(stats, "tx", "bytes")
    )
    received = (
        _sum_keys(stats, "bytes", "rec")
        or _sum_keys(stats, "bytes", "in")
        or _sum_keys(stats, "rx", "bytes")
    )
    return sent, received


async def _start(node: Node) -> None:
    """Start a node; any failure (ours or, e.g., out of file descriptors deep in a
    library) becomes a NodeFailure the engine counts, not a traceback ending the run."""
    try:
        await node.start()
    except P2PError as exc:
        raise NodeFailure(f"start: {exc}") from None
    except OSError as exc:
        raise NodeFailure(f"start: OSError: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - a crash in start-up is a finding, counted
        raise NodeFailure(f"start: {type(exc).__name__}: {exc}") from None


class InprocessNode(SimNode):
    def __init__(self, index: int, workdir: Path, cluster: InprocessCluster) -> None:
        super().__init__(index, workdir)
        self._cluster = cluster
        self.node: Node | None = None
        self._wire: netem.ImpairedTransport | None = None

    async def start(self, bootstrap: list[tuple[str, int]], port: int = 0) -> None:
        for d in (self.home, self.files, self.downloads):
            d.mkdir(parents=True, exist_ok=True)
        config = self._cluster.node_config(self.home, bootstrap, port)
        node = Node(config)
        try:
            await _start(node)
        except NodeFailure:
            if port == 0:
                raise
            # The old port is taken: any port will do.
            node = Node(dataclasses.replace(config, port=0))
            await _start(node)
        # Nothing has been sent yet: the join task only runs at our next await.
        self._wire = self._cluster.impair(node)
        self.node = node
        self.node_id = node.node_id
        self.port = node.port
        self.running = True

    async def joined(self) -> bool:
        return self.node is not None and self.node._joined.is_set()

    async def kill(self) -> None:
        node = self.node
        if node is None or not self.running:
            return
        self.running = False
        if self._wire is not None:
            self._wire.blackhole = True  # not one more datagram out
        await node.abort()

    async def stop(self) -> None:
        if self.node is not None and self.running:
            self.running = False
            await self.node.stop()

    def _node(self) -> Node:
        if self.node is None or not self.running:
            raise NodeFailure("down: node not running")
        return self.node

    async def share(self, path: Path) -> str:
        try:
            info = await self._node().exchange.share(path)
        except P2PError as exc:
            raise NodeFailure(f"share: {type(exc).__name__}: {exc}") from None
        return str(info.to_json()["id"])

    async def fetch(self, rid: str, dest: Path) -> Path:
        try:
            info = await self._node().exchange.get(resource_id_from_str(rid), dest)
        except P2PError as exc:
            raise NodeFailure(f"fetch: {type(exc).__name__}: {exc}") from None
        data = info.to_json()
        path = data.get("path")
        return Path(path) if path else dest

    async def dht_put(self, key: str, value: str) -> bool:
        return await dhtops.dht_put(self._node().discovery, key, value)

    async def dht_get(self, key: str) -> str | None:
        return await dhtops.dht_get(self._node().discovery, key)

    async def find_peer(self, node_id: bytes) -> LookupOutcome:
        node = self._node()
        before = _find_node_sent(node.discovery.stats())
        try:
            contact, trace = await node.discovery.find_peer_traced(node_id)
        except P2PError as exc:
            raise NodeFailure(f"lookup: {type(exc).__name__}: {exc}") from None
        rpcs = _find_node_sent(node.discovery.stats()) - before
        hops = float(trace.hops) if contact is not None and trace.hops is not None else None
        return LookupOutcome(
            found=contact is not None,
            port=contact.port if contact else None,
            rpcs=float(rpcs),
            hops=hops,
        )

    async def traffic(self) -> Traffic:
        node = self._node()
        dht = node.discovery.stats()
        net = node.peer_host.stats()
        if self._wire is not None:
            dht = {
                **dht,
                "sim.bytes_sent": self._wire.bytes_sent,
                "sim.datagrams_sent": self._wire.datagrams_sent,
                "sim.datagrams_dropped": self._wire.datagrams_dropped,
            }
        net_sent, net_received = net_bytes(net)
        return Traffic(
            dht_bytes_sent=self._wire.bytes_sent if self._wire else 0,
            net_bytes_sent=net_sent,
            net_bytes_received=net_received,
            routing_table_size=len(node.discovery.contacts()),
            dht=dict(dht),
            net=dict(net),
        )


class InprocessCluster(OneProcessCluster):
    mode = "inprocess"
    rpc_source = (
        "RPCs per lookup: delta of the source node's rpc_sent.find_node counter around "
        "find_peer_traced (one lookup at a time per source); hops: from the lookup trace"
    )
    stop_batch = 100  # a thousand simultaneous stops is a thundering herd of closes

    def __init__(self, workdir: Path, config: ScenarioConfig) -> None:
        super().__init__(workdir)
        self.config = config
        self._impair_seq = 0
        self.impaired = config.loss > 0 or config.link_latency_ms() > 0 or config.jitter_ms > 0
        self.hook_missing = False

    def _make_node(self, index: int, workdir: Path) -> SimNode:
        return InprocessNode(index, workdir, self)

    async def setup(self) -> None:
        # Everything the hard limit allows: a node past the estimate (peer connections,
        # pieces being read) must not be the one that fails.
        raise_fd_limit(max(fds_needed(self.config.nodes), hard_fd_limit()))

    def node_config(self, home: Path, bootstrap: list[tuple[str, int]], port: int) -> NodeConfig:
        dht = DhtConfig()
        if self.config.rpc_timeout is not None:
            dht = dataclasses.replace(dht, rpc_timeout=self.config.rpc_timeout)
        extra: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(NodeConfig)}
        # Forward compatible: a NodeConfig switch for the control API, if there is one.
        for flag in ("control_api", "api_enabled", "enable_api"):
            if flag in names:
                extra[flag] = self.config.control_api
        return NodeConfig(
            home=home, host="127.0.0.1", port=port, bootstrap=tuple(bootstrap), dht=dht, **extra
        )

    def impair(self, node: Node) -> netem.ImpairedTransport | None:
        self._impair_seq += 1
        rng = random.Random(f"netem:{self.config.seed}:{self._impair_seq}")
        wrapper = netem.install(
            node.discovery,
            loss=self.config.loss if self.impaired else 0.0,
            latency=self.config.link_latency_ms() / 1000 if self.impaired else 0.0,
            jitter=self.config.jitter_ms / 1000 if self.impaired else 0.0,
            rng=rng,
        )
        if wrapper is None:
            self.hook_missing = True
        return wrapper
