"""kademlia's protocol, hardened: the asyncio shell around the pure codec and schema.

What this class changes in ``kademlia.protocol.KademliaProtocol`` / ``rpcudp``:

- Datagrams are handled synchronously in :meth:`DhtProtocol.datagram_received`
  (no ``ensure_future`` per datagram): size check, a token bucket per source IP for
  requests, strict msgpack decoding (:mod:`.codec`), argument checks
  (:mod:`.rpc_schema`). Anything invalid is dropped and counted (``dropped.<reason>``)
  and gets no reply.
- Outgoing calls go through one explicit :meth:`DhtProtocol._call` (no
  ``__getattr__`` remote calls; an unknown attribute is an AttributeError again),
  with the timeout awaited by the caller (no ``call_later``) and the answer accepted
  only from the address the request went to. The ``call_*`` methods validate the
  answer and return typed results or ``None`` (no answer, or a malformed one).
- A routing-table contact is evicted after ``max_failures`` consecutive failures (a
  timeout or a malformed answer of a kademlia RPC); any answer resets the count.
  Timeouts of our own RPCs (add_provider, get_providers) do not count: stock nodes
  never answer them.
- Nodes enter the routing table only after they answered one of our requests. A node
  that sends us a request is pinged first (a bounded queue, a few at a time), so a
  spoofed source address cannot enter the table.
- Kademlia's "welcome" (push stored values to a new node) goes through a bounded
  queue drained at ``welcome_store_rate``, for nodes that answered us.
- Every background job (welcome and verification workers, bucket-head pings, cache
  stores) is a task in the owning :class:`TaskSet`, cancelled and awaited on close.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import random
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable

from p2pnode.clock import Clock
from p2pnode.dht import codec
from p2pnode.dht.codec import Limits, MessageError, Request, Response
from p2pnode.dht.config import DhtConfig
from p2pnode.dht.rpc_schema import (
    EXTRA_RPCS,
    RPC_NAMES,
    AddProviderRequest,
    FindNodeRequest,
    FindValueRequest,
    FoundValue,
    GetProvidersRequest,
    NodeAddr,
    NodeList,
    PingRequest,
    RpcRequest,
    SchemaLimits,
    StoreRequest,
    StunRequest,
    Value,
    is_port,
    normalize_host,
    parse_bool_response,
    parse_find_value_response,
    parse_get_providers_response,
    parse_node_list,
    parse_ping_response,
    parse_request,
)
from p2pnode.dht.storage import ProviderStore, ValueStore
from p2pnode.errors import DhtClosed, P2PTimeoutError, Unroutable, UsageError
from p2pnode.ratelimit import RateLimiter
from p2pnode.tasks import TaskSet

log = logging.getLogger(__name__)

T = TypeVar("T")
Address = tuple[str, int]

MAX_ID = 2**160 - 1
MAX_HEAD_PINGS = 16
WELCOMED_MEMORY = 4096

DROP_REASONS = (
    codec.TOO_SHORT,
    codec.OVERSIZED,
    codec.BAD_TYPE,
    codec.UNDECODABLE,
    codec.MALFORMED,
    "unknown_rpc",
    "bad_args",
    "bad_response",
    "bad_source",
    "rate_limited",
    "self_id",
    "unsolicited_response",
    "wrong_source",
    "reply_too_large",
)


@dataclass
class _Pending:
    future: asyncio.Future[object]
    address: Address
    name: str


class DhtRoutingTable(RoutingTable):
    """kademlia's table, but a full bucket pings its head through an owned task."""

    protocol: DhtProtocol

    def add_contact(self, node: Node) -> None:
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.add_node(node):
            return
        # Per section 4.2 of the paper, split if the bucket has our own id in its
        # range or if its depth is not congruent to 0 mod 5.
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            # ``node`` waits in the replacement list; the head is evicted after
            # max_failures failed pings (ours or other RPCs), then replaced.
            self.protocol.ping_head(bucket.head())

    def node_for(self, node_id: bytes) -> Node | None:
        """The contact with this id, or None."""
        bucket = self.buckets[self.get_bucket_for(Node(node_id))]
        found: Node | None = bucket.nodes.get(node_id)
        return found

    def all_nodes(self) -> list[Node]:
        return [node for bucket in self.buckets for node in bucket.get_nodes()]

    def closest_to(self, key: bytes, k: int, exclude: bytes | None = None) -> list[Node]:
        """The ``k`` contacts closest to ``key``, exactly (kademlia's find_neighbors
        approximates, and leaves out a contact whose id *is* the key)."""
        target = Node(key)
        self.buckets[self.get_bucket_for(target)].touch_last_updated()
        candidates = (n for n in self.all_nodes() if n.id != exclude)
        return heapq.nsmallest(k, candidates, key=target.distance_to)


class DhtProtocol(KademliaProtocol):
    def __init__(
        self,
        source_node: Node,
        storage: ValueStore,
        ksize: int,
        *,
        config: DhtConfig,
        clock: Clock,
        tasks: TaskSet,
    ) -> None:
        super().__init__(source_node, storage, ksize)
        self.router: DhtRoutingTable = DhtRoutingTable(self, ksize, source_node)
        self.storage: ValueStore = storage
        self.source_node: Node = source_node
        self.config = config
        self.clock = clock
        self.tasks = tasks
        self.providers = ProviderStore(
            clock,
            ttl=config.provider_ttl,
            max_per_key=config.max_providers_per_key,
            max_per_sender=config.max_provider_keys_per_sender,
            max_keys=config.max_provider_keys,
            max_records=config.max_provider_records,
        )
        self.transport: Any = None
        self._limits = Limits(config.max_datagram, config.max_array_len, config.max_map_len)
        self._schema = SchemaLimits(config.max_value_bytes, config.max_response_contacts)
        self._limiter = RateLimiter(
            clock,
            rate=config.request_rate,
            burst=config.request_burst,
            max_keys=config.rate_limit_table_size,
        )
        self._outstanding: dict[bytes, _Pending] = {}
        self.srtt: float | None = None  # smoothed RTT of answered calls (seconds)
        self._failures: dict[bytes, int] = {}
        self._last_seen: dict[bytes, float] = {}
        self._pinging_heads: set[bytes] = set()
        self._welcomed: OrderedDict[bytes, None] = OrderedDict()  # ids already welcomed
        self._welcome: asyncio.Queue[tuple[Node, bytes]] = asyncio.Queue(
            maxsize=max(1, config.welcome_queue_max)
        )
        self._verify: asyncio.Queue[tuple[bytes, str, int]] = asyncio.Queue(
            maxsize=max(1, config.verify_queue_max)
        )
        self._verify_pending: set[tuple[bytes, str, int]] = set()
        self._family = socket.AF_INET
        self._closing = False
        self._lost = asyncio.Event()
        self.stats: Counter[str] = Counter()
        for name in RPC_NAMES:
            self.stats[f"rpc_sent.{name}"] = 0
            self.stats[f"rpc_received.{name}"] = 0
            self.stats[f"rpc_timeout.{name}"] = 0
        for reason in DROP_REASONS:
            self.stats[f"dropped.{reason}"] = 0
        for counter in ("datagrams_sent", "bytes_sent", "datagrams_received", "bytes_received"):
            self.stats[counter] = 0

    def __getattr__(self, name: str) -> Any:
        # rpcudp turns any unknown attribute into a remote call; not here.
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # -- transport -----------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._family = sock.family
        self.tasks.spawn(self._welcome_worker(), "welcome")
        self.tasks.spawn(self._verify_worker(), "verify")

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost.set()

    def error_received(self, exc: Exception) -> None:
        self.stats["socket_errors"] += 1
        log.debug("DHT socket error: %s", exc)

    async def close(self, timeout: float = 2.0) -> None:
        """Fail every call in flight and close the transport (tasks: the owner's)."""
        self._closing = True
        for pending in list(self._outstanding.values()):
            if not pending.future.done():
                pending.future.set_exception(DhtClosed("the DHT was closed"))
        if self.transport is not None:
            self.transport.close()
            try:
                async with asyncio.timeout(timeout):
                    await self._lost.wait()
            except TimeoutError:
                log.debug("DHT transport did not report closing in %ss", timeout)

    def _sock_addr(self, host: str, port: int) -> Address:
        v6 = ":" in host
        if self._family == socket.AF_INET6 and not v6:
            return (f"::ffff:{host}", port)
        if self._family == socket.AF_INET and v6:
            raise Unroutable(f"cannot reach {host} from an IPv4 socket")
        return (host, port)

    def _send(self, data: bytes, host: str, port: int) -> bool:
        if self.transport is None or self._closing:
            return False
        try:
            target = self._sock_addr(host, port)
        except Unroutable:
            return False
        self._sendto(data, target)
        return True

    def _sendto(self, data: bytes, target: Address) -> None:
        self.stats["datagrams_sent"] += 1
        self.stats["bytes_sent"] += len(data)
        self.transport.sendto(data, target)

    def _drop(self, reason: str) -> None:
        self.stats[f"dropped.{reason}"] += 1

    # -- incoming ------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.stats["datagrams_received"] += 1
        self.stats["bytes_received"] += len(data)
        host = normalize_host(addr[0]) if addr else None
        port = addr[1] if addr and len(addr) > 1 else 0
        if host is None or not is_port(port):
            self._drop("bad_source")
            return
        if len(data) > self.config.max_datagram:
            self._drop(codec.OVERSIZED)
            return
        if data[:1] == b"\x00" and not self._allow_request(host):
            self._drop("rate_limited")
            return
        pending: _Pending | None = None
        if data[:1] == b"\x01" and len(data) > codec.HEADER_LEN:
            # Answers are decoded only if we are waiting for them, from that address.
            pending = self._outstanding.get(bytes(data[1 : codec.HEADER_LEN]))
            if pending is None:
                self._drop("unsolicited_response")
                return
            if pending.address != (host, port):
                self._drop("wrong_source")
                return
        try:
            message = codec.decode_datagram(data, self._limits)
        except MessageError as exc:
            self._drop(exc.reason)
            self._fail_pending(data, exc)
            return
        if isinstance(message, Response):
            # Checked above, before decoding (a response always has a full header).
            assert pending is not None
            self._accept_response_message(message, pending)
        else:
            self._handle_request(message, host, port)

    def _fail_pending(self, data: bytes, exc: MessageError) -> None:
        """An undecodable answer to a call of ours ends that call now (as malformed)
        rather than at its timeout. (The source was checked before decoding.)"""
        if data[:1] != b"\x01":
            return
        pending = self._outstanding.pop(bytes(data[1 : codec.HEADER_LEN]), None)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(exc)

    def _allow_request(self, host: str) -> bool:
        if not self.config.rate_limit_loopback and (host.startswith("127.") or host == "::1"):
            return True
        return self._limiter.allow(host)

    def _accept_response_message(self, message: Response, pending: _Pending) -> None:
        del self._outstanding[message.msg_id]
        self.stats["responses_received"] += 1
        if not pending.future.done():
            pending.future.set_result(message.payload)

    def _handle_request(self, message: Request, host: str, port: int) -> None:
        try:
            request = parse_request(message.name, message.args, self._schema)
        except MessageError as exc:
            self._drop(exc.reason)
            return
        node_id = getattr(request, "node_id", None)
        if node_id == self.source_node.id:
            self._drop("self_id")
            return
        self.stats[f"rpc_received.{message.name}"] += 1
        reply = self._answer(request, host, port)
        data = self._encode_reply(message.msg_id, reply)
        if data is None:
            self._drop("reply_too_large")
        else:
            self._send(data, host, port)
        if node_id is not None:
            self._note_requester(node_id, host, port)

    def _answer(self, request: RpcRequest, host: str, port: int) -> object:
        sender = (host, port)
        if isinstance(request, PingRequest):
            return self.rpc_ping(sender, request)
        if isinstance(request, StunRequest):
            return self.rpc_stun(sender)
        if isinstance(request, StoreRequest):
            return self.rpc_store(sender, request)
        if isinstance(request, FindNodeRequest):
            return self.rpc_find_node(sender, request)
        if isinstance(request, FindValueRequest):
            return self.rpc_find_value(sender, request)
        if isinstance(request, AddProviderRequest):
            return self.rpc_add_provider(sender, request)
        return self.rpc_get_providers(sender, request)

    def _encode_reply(self, msg_id: bytes, reply: object) -> bytes | None:
        data = codec.encode_response(msg_id, reply)
        # Only get_providers can grow past a datagram: halve its provider list.
        while len(data) > self.config.max_datagram and isinstance(reply, dict):
            providers = reply.get("providers")
            if not isinstance(providers, list) or not providers:
                return None
            reply = {**reply, "providers": providers[: len(providers) // 2]}
            data = codec.encode_response(msg_id, reply)
        return data if len(data) <= self.config.max_datagram else None

    # The handlers get checked arguments (see rpc_schema); they never raise.

    def rpc_stun(self, sender: Address) -> object:
        return [sender[0], sender[1]]

    def rpc_ping(self, sender: Address, request: PingRequest) -> object:
        return self.source_node.id

    def rpc_store(self, sender: Address, request: StoreRequest) -> object:
        stored = self.storage.put(request.key, request.value, sender=sender[0])
        self.stats["stores_accepted" if stored else "stores_refused"] += 1
        return stored

    def rpc_find_node(self, sender: Address, request: FindNodeRequest) -> object:
        return self._neighbors_wire(request.key, request.node_id, sender)

    def rpc_find_value(self, sender: Address, request: FindValueRequest) -> object:
        value = self.storage.get(request.key)
        if value is None:
            return self._neighbors_wire(request.key, request.node_id, sender)
        return {"value": value}

    def rpc_add_provider(self, sender: Address, request: AddProviderRequest) -> object:
        # The host is the address the announcement came from, never a claimed one.
        added = self.providers.add(
            request.key, request.node_id, sender[0], request.port, sender=sender[0]
        )
        self.stats["providers_accepted" if added else "providers_refused"] += 1
        return added

    def rpc_get_providers(self, sender: Address, request: GetProvidersRequest) -> object:
        records = self.providers.get(request.key, limit=self.config.max_providers_per_response)
        return {
            "providers": [[r.node_id, r.host, r.port] for r in records],
            "nodes": self._neighbors_wire(request.key, request.node_id, sender),
        }

    def _neighbors_wire(self, key: bytes, requester: bytes, sender: Address) -> list[list[object]]:
        nodes = self.router.closest_to(key, self.router.ksize + 1, exclude=requester)
        nodes = [n for n in nodes if (n.ip, n.port) != sender][: self.router.ksize]
        return [[n.id, n.ip, n.port] for n in nodes]

    def _note_requester(self, node_id: bytes, host: str, port: int) -> None:
        """A request came from (node_id, host, port): unproven, since UDP sources can
        be forged. A known contact at that address is marked seen; anyone else is
        pinged (bounded) before entering the routing table."""
        known = self.router.node_for(node_id)
        if known is not None and (known.ip, known.port) == (host, port):
            self._last_seen[node_id] = time.time()
            return
        item = (node_id, host, port)
        if item in self._verify_pending:
            return
        try:
            self._verify.put_nowait(item)
        except asyncio.QueueFull:
            self.stats["verify_dropped"] += 1
            return
        self._verify_pending.add(item)
        self.stats["verify_queued"] += 1

    # -- outgoing ------------------------------------------------------------------

    def _sample_rtt(self, rtt: float) -> None:
        # Smoothed round-trip time of answered calls, as TCP keeps it (RFC 6298).
        self.srtt = rtt if self.srtt is None else 0.875 * self.srtt + 0.125 * rtt

    async def _call(self, address: Address, name: str, *args: object) -> object:
        """Send request ``name(*args)`` to ``address``; the raw decoded answer.

        Raises P2PTimeoutError (no answer in rpc_timeout), Unroutable, DhtClosed.
        """
        if self._closing or self.transport is None:
            raise DhtClosed("the DHT is not running")
        host, port = normalize_host(address[0]), address[1]
        if host is None or not is_port(port):
            raise Unroutable(f"not an IP address and port: {address!r}")
        target = self._sock_addr(host, port)
        msg_id = os.urandom(codec.MSG_ID_LEN)
        data = codec.encode_request(msg_id, name, args)
        if len(data) > self.config.max_datagram:
            raise UsageError(f"{name} request of {len(data)} bytes is too large")
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._outstanding[msg_id] = _Pending(future, (host, port), name)
        self.stats[f"rpc_sent.{name}"] += 1
        try:
            self._sendto(data, target)
            sent_at = asyncio.get_running_loop().time()
            async with asyncio.timeout(self.config.rpc_timeout):
                answer = await future
            self._sample_rtt(asyncio.get_running_loop().time() - sent_at)
            return answer
        except TimeoutError:
            self.stats[f"rpc_timeout.{name}"] += 1
            raise P2PTimeoutError(f"{name} to {host}:{port}: no answer") from None
        finally:
            self._outstanding.pop(msg_id, None)

    async def _ask(
        self,
        node: Node,
        name: str,
        args: tuple[object, ...],
        parse: Callable[[object], T],
    ) -> T | None:
        """One call to a node: its validated answer, or None (no or bad answer)."""
        try:
            payload = await self._call((node.ip, node.port), name, *args)
        except P2PTimeoutError:
            if name not in EXTRA_RPCS:  # stock nodes never answer ours
                self._record_failure(node)
            return None
        except Unroutable:
            self._record_failure(node)
            return None
        except DhtClosed:
            return None
        except MessageError:  # undecodable (counted where it arrived)
            self._record_failure(node)
            return None
        try:
            result = parse(payload)
        except MessageError as exc:
            self._drop(exc.reason)
            log.debug("bad %s answer from %s:%s: %s", name, node.ip, node.port, exc)
            self._record_failure(node)
            return None
        self.node_answered(node)
        return result

    async def ping_address(
        self, host: str, port: int, expected: bytes | None = None
    ) -> bytes | None:
        """Ping an address; the node id that answered, or None."""
        try:
            payload = await self._call((host, port), "ping", self.source_node.id)
        except DhtClosed:
            return None
        except (P2PTimeoutError, Unroutable, MessageError):
            payload = None  # no answer, or an undecodable one (counted on arrival)
        try:
            remote_id = parse_ping_response(payload) if payload is not None else None
        except MessageError as exc:
            self._drop(exc.reason)
            remote_id = None
        if remote_id is None:
            if expected is not None:
                self._record_failure(Node(expected, host, port))
            return None
        if expected is not None and remote_id != expected:
            self._record_failure(Node(expected, host, port))
        clean = normalize_host(host)
        if clean is not None:
            self.node_answered(Node(remote_id, clean, port))
        return remote_id

    async def call_ping(self, node_to_ask: Node) -> bytes | None:
        return await self.ping_address(node_to_ask.ip, node_to_ask.port, node_to_ask.id)

    async def call_store(self, node_to_ask: Node, key: bytes, value: Value) -> bool | None:
        """True stored, False refused, None no (valid) answer."""
        return await self._ask(
            node_to_ask, "store", (self.source_node.id, key, value), parse_bool_response
        )

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> list[Node] | None:
        answer = await self._ask(
            node_to_ask,
            "find_node",
            (self.source_node.id, node_to_find.id),
            lambda payload: parse_node_list(payload, self._schema),
        )
        return None if answer is None else self._nodes(answer)

    async def call_find_value(
        self, node_to_ask: Node, node_to_find: Node
    ) -> FoundValue | list[Node] | None:
        answer = await self._ask(
            node_to_ask,
            "find_value",
            (self.source_node.id, node_to_find.id),
            lambda payload: parse_find_value_response(payload, self._schema),
        )
        if answer is None or isinstance(answer, FoundValue):
            return answer
        return self._nodes(answer)

    async def call_add_provider(self, node_to_ask: Node, key: bytes, port: int) -> bool | None:
        return await self._ask(
            node_to_ask, "add_provider", (self.source_node.id, key, port), parse_bool_response
        )

    async def call_get_providers(
        self, node_to_ask: Node, key: bytes
    ) -> tuple[list[NodeAddr], list[Node]] | None:
        answer = await self._ask(
            node_to_ask,
            "get_providers",
            (self.source_node.id, key),
            lambda payload: parse_get_providers_response(payload, self._schema),
        )
        if answer is None:
            return None
        return answer.providers.nodes, self._nodes(answer.nodes)

    def _nodes(self, listed: NodeList) -> list[Node]:
        if listed.skipped:
            self.stats["bad_contacts_skipped"] += listed.skipped
        me = self.source_node.id
        return [Node(a.node_id, a.host, a.port) for a in listed.nodes if a.node_id != me]

    # -- routing table -------------------------------------------------------------

    def node_answered(self, node: Node) -> None:
        """``node`` answered one of our requests at its address: it is alive."""
        if node.id == self.source_node.id:
            return
        self._failures.pop(node.id, None)
        self._last_seen[node.id] = time.time()
        if len(self._last_seen) > 16 * self.router.ksize * 160:
            self._prune_last_seen()
        if self.router.is_new_node(node):
            self.welcome_if_new(node)
        self.router.add_contact(node)

    def welcome_if_new(self, node: Node) -> None:
        """Queue the values ``node`` should store (section 2.5 of the paper), bounded:
        once per node id (of the last WELCOMED_MEMORY), at most welcome_scan_max
        values looked at, a full queue drops the rest."""
        if self._closing:
            return
        if node.id in self._welcomed:
            return
        self._welcomed[node.id] = None
        while len(self._welcomed) > WELCOMED_MEMORY:
            self._welcomed.popitem(last=False)
        for key, _ in self.storage.newest(self.config.welcome_scan_max):
            keynode = Node(key)
            neighbors = self.router.closest_to(key, self.router.ksize)
            if neighbors:
                new_node_close = node.distance_to(keynode) < neighbors[-1].distance_to(keynode)
                this_closest = self.source_node.distance_to(keynode) < neighbors[0].distance_to(
                    keynode
                )
                if not (new_node_close and this_closest):
                    continue
            try:
                self._welcome.put_nowait((node, key))
            except asyncio.QueueFull:
                self.stats["welcome_dropped"] += 1
                return
            self.stats["welcome_queued"] += 1

    def handle_call_response(self, result: Any, node: Node) -> Any:
        raise NotImplementedError("DhtProtocol validates answers in its call_* methods")

    def _record_failure(self, node: Node) -> None:
        """A failed RPC to ``node``: evict it after max_failures in a row."""
        known = self.router.node_for(node.id)
        if known is None or (known.ip, known.port) != (node.ip, node.port):
            return
        failures = self._failures.get(node.id, 0) + 1
        self.stats["failures"] += 1
        if failures < self.config.max_failures:
            self._failures[node.id] = failures
            return
        log.debug("evicting %s after %d failures", node, failures)
        self._failures.pop(node.id, None)
        self._last_seen.pop(node.id, None)
        self.router.remove_contact(known)
        self.stats["evictions"] += 1

    def _prune_last_seen(self) -> None:
        keep = {n.id for b in self.router.buckets for n in b.get_nodes()}
        keep.update(n.id for b in self.router.buckets for n in b.replacement_nodes.values())
        self._last_seen = {k: v for k, v in self._last_seen.items() if k in keep}

    def last_seen(self, node_id: bytes) -> float | None:
        return self._last_seen.get(node_id)

    def failures(self, node_id: bytes) -> int:
        return self._failures.get(node_id, 0)

    def ping_head(self, head: Node) -> None:
        """A full bucket met a new node: ping its least recently seen contact."""
        if head.id in self._pinging_heads or len(self._pinging_heads) >= MAX_HEAD_PINGS:
            return
        self._pinging_heads.add(head.id)
        if self.tasks.spawn(self._ping_head(head), "head-ping") is None:
            self._pinging_heads.discard(head.id)

    async def _ping_head(self, head: Node) -> None:
        try:
            await self.call_ping(head)
        finally:
            self._pinging_heads.discard(head.id)

    def get_refresh_ids(self) -> list[bytes]:
        """A random id in every bucket not looked up for refresh_interval."""
        cutoff = time.monotonic() - self.config.refresh_interval
        ids = []
        for bucket in self.router.buckets:
            if bucket.last_updated < cutoff:
                low, high = bucket.range
                ids.append(random.randint(low, min(high, MAX_ID)).to_bytes(20, "big"))
        return ids

    # -- workers -------------------------------------------------------------------

    async def _welcome_worker(self) -> None:
        interval = 1.0 / self.config.welcome_store_rate if self.config.welcome_store_rate > 0 else 0
        while True:
            node, key = await self._welcome.get()
            value = self.storage.get(key)
            if value is None:
                continue
            self.stats["welcome_sent"] += 1
            await self.call_store(node, key, value)
            if interval:
                await asyncio.sleep(interval)

    async def _verify_worker(self) -> None:
        slots = asyncio.Semaphore(max(1, self.config.verify_concurrency))
        while True:
            item = await self._verify.get()
            await slots.acquire()
            if self.tasks.spawn(self._verify_one(slots, item), "verify-ping") is None:
                slots.release()
                self._verify_pending.discard(item)

    async def _verify_one(self, slots: asyncio.Semaphore, item: tuple[bytes, str, int]) -> None:
        _, host, port = item
        try:
            await self.ping_address(host, port)
        finally:
            slots.release()
            self._verify_pending.discard(item)

    # -- introspection -------------------------------------------------------------

    def snapshot(self) -> dict[str, int]:
        out = dict(self.stats)
        out["contacts"] = len(self.router.all_nodes())
        out["stored_values"] = len(self.storage)
        out["provider_records"] = len(self.providers)
        out["provider_keys"] = self.providers.key_count
        out["outstanding_rpcs"] = len(self._outstanding)
        out["welcome_queue"] = self._welcome.qsize()
        out["verify_queue"] = self._verify.qsize()
        out["rate_limited_sources"] = len(self._limiter)
        out["background_tasks"] = len(self.tasks)
        return out
