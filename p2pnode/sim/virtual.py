"""Virtual runner: the real DHT (``Discovery``) and peer connections (``PeerHost``,
Noise included) of every node over the in-memory network of :mod:`.vnet`, in
virtual time (:mod:`.vloop`). No sockets, threads, files or real waiting; a node
costs memory only.

A node is a Discovery + a PeerHost on its own virtual host (100.64.0.0/10, port
4001), with an identity derived from the seed and its index. What ``Node`` adds
on top (home, store, control API) is replaced by small in-memory parts: a shared
resource is bytes in memory, described by a manifest (size, piece size, SHA-256 of
each piece) whose SHA-256 is the resource id; it is announced with
``add_provider`` and fetched with GetManifest / GetPiece from the providers that
``find_providers`` returns, every piece verified.

Kill = the process dies: the host sends nothing more, its connections are reset
(as its kernel would), its DHT socket disappears, and its tasks end. Restart
rejoins on the same address and port with the same identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import ipaddress
import logging
import random
import struct
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.dht import Discovery
from p2pnode.dht.config import DhtConfig
from p2pnode.errors import P2PError
from p2pnode.exchange.manifest import dht_key
from p2pnode.exchange.messages import GetManifest, GetPiece, ManifestData, PieceData
from p2pnode.identity import Identity
from p2pnode.net.config import NetLimits
from p2pnode.net.host import PeerAddress, PeerHost
from p2pnode.sim import dhtops
from p2pnode.sim.adversary import AdversaryNode, SybilRegistry, Target, grind, records
from p2pnode.sim.engine import (
    LookupOutcome,
    NodeFailure,
    OneProcessCluster,
    SimNode,
    Traffic,
    Unsupported,
)
from p2pnode.sim.inprocess import net_bytes
from p2pnode.sim.scenario import Scenario, ScenarioConfig, generate
from p2pnode.sim.vloop import LoopClock
from p2pnode.sim.vnet import BASE as VNET_BASE
from p2pnode.sim.vnet import SUBNETS as VNET_SUBNETS
from p2pnode.sim.vnet import LinkModel, VirtualHost, VirtualNetwork
from p2pnode.wire.messages import ErrorCode, ErrorReply, Message

log = logging.getLogger(__name__)

PORT = 4001
PIECE_SIZE = 64 * 1024
PIECES_IN_FLIGHT = 4
JOIN_RETRY = 1.0
JOIN_RETRY_MAX = 16.0
_MANIFEST_HEAD = struct.Struct(">QI")  # total size, piece size; then SHA-256 per piece
_DISCOVERY_PARAMS = inspect.signature(Discovery).parameters
_DISCOVERY_TAKES_RNG = "rng" in _DISCOVERY_PARAMS
# Discovery takes the node's Identity (ids proven with it), or its node id (older).
_DISCOVERY_TAKES_IDENTITY = next(iter(_DISCOVERY_PARAMS)) == "identity"


def identity_for(seed: int, index: int) -> Identity:
    """Node ``index``'s key pair: Ed25519 from 32 bytes derived from the seed."""
    raw = hashlib.sha256(f"p2pnode-sim:{seed}:identity:{index}".encode()).digest()
    return Identity(Ed25519PrivateKey.from_private_bytes(raw))


def make_manifest(data: bytes, piece_size: int = PIECE_SIZE) -> bytes:
    digests = b"".join(
        hashlib.sha256(data[i : i + piece_size]).digest() for i in range(0, len(data), piece_size)
    )
    return _MANIFEST_HEAD.pack(len(data), piece_size) + digests


def parse_manifest(manifest: bytes) -> tuple[int, int, list[bytes]]:
    size, piece_size = _MANIFEST_HEAD.unpack_from(manifest)
    body = manifest[_MANIFEST_HEAD.size :]
    count = -(-size // piece_size) if piece_size else 0
    if piece_size == 0 or len(body) != 32 * count:
        raise NodeFailure("verification: malformed manifest")
    return size, piece_size, [body[i : i + 32] for i in range(0, len(body), 32)]


class _Resource:
    __slots__ = ("data", "manifest", "piece_size")

    def __init__(self, data: bytes, manifest: bytes, piece_size: int) -> None:
        self.data = data
        self.manifest = manifest
        self.piece_size = piece_size


class VirtualNode(SimNode):
    def __init__(self, index: int, workdir: Path, cluster: VirtualCluster) -> None:
        super().__init__(index, workdir)
        self._cluster = cluster
        self.vhost: VirtualHost = cluster.net.host(index)
        self.host = self.vhost.ip
        self.identity = identity_for(cluster.config.seed, index)
        self.node_id = self.identity.node_id
        self.discovery: Discovery | None = None
        self.peer_host: PeerHost | None = None
        self._join: asyncio.Task[None] | None = None
        self._joined = False
        self._lives = 0
        self.resources: dict[bytes, _Resource] = {}  # served from memory

    async def start(self, bootstrap: list[tuple[str, int]], port: int = 0) -> None:
        cluster = self._cluster
        self._lives += 1
        self.vhost.recover()
        kwargs: dict[str, Any] = {"clock": cluster.clock, "endpoints": self.vhost}
        if _DISCOVERY_TAKES_RNG:
            kwargs["rng"] = random.Random(
                f"p2pnode-sim:{cluster.config.seed}:dht:{self.index}:{self._lives}"
            )
        who: Any = self.identity if _DISCOVERY_TAKES_IDENTITY else self.identity.node_id
        discovery = Discovery(who, cluster.dht_config, **kwargs)
        peer_host = PeerHost(
            self.identity, cluster.net_limits, clock=cluster.clock, endpoints=self.vhost
        )
        try:
            bound = await discovery.listen(self.host, port or PORT)
            await peer_host.listen(self.host, bound)
        except (OSError, P2PError) as exc:
            await peer_host.close()
            await discovery.close()
            raise NodeFailure(f"start: {type(exc).__name__}: {exc}") from None
        peer_host.set_handler(self._serve)
        self.discovery, self.peer_host, self.port = discovery, peer_host, bound
        self._joined = False
        self.running = True
        self._join = asyncio.get_running_loop().create_task(
            self._join_loop(list(bootstrap)), name=f"join-{self.index}"
        )

    async def _join_loop(self, bootstrap: list[tuple[str, int]]) -> None:
        """As Node does: bootstrap until some seed answers, backing off between tries."""
        assert self.discovery is not None
        delay = JOIN_RETRY
        while bootstrap:
            try:
                if await self.discovery.bootstrap(bootstrap):
                    break
            except P2PError as exc:
                log.info("node %d: bootstrap failed: %s", self.index, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, JOIN_RETRY_MAX)
        self._joined = True
        # Back from a kill: what it holds is still "on disk"; announce it again, as
        # a restarted node does.
        for rid in sorted(self.resources):
            await self._announce(rid)

    async def _announce(self, rid: bytes) -> None:
        assert self.discovery is not None
        await self.discovery.add_provider(dht_key(rid), self.port)

    async def joined(self) -> bool:
        return self._joined

    async def kill(self) -> None:
        if not self.running:
            return
        self.running = False
        self.vhost.crash()  # nothing more leaves this host; connections get reset
        await self._end()

    async def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        await self._end()

    async def _end(self) -> None:
        if self._join is not None:
            self._join.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._join
            self._join = None
        if self.peer_host is not None:
            await self.peer_host.close()
        if self.discovery is not None:
            await self.discovery.close()

    def _live(self) -> tuple[Discovery, PeerHost]:
        if not self.running or self.discovery is None or self.peer_host is None:
            raise NodeFailure("down: node not running")
        return self.discovery, self.peer_host

    # -- files (in memory) ------------------------------------------------------------

    async def write_file(self, path: Path, data: bytes) -> str:
        self._cluster.files[path] = data
        return hashlib.sha256(data).hexdigest()

    async def file_digest(self, path: Path) -> str:
        data = self._cluster.files.get(path)
        if data is None:
            raise NodeFailure(f"verification: no file {path.name}")
        return hashlib.sha256(data).hexdigest()

    # -- exchange ---------------------------------------------------------------------

    async def share(self, path: Path) -> str:
        self._live()
        data = self._cluster.files.get(path)
        if data is None:
            raise NodeFailure(f"share: no file {path.name}")
        manifest = make_manifest(data)
        rid = hashlib.sha256(manifest).digest()
        self.resources[rid] = _Resource(data, manifest, PIECE_SIZE)
        try:
            await self._announce(rid)
        except P2PError as exc:
            raise NodeFailure(f"share: {type(exc).__name__}: {exc}") from None
        return rid.hex()

    async def _serve(self, peer: bytes, msg: Message) -> Message:
        if isinstance(msg, GetPiece):
            res = self.resources.get(msg.resource_id)
            if res is not None:
                start = msg.index * res.piece_size
                if start < len(res.data):
                    chunk = res.data[start : start + res.piece_size]
                    return PieceData(msg.resource_id, msg.index, chunk)
            return ErrorReply(ErrorCode.NOT_FOUND, "no such piece")
        if isinstance(msg, GetManifest):
            res = self.resources.get(msg.resource_id)
            if res is not None:
                return ManifestData(msg.resource_id, res.manifest)
            return ErrorReply(ErrorCode.NOT_FOUND, "no such resource")
        return ErrorReply(ErrorCode.UNSUPPORTED, type(msg).__name__)

    async def fetch(self, rid: str, dest: Path) -> Path:
        discovery, peer_host = self._live()
        try:
            resource_id = bytes.fromhex(rid)
        except ValueError:
            raise NodeFailure(f"fetch: not a resource id: {rid}") from None
        try:
            providers = await discovery.find_providers(dht_key(resource_id))
        except P2PError as exc:
            raise NodeFailure(f"fetch: {type(exc).__name__}: {exc}") from None
        providers = [p for p in providers if p.node_id != self.node_id]
        if not providers:
            raise NodeFailure("no-providers: find_providers found none")
        errors = []
        for p in providers:
            addr = PeerAddress(p.node_id, p.host, p.port)
            try:
                data = await self._download(peer_host, addr, resource_id)
            except (P2PError, NodeFailure) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            self.resources[resource_id] = _Resource(data, make_manifest(data), PIECE_SIZE)
            self._cluster.files[dest] = data
            # A completed download is served and announced too, as the exchange does.
            with contextlib.suppress(P2PError):
                await self._announce(resource_id)
            return dest
        raise NodeFailure(f"fetch: every provider failed ({'; '.join(errors[:3])})")

    async def _download(self, peer_host: PeerHost, addr: PeerAddress, rid: bytes) -> bytes:
        timeout = self._cluster.net_limits.request_timeout
        answer = await peer_host.request(addr, GetManifest(rid), timeout)
        if not isinstance(answer, ManifestData) or hashlib.sha256(answer.manifest).digest() != rid:
            raise NodeFailure("verification: manifest does not hash to the resource id")
        size, _, digests = parse_manifest(answer.manifest)
        pieces: list[bytes] = [b""] * len(digests)
        slots = asyncio.Semaphore(PIECES_IN_FLIGHT)

        async def piece(i: int) -> None:
            async with slots:
                reply = await peer_host.request(addr, GetPiece(rid, i), timeout)
            if (
                not isinstance(reply, PieceData)
                or hashlib.sha256(reply.data).digest() != digests[i]
            ):
                raise NodeFailure(f"verification: piece {i} does not match the manifest")
            pieces[i] = bytes(reply.data)

        await asyncio.gather(*(piece(i) for i in range(len(digests))))
        data = b"".join(pieces)
        if len(data) != size:
            raise NodeFailure("verification: wrong size")
        return data

    # -- DHT --------------------------------------------------------------------------

    async def dht_put(self, key: str, value: str) -> bool:
        discovery, _ = self._live()
        return await dhtops.dht_put(discovery, key, value)

    async def dht_get(self, key: str) -> str | None:
        discovery, _ = self._live()
        return await dhtops.dht_get(discovery, key)

    async def find_peer(self, node_id: bytes) -> LookupOutcome:
        discovery, _ = self._live()
        before = _find_node_sent(discovery.stats())
        try:
            contact, trace = await discovery.find_peer_traced(node_id)
        except P2PError as exc:
            raise NodeFailure(f"lookup: {type(exc).__name__}: {exc}") from None
        after = _find_node_sent(discovery.stats())
        # The same measure as in-process mode (requests sent), the trace if no counter.
        rpcs = after - before if after is not None and before is not None else trace.queries
        hops = float(trace.hops) if contact is not None and trace.hops is not None else None
        return LookupOutcome(
            found=contact is not None,
            port=contact.port if contact else None,
            rpcs=float(rpcs),
            hops=hops,
            host=contact.host if contact else None,
        )

    async def dht_put_record(self, name: str, value: str) -> str:
        discovery, _ = self._live()
        put_mutable = getattr(discovery, "put_mutable", None)
        if put_mutable is None:
            raise Unsupported("signed records: Discovery has no put_mutable")
        try:
            outcome = await put_mutable(name, value)
        except P2PError as exc:
            raise NodeFailure(f"put: {type(exc).__name__}: {exc}") from None
        if not outcome.stored:
            raise NodeFailure("not-stored: no node stored the record")
        return str(outcome.address)

    async def dht_get_record(self, address: str) -> str | None:
        discovery, _ = self._live()
        get_record = getattr(discovery, "get_record", None)
        if get_record is None:
            raise Unsupported("signed records: Discovery has no get_record")
        try:
            value = await get_record(address)
        except P2PError as exc:
            raise NodeFailure(f"get: {type(exc).__name__}: {exc}") from None
        return dhtops.as_text(value)

    async def find_provider_ids(self, rid: str) -> list[tuple[bytes, str]]:
        discovery, _ = self._live()
        try:
            found = await discovery.find_providers(dht_key(bytes.fromhex(rid)))
        except P2PError as exc:
            raise NodeFailure(f"providers: {type(exc).__name__}: {exc}") from None
        return [(p.node_id, p.host) for p in found if p.node_id != self.node_id]

    async def traffic(self) -> Traffic:
        discovery, peer_host = self._live()
        dht = discovery.stats()
        net = peer_host.stats()
        net_sent, net_received = net_bytes(net)
        registry = self._cluster.registry
        contacts = discovery.contacts()
        if registry is not None:  # how far the Sybils got into this node's table
            dht = {**dht, "contacts_sybil": sum(1 for c in contacts if c.node_id in registry.ids)}
        return Traffic(
            dht_bytes_sent=int(dht.get("bytes_sent", 0)),
            dht_bytes_received=int(dht.get("bytes_received", 0)),
            net_bytes_sent=net_sent,
            net_bytes_received=net_received,
            routing_table_size=len(contacts),
            dht=dict(dht),
            net=dict(net),
        )


def _find_node_sent(stats: dict[str, Any]) -> int | None:
    value = stats.get("rpc_sent.find_node")
    return int(value) if value is not None else None


class VirtualCluster(OneProcessCluster):
    mode = "virtual"
    rpc_source = (
        "RPCs per lookup: delta of the source node's rpc_sent.find_node counter around "
        "find_peer_traced (one lookup at a time per source); hops: from the lookup trace"
    )
    stop_batch = 500

    def __init__(
        self, workdir: Path, config: ScenarioConfig, scenario: Scenario | None = None
    ) -> None:
        super().__init__(workdir)
        self.config = config
        self.scenario = scenario if scenario is not None else generate(config)
        self.adversaries = self.scenario.adversaries
        self.registry: SybilRegistry | None = None
        loop = asyncio.get_running_loop()
        self.clock = LoopClock(loop)
        self.net = VirtualNetwork(loop, link_model(config), config.seed)
        dht = DhtConfig()
        if config.rpc_timeout is not None:
            dht = DhtConfig(rpc_timeout=config.rpc_timeout)
        self.dht_config = dht
        self.net_limits = NetLimits()
        self.files: dict[Path, bytes] = {}

    async def setup(self) -> None:
        if self.adversaries:
            self.registry = make_registry(self.scenario)

    def _make_node(self, index: int, workdir: Path) -> SimNode:
        if index in self.adversaries:
            registry = self.registry
            if registry is None:
                registry = self.registry = make_registry(self.scenario)
            slot = sorted(self.adversaries).index(index)
            vhost, port = self._sybil_host(slot, index)
            return AdversaryNode(
                index,
                workdir,
                vhost,
                registry.specs[slot],
                registry,
                self.clock,
                self.config.seed,
                port,
            )
        return VirtualNode(index, workdir, self)

    def _sybil_host(self, slot: int, index: int) -> tuple[VirtualHost, int]:
        """A Sybil's host and port: its own (adv_hosts 0), or one of adv_hosts shared
        addresses (each in a /24 no honest node uses) on the next free port."""
        hosts = self.config.adv_hosts
        if hosts == 0:
            return self.net.host(index), PORT
        ip = sybil_address(slot % hosts)
        vhost = self.net.hosts.get(ip)
        if vhost is None:
            vhost = self.net.hosts[ip] = VirtualHost(self.net, ip)
        return vhost, PORT + slot // hosts

    def adversary_report(self) -> dict[str, Any] | None:
        return None if self.registry is None else self.registry.report()

    def adversary_wallclock(self) -> dict[str, Any] | None:
        if self.registry is None:
            return None
        return {"grinding_wall_seconds": self.registry.grind_cost.get("wall_seconds")}


def sybil_address(host: int) -> str:
    """Shared Sybil address ``host``: .200 in the /24s counted down from the top of
    100.64.0.0/10 (honest hosts use .1, .2, ... from the bottom)."""
    return str(ipaddress.IPv4Address(VNET_BASE + ((VNET_SUBNETS - 1 - host) << 8) + 200))


def workload_targets(scenario: Scenario) -> list[Target]:
    """The keys the workload uses, in the order Sybils are given to them: signed
    records, plain values, resources' provider keys, then the lookups' targets."""
    seed = scenario.config.seed
    targets: list[Target] = []
    for op in scenario.ops:
        if op.kind == "put_record" and records is not None:
            publisher = identity_for(seed, op.node)
            name = scenario.records[op.arg].name
            key = records.mutable_key(publisher.node_id, name)
            targets.append(Target("record", key, publisher.public_key, name))
    for value in scenario.values:
        targets.append(Target("value", hashlib.sha1(value.key.encode()).digest()))
    for res in scenario.resources:
        rid = hashlib.sha256(make_manifest(res.content())).digest()
        targets.append(Target("provider", dht_key(rid)))
    seen: set[int] = set()
    for op in scenario.ops:
        if op.kind == "lookup" and op.arg not in seen:
            seen.add(op.arg)
            targets.append(Target("node", identity_for(seed, op.arg).node_id))
    return targets


def make_registry(scenario: Scenario) -> SybilRegistry:
    """Grind the Sybils' ids around the workload's keys; their shared registry."""
    config = scenario.config
    targets = workload_targets(scenario)
    tries = config.adv_grind_tries if config.adv_cluster else 0  # 0: random ids
    specs, cost = grind(config.seed, targets, len(scenario.adversaries), tries)
    honest = [
        identity_for(config.seed, i).node_id
        for i in range(config.nodes)
        if i not in scenario.adversaries
    ]
    return SybilRegistry(config, targets, specs, cost, honest)


def link_model(config: ScenarioConfig) -> LinkModel:
    return LinkModel(
        latency=config.link_latency_ms() / 1000,
        jitter=config.jitter_ms / 1000,
        loss=config.loss,
        bandwidth=config.bandwidth_mbit * 1e6 / 8,
    )
