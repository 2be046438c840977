"""What the control API needs from a node, and the names it puts on the wire.

The server depends on these protocols, not on ``p2pnode.node``, so the node can
import the server without an import cycle. Stdlib only: the CLI's client imports
this module too, and must start fast.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, Protocol, TypedDict

if TYPE_CHECKING:
    from p2pnode.config import NodeConfig


class ErrorKind(StrEnum):
    """The ``kind`` of an error body: the guard's own refusals, or the name of the
    P2PError class raised (those below are the ones clients map back; any other
    P2PError subclass goes out under its own class name)."""

    FORBIDDEN = "Forbidden"
    UNAUTHORIZED = "Unauthorized"
    USAGE = "UsageError"
    NOT_FOUND = "NotFoundError"
    TIMEOUT = "P2PTimeoutError"
    PROTOCOL = "ProtocolError"
    NODE_NOT_RUNNING = "NodeNotRunning"


class StreamEvent(StrEnum):
    """The ``event`` of each line of a streamed answer (``POST /v1/get``,
    ``POST /v1/services/call_stream``)."""

    PROGRESS = "progress"
    PHASE = "phase"  # POST /v1/get: what the download does before (or between) bytes
    ITEM = "item"
    DONE = "done"
    ERROR = "error"


class Jsonable(Protocol):
    def to_json(self) -> dict[str, Any]: ...


class PeerLocation(Protocol):
    """A DHT contact or provider record: who, and where to reach it."""

    @property
    def node_id(self) -> bytes: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...


class DhtAPI(Protocol):
    async def put(self, key: str, value: str) -> bool: ...
    async def put_outcome(self, key: str, value: str) -> Jsonable: ...
    async def get(self, key: str) -> object: ...
    async def put_mutable(self, name: str, value: str) -> Jsonable: ...
    async def put_immutable(self, value: str) -> Jsonable: ...
    async def get_record(self, address: str) -> object: ...
    async def find_peer(self, node_id: bytes) -> PeerLocation | None: ...
    async def find_providers(self, key: bytes, want: int = ...) -> Sequence[PeerLocation]: ...


class ExchangeAPI(Protocol):
    async def share(self, path: Path, *, follow_links: bool = ...) -> Jsonable: ...
    async def unshare(self, resource_id: bytes) -> None: ...
    def list(self) -> Sequence[Jsonable]: ...
    async def check_stale(self) -> Sequence[bytes]: ...
    async def providers(self, resource_id: bytes) -> Sequence[PeerLocation]: ...
    async def get(
        self,
        resource_id: bytes,
        dest: Path,
        *,
        force: bool = ...,
        progress: Callable[[Jsonable], None] | None = ...,
        phase: Callable[[Jsonable], None] | None = ...,
    ) -> Jsonable: ...


class MetricsSnapshot(TypedDict):
    """The node's raw counters and gauges, read when ``GET /metrics`` is scraped
    (p2pnode.control.metrics turns them into Prometheus metrics)."""

    node_id: bytes
    peer_id: str
    version: str
    uptime: float  # seconds since the node started
    joined: bool
    dht: dict[str, int]  # Discovery.stats()
    dht_contact_ids: list[bytes]  # node ids in the routing table
    net: dict[str, int]  # PeerHost.stats()
    exchange: dict[str, int]  # Exchange.stats()
    services: dict[str, int]  # Services.stats(): node-wide refusals, running calls, streams
    services_served: list[dict[str, Any]]  # Node.services(): per-service figures
    nat: NotRequired[dict[str, int]]  # AutoNat.snapshot(): probes, verdicts, refusals
    portmap: NotRequired[dict[str, int]]  # PortMapper.stats(); empty when it does not run
    relay: NotRequired[dict[str, int]]  # Relay.flat_stats(): the relay service and client


class NodeAPI(Protocol):
    """The part of :class:`p2pnode.node.Node` the control server uses."""

    @property
    def config(self) -> NodeConfig: ...
    @property
    def discovery(self) -> DhtAPI: ...
    @property
    def exchange(self) -> ExchangeAPI: ...
    def describe(self) -> dict[str, Any]: ...
    def peers(self) -> list[dict[str, Any]]: ...
    def connections(self) -> list[dict[str, Any]]: ...
    def status(self) -> dict[str, Any]: ...
    def metrics_snapshot(self) -> MetricsSnapshot: ...
    def request_stop(self) -> None: ...
    # Services (p2pnode.services): handlers take (request, CallContext).
    def serve(
        self, name: str, handler: Callable[[Any, Any], Awaitable[Any]], *, idempotent: bool = ...
    ) -> None: ...
    def serve_stream(
        self,
        name: str,
        handler: Callable[[Any, Any], AsyncIterator[Any]],
        *,
        idempotent: bool = ...,
    ) -> None: ...
    def unserve(self, name: str) -> None: ...
    def services(self) -> list[dict[str, Any]]: ...
    async def call(
        self, name: str, request: object, *, timeout: float = ..., peer: str | None = ...
    ) -> object: ...
    def call_stream(
        self, name: str, request: object, *, timeout: float = ..., peer: str | None = ...
    ) -> AsyncIterator[object]: ...
    async def find_service(self, name: str) -> Sequence[PeerLocation]: ...
