"""The DHT's protocol logic, with no I/O and no asyncio (in the shape of aioquic's
``QuicConnection``): datagrams and a time go in; datagrams to send, events and the
next deadline come out.

Inputs:

- :meth:`DhtCore.receive_datagram` ``(data, addr, now)``: a datagram from the
  socket. Requests are answered at once (the reply waits in
  :meth:`~DhtCore.datagrams_to_send`); answers complete our calls.
- :meth:`DhtCore.start_call` ``(address, rpc, args, now)``: a call of ours; it
  returns a call id and ends as a :class:`CallAnswered` (the parsed, checked
  answer) or :class:`CallFailed` event. :meth:`DhtCore.cancel_call` forgets one.
- :meth:`DhtCore.handle_timer` ``(now)``: call timeouts, and the verification and
  welcome queues drained at their rates (queued work is due at once, so a burst of
  datagrams is read before the queues are served, as a worker task would).

Outputs: :meth:`~DhtCore.datagrams_to_send`, :meth:`~DhtCore.events` (call
outcomes and routing-table changes: :class:`ContactAdded`, :class:`ContactRemoved`)
and :meth:`~DhtCore.next_deadline`.

Rules kept from the hardened protocol:

- Every datagram is size checked; requests pass a token bucket per source IP;
  decoding is strict (:mod:`.codec`, :mod:`.rpc_schema`). Anything invalid is
  dropped and counted (``dropped.<reason>``) and gets no reply.
- An answer is decoded only if we wait for it, and accepted only from the address
  the request went to.
- A contact is evicted after ``max_failures`` consecutive failures (a timeout or a
  malformed answer to a kademlia RPC); any answer resets the count. Timeouts of our
  own RPCs (add_provider, get_providers) do not count: stock nodes never answer them.
- Nodes enter the routing table only after answering one of our requests. A node
  that sends us a request is pinged first (a bounded queue, a few at a time, a few
  per subnet), so a spoofed source address cannot enter the table.
- A node's id is the hash of its Ed25519 key, and it proves it (identify: it signs
  a fresh challenge of ours) before it counts as proven. Until then, or if it never
  can (a stock kademlia node), it is a lookup hint: the table keeps only a few
  unproven contacts per bucket (none if ``accept_unproven_contacts`` is off), and
  only proven nodes are welcomed with values.
- The table keeps only a few contacts per /24 or /64, per bucket and in all.
- Store and add_provider are accepted only with a token the sender's IP earned
  from our identify or get_providers answer (BEP 5); a provider record must be
  validly signed and dial only the address it came from.
- A node whose identify says it is a DHT client is removed from the table and
  kept out (for CLIENT_RECHECK); until identify answered, a requester sits in the
  table as an unproven contact, as a stock node does (deferring it until identify
  decides would keep stock nodes out for a whole rpc_timeout and break lookups
  through them; the window is one round trip).
- Client mode (:meth:`DhtCore.set_client_mode`, while the node is not reachable,
  as libp2p kad-dht does): identify says "client" (signed), and lookups, stores
  and provider requests from others get no answer (counted); our own calls go on.
  An identify request from a contact we proved a while ago makes us prove it
  again: that is how a node that switched mode re-announces itself.
- ``dial_back`` (AutoNAT's UDP probe) is never answered: its nonce is reported
  as a :class:`DialBackReceived` event.
- Kademlia's "welcome" (push stored values to a new node) goes through a bounded
  queue drained at ``welcome_store_rate``.
- A full bucket that may not split pings its head (at most MAX_HEAD_PINGS at once).

Randomness (message ids, refresh ids) comes from the injected ``random.Random``;
time from the ``now`` arguments (the stores and the rate limiter read the injected
clock, which the shell also reads for ``now``).
"""

from __future__ import annotations

import heapq
import ipaddress
import random
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Final, TypeVar

from kademlia.node import Node

from p2pnode.clock import Clock
from p2pnode.dht import codec, proof
from p2pnode.dht.codec import Limits, MessageError, Request, Response
from p2pnode.dht.config import DhtConfig
from p2pnode.dht.records import (
    ProviderRecord,
    RecordError,
    parse_provider_record,
    verify_provider_record,
)
from p2pnode.dht.rpc_schema import (
    EXTRA_RPCS,
    RPC_NAMES,
    AddProviderRequest,
    DialBackRequest,
    FindNodeRequest,
    FindValueRequest,
    FoundValue,
    GetProvidersRequest,
    IdentifyAnswer,
    IdentifyRequest,
    NodeList,
    PingRequest,
    RpcRequest,
    SchemaLimits,
    StoreRequest,
    StunRequest,
    is_port,
    normalize_host,
    parse_bool_response,
    parse_find_value_response,
    parse_get_providers_response,
    parse_identify_response,
    parse_node_list,
    parse_ping_response,
    parse_request,
    parse_stun_response,
)
from p2pnode.dht.storage import ProviderStore, ValueStore
from p2pnode.dht.table import RoutingTable, diversity_group
from p2pnode.dht.tokens import TokenIssuer
from p2pnode.errors import DhtClosed, UsageError
from p2pnode.identity import Identity
from p2pnode.ratelimit import RateLimiter
from p2pnode.subnets import subnet_of

Address = tuple[str, int]
_V = TypeVar("_V")

MAX_ID = 2**160 - 1
MAX_HEAD_PINGS = 16
WELCOMED_MEMORY = 4096
MAX_PROOFS = 64  # identify calls of our own in flight
CHALLENGE_LEN = 16
# A node that could not prove its id is not asked again for this long.
UNPROVABLE_RETRY = 600.0
# A node that proved it is a DHT client is not asked again for this long.
CLIENT_RECHECK = 120.0
# An identify request from a proven contact re-proves it at most this often.
REPROVE_INTERVAL = 10.0

# Why a call failed (CallFailed.reason).
TIMEOUT: Final = "timeout"
MALFORMED: Final = "malformed"  # undecodable, or not a valid answer to that RPC
UNROUTABLE: Final = "unroutable"
CLOSED: Final = "closed"

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
    "bad_proof",
)

# What a client does not answer for others (while in client mode).
_SERVER_REQUESTS = (
    FindNodeRequest,
    FindValueRequest,
    StoreRequest,
    AddProviderRequest,
    GetProvidersRequest,
)
_NO_ANSWER = object()  # a request that gets no reply

# Who started a call: the API (its outcome is an event) or the core itself.
_API, _VERIFY, _HEAD, _WELCOME, _PROVE, _HINT = range(6)


@dataclass(frozen=True, slots=True)
class CallAnswered:
    """A call of ours was answered. ``result`` by RPC: ping → the answering node id
    (bytes); store, add_provider → bool; find_node → list[Node]; find_value →
    FoundValue or list[Node]; get_providers → (list[ProviderRecord], list[Node],
    token), the records verified; identify → IdentifyAnswer, the proof checked
    against the node id the call named; stun → (host, port)."""

    call_id: int
    result: object


@dataclass(frozen=True, slots=True)
class CallFailed:
    """A call of ours ended without a valid answer (``reason``: timeout,
    malformed, unroutable or closed)."""

    call_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class ContactAdded:
    node: Node


@dataclass(frozen=True, slots=True)
class ContactRemoved:
    node: Node


@dataclass(frozen=True, slots=True)
class DialBackReceived:
    """An AutoNAT UDP probe arrived on our socket (from a server's fresh socket)."""

    nonce: bytes
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class AddressObserved:
    """A node that proved its id (``observer``, at ``observer_host``) saw our
    datagrams come from ``observed_host``."""

    observer: bytes
    observer_host: str
    observed_host: str


Event = (
    CallAnswered | CallFailed | ContactAdded | ContactRemoved | DialBackReceived | AddressObserved
)


def dial_back_datagram(msg_id: bytes, nonce: bytes) -> bytes:
    """The UDP dial-back an AutoNAT server sends to a prober's DHT port."""
    return codec.encode_request(msg_id, "dial_back", (nonce,))


@dataclass(slots=True)
class _Call:
    call_id: int
    msg_id: bytes
    address: Address
    name: str
    node_id: bytes | None  # who should answer (failure accounting); None: anyone
    sent_at: float
    deadline: float
    origin: int
    item: tuple[bytes, str, int] | None = None  # the requester a verify ping checks
    challenge: bytes = b""  # what an identify call asked to be signed


class DhtCore:
    """One DHT node's protocol state: routing table, stores, calls in flight, queues.

    ``ipv6_socket`` says what the socket underneath is: an IPv4 address is then
    sent to as ``::ffff:a.b.c.d``, and an IPv6 one from an IPv4 socket is
    unroutable.
    """

    def __init__(
        self,
        identity: Identity,
        config: DhtConfig,
        *,
        clock: Clock,
        rng: random.Random,
        storage: ValueStore | None = None,
        providers: ProviderStore | None = None,
    ) -> None:
        node_id = identity.node_id
        self.identity = identity
        self.node = Node(node_id)
        self.node_id = node_id
        self.config = config
        self.clock = clock
        self.rng = rng
        self.ipv6_socket = False
        exempt = config.diversity_exempt_loopback
        self.table = RoutingTable(
            self.node,
            config.ksize,
            clock.now(),
            max_per_group_bucket=config.max_contacts_per_subnet_bucket,
            max_per_group_table=config.max_contacts_per_subnet_table,
            max_unproven_per_bucket=(
                config.max_unproven_per_bucket if config.accept_unproven_contacts else 0
            ),
            group_of=lambda ip: diversity_group(ip, exempt),
        )
        self.tokens = TokenIssuer(rng, clock.now(), config.token_rotation)
        if storage is None:
            storage = ValueStore(
                clock,
                max_values=config.max_stored_values,
                ttl=config.value_ttl,
                max_value_bytes=config.max_value_bytes,
                max_per_sender=config.max_values_per_sender,
                max_per_subnet=config.max_values_per_subnet,
                max_bytes=config.max_value_store_bytes,
            )
        self.storage = storage
        if providers is None:
            providers = ProviderStore(
                clock,
                ttl=config.provider_ttl,
                max_per_key=config.max_providers_per_key,
                max_per_sender=config.max_provider_keys_per_sender,
                max_keys=config.max_provider_keys,
                max_records=config.max_provider_records,
                max_per_key_per_sender=config.max_providers_per_key_per_ip,
                max_per_key_per_subnet=config.max_providers_per_key_per_subnet,
                max_per_subnet=config.max_provider_records_per_subnet,
                max_bytes=config.max_provider_bytes,
            )
        self.providers = providers
        self._limits = Limits(config.max_datagram, config.max_array_len, config.max_map_len)
        self._schema = SchemaLimits(config.max_value_bytes, config.max_response_contacts)
        self._limiter = RateLimiter(
            clock,
            rate=config.request_rate,
            burst=config.request_burst,
            max_keys=config.rate_limit_table_size,
        )
        self._calls: dict[bytes, _Call] = {}  # by message id
        self._call_ids: dict[int, bytes] = {}  # call id → message id
        self._next_call_id = 1
        # (deadline, message id); entries of calls already ended are skipped lazily.
        self._timeouts: list[tuple[float, bytes]] = []
        self._out: list[tuple[bytes, Address]] = []
        self._events: list[Event] = []
        self.srtt: float | None = None  # smoothed RTT of answered calls (seconds)
        self._failures: dict[bytes, int] = {}
        self._last_seen: dict[bytes, float] = {}
        self._rtt: dict[bytes, float] = {}  # smoothed round trip per contact (seconds)
        self._pinging_heads: set[bytes] = set()
        self._welcomed: OrderedDict[bytes, None] = OrderedDict()  # ids already welcomed
        self._welcome: deque[tuple[Node, bytes]] = deque()
        self._welcome_next = 0.0  # when the next welcome store may go
        self._verify: deque[tuple[bytes, str, int]] = deque()
        self._verify_pending: set[tuple[bytes, str, int]] = set()
        self._verify_subnets: Counter[str] = Counter()  # queued verify work per subnet
        # Proven ids → the address they proved it at; ids that could not prove → when.
        self._proven: OrderedDict[bytes, Address] = OrderedDict()
        self._unprovable: OrderedDict[bytes, float] = OrderedDict()
        self._proving: set[bytes] = set()
        # Ids that proved they are DHT clients -> when; ids re-proven on a hint -> when.
        self._clients: OrderedDict[bytes, float] = OrderedDict()
        self._reproved_at: OrderedDict[bytes, float] = OrderedDict()
        self._hinted: OrderedDict[bytes, float] = OrderedDict()  # told we are a client
        self.client_mode = False
        # Tokens nodes gave us (identify answers): what a store to them must carry.
        self._tokens_from: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self._verifying = 0
        self._queued_at = 0.0  # when verify work last became possible (due at once)
        self.closed = False
        self.stats: Counter[str] = Counter()
        for name in RPC_NAMES:
            self.stats[f"rpc_sent.{name}"] = 0
            self.stats[f"rpc_received.{name}"] = 0
            self.stats[f"rpc_timeout.{name}"] = 0
        for reason in DROP_REASONS:
            self.stats[f"dropped.{reason}"] = 0
        for counter in (
            "datagrams_sent",
            "bytes_sent",
            "datagrams_received",
            "bytes_received",
            "stores_accepted",
            "stores_refused",
            "stores_refused_token",
            "providers_accepted",
            "providers_refused",
            "providers_refused_token",
            "providers_refused_foreign_address",
            "proofs_started",
            "proofs_ok",
            "proofs_failed",
            "proofs_dropped",
            "identify_answered",
            "client_mode_unanswered",
            "clients_refused",
            "clients_removed",
            "dial_backs_received",
            "reproofs_requested",
            "client_hints_sent",
        ):
            self.stats[counter] = 0

    # -- outputs -------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """(data, address) pairs to send, in order; the list is handed over."""
        out = self._out
        if out:
            self._out = []
        return out

    def events(self) -> list[Event]:
        """Events since the last call, in order; the list is handed over."""
        events = self._events
        if events:
            self._events = []
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` has work next (None: nothing scheduled)."""
        timeouts = self._timeouts
        calls = self._calls
        while timeouts and timeouts[0][1] not in calls:
            heapq.heappop(timeouts)
        deadline = timeouts[0][0] if timeouts else None
        # Queued work waits for the timer (a burst of requests is read first).
        if self._welcome and (deadline is None or self._welcome_next < deadline):
            deadline = self._welcome_next
        if (
            self._verify
            and self._verifying < max(1, self.config.verify_concurrency)
            and (deadline is None or self._queued_at < deadline)
        ):
            deadline = self._queued_at
        return deadline

    def _send(self, data: bytes, target: Address) -> None:
        stats = self.stats
        stats["datagrams_sent"] += 1
        stats["bytes_sent"] += len(data)
        self._out.append((data, target))

    def _drop(self, reason: str) -> None:
        self.stats[f"dropped.{reason}"] += 1

    def _target(self, host: str, port: int) -> Address | None:
        """Where to send on this socket (None: unroutable from it)."""
        v6 = ":" in host
        if self.ipv6_socket and not v6:
            return (f"::ffff:{host}", port)
        if not self.ipv6_socket and v6:
            return None
        return (host, port)

    # -- timers --------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        """Time out calls whose deadline passed; drain the queues."""
        timeouts = self._timeouts
        while timeouts and timeouts[0][0] <= now:
            deadline, msg_id = heapq.heappop(timeouts)
            call = self._calls.get(msg_id)
            if call is None or call.deadline != deadline:
                continue
            self._forget(call)
            self.stats[f"rpc_timeout.{call.name}"] += 1
            self._failed(call, TIMEOUT, now)
        if self._verify:
            self._drain_verify(now)
        if self._welcome:
            self._drain_welcome(now)

    # -- incoming ------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: tuple[object, ...], now: float) -> None:
        stats = self.stats
        stats["datagrams_received"] += 1
        stats["bytes_received"] += len(data)
        host = normalize_host(addr[0]) if addr else None
        port = addr[1] if host is not None and len(addr) > 1 else 0
        if host is None or not is_port(port):
            self._drop("bad_source")
            return
        assert isinstance(port, int)
        if len(data) > self.config.max_datagram:
            self._drop(codec.OVERSIZED)
            return
        kind = data[:1]
        if kind == b"\x00" and not self._allow_request(host):
            self._drop("rate_limited")
            return
        call: _Call | None = None
        if kind == b"\x01" and len(data) > codec.HEADER_LEN:
            # Answers are decoded only if we are waiting for them, from that address.
            call = self._calls.get(bytes(data[1 : codec.HEADER_LEN]))
            if call is None:
                self._drop("unsolicited_response")
                return
            if call.address != (host, port):
                self._drop("wrong_source")
                return
        try:
            message = codec.decode_datagram(data, self._limits)
        except MessageError as exc:
            self._drop(exc.reason)
            if call is not None:  # an undecodable answer ends the call now
                self._forget(call)
                self._failed(call, MALFORMED, now)
            return
        if isinstance(message, Response):
            assert call is not None  # checked above (a response has a full header)
            self._answered(call, message.payload, now)
        else:
            self._handle_request(message, host, port, now)

    def _allow_request(self, host: str) -> bool:
        if not self.config.rate_limit_loopback and (host.startswith("127.") or host == "::1"):
            return True
        return self._limiter.allow(host)

    def _handle_request(self, message: Request, host: str, port: int, now: float) -> None:
        try:
            request = parse_request(message.name, message.args, self._schema)
        except MessageError as exc:
            self._drop(exc.reason)
            return
        node_id = getattr(request, "node_id", None)
        if node_id == self.node_id:
            self._drop("self_id")
            return
        self.stats[f"rpc_received.{message.name}"] += 1
        reply = self._answer(request, host, port, now)
        if reply is not _NO_ANSWER:
            data = self._encode_reply(message.msg_id, reply)
            if data is None:
                self._drop("reply_too_large")
            else:
                target = self._target(host, port)
                if target is not None:
                    self._send(data, target)
        if node_id is not None:
            self._note_requester(node_id, host, port, now)
            if isinstance(request, IdentifyRequest) and request.mode is not None:
                self._mode_hint(node_id, host, port, request.mode, now)

    def _answer(self, request: RpcRequest, host: str, port: int, now: float) -> object:
        # The handlers get checked arguments (see rpc_schema); they never raise.
        if isinstance(request, DialBackRequest):
            self.stats["dial_backs_received"] += 1
            self._events.append(DialBackReceived(request.nonce, host, port))
            return _NO_ANSWER
        if self.client_mode and isinstance(request, _SERVER_REQUESTS):
            self.stats["client_mode_unanswered"] += 1
            self._tell_client(request.node_id, host, port, now)
            return _NO_ANSWER
        if isinstance(request, FindNodeRequest):
            return self._neighbors_wire(request.key, request.node_id, (host, port), now)
        if isinstance(request, PingRequest):
            return self.node_id
        if isinstance(request, FindValueRequest):
            value = self.storage.get(request.key, now)
            if value is None:
                return self._neighbors_wire(request.key, request.node_id, (host, port), now)
            return {"value": value}
        if isinstance(request, StoreRequest):
            if request.token is None or not self.tokens.check(host, request.token, now):
                # No proof that the sender receives at its address (or a stock store).
                self.stats["stores_refused_token"] += 1
                return False
            stored = self.storage.put(request.key, request.value, sender=host, now=now)
            self.stats["stores_accepted" if stored else "stores_refused"] += 1
            return stored
        if isinstance(request, StunRequest):
            return [host, port]
        if isinstance(request, IdentifyRequest):
            mode = "client" if self.client_mode else "server"
            signature = proof.prove(self.identity, request.node_id, request.challenge, mode)
            self.stats["identify_answered"] += 1
            token = self.tokens.token_for(host, now)
            return [self.identity.public_key, signature, token, host, mode]
        if isinstance(request, AddProviderRequest):
            return self._add_provider(request, host, now)
        assert isinstance(request, GetProvidersRequest)
        # A fair sample: at most one record per IP, freshest first. Our own local
        # record names our listening address (loopback on a wildcard bind): only
        # for an asker on loopback too, else it would dial its own loopback.
        foreign_asker = not _is_loopback(host)
        records = [
            r
            for r in self.providers.get_records(
                request.key, self.config.max_providers_per_response + 1, now
            )
            if not (foreign_asker and r.peer_id == self.node_id and _is_loopback(r.host))
        ][: self.config.max_providers_per_response]
        return {
            "providers": [r.to_wire() for r in records],
            "nodes": self._neighbors_wire(request.key, request.node_id, (host, port), now),
            "token": self.tokens.token_for(host, now),
        }

    def _add_provider(self, request: AddProviderRequest, host: str, now: float) -> bool:
        stats = self.stats
        if not self.tokens.check(host, request.token, now):
            stats["providers_refused_token"] += 1
            return False
        try:
            record = parse_provider_record(request.key, request.record)
        except RecordError as exc:
            stats[f"providers_refused_{exc.reason}"] += 1
            return False
        # A record may only send downloaders to the address it came from: otherwise
        # anyone could make every downloader dial a victim.
        if any(addr_host != host for addr_host, _ in record.addrs):
            stats["providers_refused_foreign_address"] += 1
            return False
        # Relay addresses send dialers elsewhere: only to a relay this node has
        # proven (a contact with that id at that address), so a record cannot
        # point dialers at a victim. An unknown one is checked (bounded) for the
        # next announcement.
        for relay_host, relay_port, relay_id in record.relays:
            known = self.table.node_for(relay_id)
            if (
                known is None
                or known.ip != relay_host
                or known.port != relay_port
                or not self.table.is_proven(relay_id)
            ):
                stats["providers_refused_unproven_relay"] += 1
                if known is None and relay_id != self.node_id:
                    self._note_requester(relay_id, relay_host, relay_port, now)
                return False
        added = self.providers.add_record(record, host, now)
        stats["providers_accepted" if added else "providers_refused"] += 1
        return added

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

    def _neighbors_wire(
        self, key: bytes, requester: bytes, sender: Address, now: float
    ) -> list[list[object]]:
        k = self.config.ksize
        nodes = self.table.closest_to(key, k + 1, now, exclude=requester)
        return [[n.id, n.ip, n.port] for n in nodes if (n.ip, n.port) != sender][:k]

    def _note_requester(self, node_id: bytes, host: str, port: int, now: float) -> None:
        """A request came from (node_id, host, port): unproven, since UDP sources can
        be forged. A known contact at that address is marked seen; anyone else is
        pinged (bounded) before entering the routing table."""
        known = self.table.node_for(node_id)
        if known is not None and known.ip == host and known.port == port:
            self._last_seen[node_id] = now
            return
        item = (node_id, host, port)
        if item in self._verify_pending:
            return
        if len(self._verify) >= max(1, self.config.verify_queue_max):
            self.stats["verify_dropped"] += 1
            return
        # Spoofed sources are cheap: one subnet may hold only a few queued checks.
        subnet = subnet_of(host)
        if self._verify_subnets[subnet] >= self.config.verify_queue_per_subnet:
            self.stats["verify_dropped_subnet"] += 1
            return
        self._verify_subnets[subnet] += 1
        self._verify.append(item)
        self._verify_pending.add(item)
        self.stats["verify_queued"] += 1
        self._queued_at = now

    # -- outgoing ------------------------------------------------------------------

    def start_call(
        self,
        address: tuple[str, int],
        rpc: str,
        args: tuple[object, ...],
        now: float,
        *,
        node_id: bytes | None = None,
    ) -> int:
        """Send request ``rpc`` to ``address``; the call id its outcome event carries.

        ``args`` follow our own node id (prepended here, except for stun).
        ``node_id``: the node expected to answer; it is counted alive on an answer
        and failing on no or a bad one (ping: the answer names who answered).
        identify takes no args, or (our mode,) to re-announce (the core makes
        the challenge), and needs
        ``node_id``: the id the answer must prove. store and add_provider end with
        the token the node gave us (:meth:`token_from`).
        Raises DhtClosed after close(), UsageError for an unknown RPC or a request
        too large for a datagram; an unroutable address ends as CallFailed.
        """
        if self.closed:
            raise DhtClosed("the DHT is closed")
        if rpc not in RPC_NAMES:
            raise UsageError(f"unknown DHT RPC {rpc!r}")
        if rpc == "identify" and node_id is None:
            raise UsageError("identify needs the node id it must prove")
        call_id = self._next_call_id
        self._next_call_id += 1
        host, port = normalize_host(address[0]), address[1]
        target = self._target(host, port) if host is not None and is_port(port) else None
        if target is None or host is None:
            if node_id is not None:
                self._record_failure(Node(node_id, host or str(address[0]), port))
            self._events.append(CallFailed(call_id, UNROUTABLE))
            return call_id
        self._start(call_id, (host, port), target, rpc, args, now, node_id, _API)
        return call_id

    def _start(
        self,
        call_id: int,
        address: Address,
        target: Address,
        rpc: str,
        args: tuple[object, ...],
        now: float,
        node_id: bytes | None,
        origin: int,
        item: tuple[bytes, str, int] | None = None,
    ) -> None:
        msg_id = self.rng.randbytes(codec.MSG_ID_LEN)
        while msg_id in self._calls:  # (only ever with a rigged rng)
            msg_id = self.rng.randbytes(codec.MSG_ID_LEN)
        challenge = b""
        if rpc == "identify":  # args: () or (our mode,), after the challenge we make
            challenge = self.rng.randbytes(CHALLENGE_LEN)
            args = (challenge, *args[:1])
        full_args = args if rpc == "stun" else (self.node_id, *args)
        data = codec.encode_request(msg_id, rpc, full_args)
        if len(data) > self.config.max_datagram:
            raise UsageError(f"{rpc} request of {len(data)} bytes is too large")
        deadline = now + self.config.rpc_timeout
        self._calls[msg_id] = _Call(
            call_id, msg_id, address, rpc, node_id, now, deadline, origin, item, challenge
        )
        if rpc == "get_providers" and args and isinstance(args[0], bytes):
            self._calls[msg_id].challenge = args[0]  # the key its records must be for
        self._call_ids[call_id] = msg_id
        heapq.heappush(self._timeouts, (deadline, msg_id))
        self.stats[f"rpc_sent.{rpc}"] += 1
        self._send(data, target)

    def _start_internal(
        self,
        host: str,
        port: int,
        rpc: str,
        args: tuple[object, ...],
        now: float,
        node_id: bytes | None,
        origin: int,
        item: tuple[bytes, str, int] | None = None,
    ) -> bool:
        target = self._target(host, port)
        if target is None or self.closed:
            return False
        call_id = self._next_call_id
        self._next_call_id += 1
        self._start(call_id, (host, port), target, rpc, args, now, node_id, origin, item)
        return True

    def cancel_call(self, call_id: int) -> None:
        """Forget a call: a late answer is then unsolicited, no timeout is counted."""
        msg_id = self._call_ids.pop(call_id, None)
        if msg_id is not None:
            self._calls.pop(msg_id, None)

    def _forget(self, call: _Call) -> None:
        del self._calls[call.msg_id]
        self._call_ids.pop(call.call_id, None)

    def _answered(self, call: _Call, payload: object, now: float) -> None:
        self._forget(call)
        self.stats["responses_received"] += 1
        # Smoothed round-trip time of answered calls, as TCP keeps it (RFC 6298).
        rtt = now - call.sent_at
        self.srtt = rtt if self.srtt is None else 0.875 * self.srtt + 0.125 * rtt
        try:
            result = self._parse(call, payload, now)
        except MessageError as exc:
            self._drop(exc.reason)
            self._failed(call, MALFORMED, now)
            return
        host, port = call.address
        if call.name == "identify":
            assert isinstance(result, IdentifyAnswer) and call.node_id is not None
            if not proof.check_proof(
                call.node_id,
                self.node_id,
                call.challenge,
                result.public_key,
                result.signature,
                result.mode,
            ):
                self._drop("bad_proof")
                self._failed(call, MALFORMED, now)
                return
            self._events.append(AddressObserved(call.node_id, host, result.observed_host))
            self._proved(Node(call.node_id, host, port), result, now)
        elif call.name == "ping":
            assert isinstance(result, bytes)
            if call.node_id is not None and result != call.node_id:
                self._record_failure(Node(call.node_id, host, port))
            # A requester enters the table once identify says what it is.
            self.node_answered(Node(result, host, port), now, rtt)
        elif call.node_id is not None:
            self.node_answered(Node(call.node_id, host, port), now, rtt)
        if call.origin == _API:
            self._events.append(CallAnswered(call.call_id, result))
        else:
            self._internal_done(call, now)

    def _failed(self, call: _Call, reason: str, now: float) -> None:
        if call.node_id is not None and not (reason == TIMEOUT and call.name in EXTRA_RPCS):
            host, port = call.address
            self._record_failure(Node(call.node_id, host, port))
        if call.origin == _API:
            self._events.append(CallFailed(call.call_id, reason))
        else:
            self._internal_done(call, now)

    def _internal_done(self, call: _Call, now: float) -> None:
        if call.origin == _PROVE and call.node_id is not None:
            self._proving.discard(call.node_id)
            if call.node_id not in self._proven:
                self._remember(self._unprovable, call.node_id, now)
                self.stats["proofs_failed"] += 1
        elif call.origin == _VERIFY:
            self._verifying -= 1
            if call.item is not None:
                self._verify_pending.discard(call.item)
            self._queued_at = now
        elif call.origin == _HEAD and call.node_id is not None:
            self._pinging_heads.discard(call.node_id)

    def _parse(self, call: _Call, payload: object, now: float) -> object:
        name = call.name
        if name == "identify":
            return parse_identify_response(payload)
        if name == "find_node":
            return self._nodes(parse_node_list(payload, self._schema))
        if name == "ping":
            return parse_ping_response(payload)
        if name == "find_value":
            answer = parse_find_value_response(payload, self._schema)
            return answer if isinstance(answer, FoundValue) else self._nodes(answer)
        if name == "get_providers":
            both = parse_get_providers_response(payload, self._schema)
            records = self._records(call.challenge, both.records, now)
            return records, self._nodes(both.nodes), both.token
        if name == "stun":
            return parse_stun_response(payload)
        return parse_bool_response(payload)  # store, add_provider

    def _records(self, key: bytes, wires: list[list[object]], now: float) -> list[ProviderRecord]:
        """The provider records of an answer that verify, one per peer (bad ones
        are dropped and counted: a holder may relay anything)."""
        records: dict[bytes, ProviderRecord] = {}
        for wire in wires:
            try:
                record = parse_provider_record(key, wire)
                verify_provider_record(record, now, self.config.provider_ttl)
            except RecordError as exc:
                self.stats[f"provider_records_dropped.{exc.reason}"] += 1
                continue
            known = records.get(record.peer_id)
            if known is None or record.seq > known.seq:
                records[record.peer_id] = record
        return list(records.values())

    def _nodes(self, listed: NodeList) -> list[Node]:
        if listed.skipped:
            self.stats["bad_contacts_skipped"] += listed.skipped
        me = self.node_id
        return [Node(a.node_id, a.host, a.port) for a in listed.nodes if a.node_id != me]

    # -- routing table -------------------------------------------------------------

    def node_answered(self, node: Node, now: float, rtt: float | None = None) -> None:
        """``node`` answered one of our requests at its address (after ``rtt``
        seconds, when known): it is alive."""
        if node.id == self.node_id:
            return
        self._failures.pop(node.id, None)
        self._last_seen[node.id] = now
        if rtt is not None:
            prev = self._rtt.get(node.id)
            self._rtt[node.id] = rtt if prev is None else 0.75 * prev + 0.25 * rtt
        if len(self._last_seen) > 16 * self.config.ksize * 160:
            self._prune_last_seen()
        if self._is_client(node.id, now):
            return
        proven = self._proven.get(node.id) == (node.ip, node.port)
        if not proven:
            self._start_proof(node, now)
        self._add(node, now, proven)

    def _tell_client(self, node_id: bytes, host: str, port: int, now: float) -> None:
        """A node asked a client to serve: it holds us in its table. Re-announce
        to it (an identify saying "client"; it proves us and drops us), at most
        every REPROVE_INTERVAL per node."""
        at = self._hinted.get(node_id)
        if at is not None and now - at < REPROVE_INTERVAL:
            return
        self._remember(self._hinted, node_id, now)
        if self._start_internal(host, port, "identify", ("client",), now, node_id, _HINT):
            self.stats["client_hints_sent"] += 1

    def _is_client(self, node_id: bytes, now: float) -> bool:
        """``node_id`` proved lately that it is a DHT client (kept out of the table)."""
        at = self._clients.get(node_id)
        if at is None:
            return False
        if now - at < CLIENT_RECHECK:
            return True
        del self._clients[node_id]
        return False

    def _mode_hint(self, node_id: bytes, host: str, port: int, mode: str, now: float) -> None:
        """An identify request saying the asker's mode (its re-announcement after a
        switch): a contact that now says client, or a known client that now says
        server, is proven again (the signed answer decides), at most every
        REPROVE_INTERVAL per node: a forged hint costs us one identify, no more."""
        if mode == "client":
            # In our table, or proven there before (a table full of its /24 may
            # take it later on that stale proof, which said "server").
            known = self.table.node_for(node_id)
            in_table = known is not None and (known.ip, known.port) == (host, port)
            if not in_table and self._proven.get(node_id) != (host, port):
                return
        elif node_id in self._clients:
            del self._clients[node_id]
        else:
            return
        at = self._reproved_at.get(node_id)
        if at is not None and now - at < REPROVE_INTERVAL:
            return
        self._remember(self._reproved_at, node_id, now)
        self.stats["reproofs_requested"] += 1
        self._start_proof(Node(node_id, host, port), now)

    def _add(self, node: Node, now: float, proven: bool) -> None:
        table = self.table
        new = table.is_new_node(node)
        # A node is welcomed with values once it proves its id (usually after it
        # entered the table unproven), judged against the table before it is added.
        if proven and not table.is_proven(node.id) and table.refusal(node, True) is None:
            self._welcome_if_new(node, now)
        head = table.add_contact(node, now, proven=proven)
        if head is not None:
            self._ping_head(head, now)
        elif new and table.contains(node):
            self._events.append(ContactAdded(node))

    def _start_proof(self, node: Node, now: float) -> bool:
        """Ask ``node`` to prove its id (bounded; not again soon after a failure).
        True if a proof is under way (started now or before)."""
        node_id = node.id
        if node_id in self._proving:
            return True
        failed_at = self._unprovable.get(node_id)
        if failed_at is not None and now - failed_at < UNPROVABLE_RETRY:
            return False
        if len(self._proving) >= MAX_PROOFS:
            self.stats["proofs_dropped"] += 1
            return False
        if self._start_internal(node.ip, node.port, "identify", (), now, node_id, _PROVE):
            self._proving.add(node_id)
            self.stats["proofs_started"] += 1
            return True
        return False

    def _proved(self, node: Node, answer: IdentifyAnswer, now: float) -> None:
        """``node`` proved its id at its address: a server may now hold a full
        place in the table and receive values; a client is kept out (and removed).
        Its token is kept for our stores to it."""
        self.stats["proofs_ok"] += 1
        self._unprovable.pop(node.id, None)
        self._remember(self._proven, node.id, (node.ip, node.port))
        self._remember(self._tokens_from, node.id, (answer.token, now))
        self._failures.pop(node.id, None)
        self._last_seen[node.id] = now
        if not answer.server:
            self._remember(self._clients, node.id, now)
            self.stats["clients_refused"] += 1
            known = self.table.node_for(node.id)
            if known is not None:
                self.stats["clients_removed"] += 1
                promoted = self.table.remove_contact(known)
                self._events.append(ContactRemoved(known))
                if promoted is not None:
                    self._events.append(ContactAdded(promoted))
            return
        self._clients.pop(node.id, None)
        self._add(node, now, proven=True)

    def set_client_mode(self, client: bool) -> None:
        """Serve the DHT (False) or only use it (True: while not reachable)."""
        self.client_mode = client

    def _remember(self, table: OrderedDict[bytes, _V], key: bytes, value: _V) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > 16 * self.config.ksize * 160:
            table.popitem(last=False)

    def recently_proven(self, count: int) -> list[Node]:
        """The last ``count`` nodes that proved their id to us, newest first."""
        out: list[Node] = []
        for node_id in reversed(self._proven):
            if len(out) >= count:
                break
            host, port = self._proven[node_id]
            out.append(Node(node_id, host, port))
        return out

    def is_proven(self, node: Node) -> bool:
        """``node`` proved its id at this address."""
        return self._proven.get(node.id) == (node.ip, node.port)

    def token_from(self, node: Node, now: float) -> bytes | None:
        """The token ``node`` gave us, if it proved its id at this address and the
        token is young enough to still be accepted (tokens rotate)."""
        if not self.is_proven(node):
            return None
        entry = self._tokens_from.get(node.id)
        if entry is None or now - entry[1] > self.config.token_rotation:
            return None
        return entry[0]

    def _welcome_if_new(self, node: Node, now: float) -> None:
        """Queue the values ``node`` should store (section 2.5 of the paper), bounded:
        once per node id (of the last WELCOMED_MEMORY), at most welcome_scan_max
        values looked at, a full queue drops the rest."""
        if self.closed or node.id in self._welcomed:
            return
        self._welcomed[node.id] = None
        while len(self._welcomed) > WELCOMED_MEMORY:
            self._welcomed.popitem(last=False)
        newest = self.storage.newest(self.config.welcome_scan_max)
        if not newest:
            return
        limit = max(1, self.config.welcome_queue_max)
        mine = self.node.long_id
        for key, _ in newest:
            goal = int.from_bytes(key, "big")
            neighbors = self.table.closest_to(key, self.config.ksize, now, exclude=node.id)
            if neighbors:
                new_node_close = node.long_id ^ goal < neighbors[-1].long_id ^ goal
                this_closest = mine ^ goal < neighbors[0].long_id ^ goal
                if not (new_node_close and this_closest):
                    continue
            if len(self._welcome) >= limit:
                self.stats["welcome_dropped"] += 1
                return
            self._welcome.append((node, key))
            self.stats["welcome_queued"] += 1

    def _drain_welcome(self, now: float) -> None:
        rate = self.config.welcome_store_rate
        interval = 1.0 / rate if rate > 0 else 0.0
        while self._welcome and now >= self._welcome_next:
            node, key = self._welcome.popleft()
            value = self.storage.get(key)
            if value is None:
                continue
            token = self.token_from(node, now)
            if token is None:
                continue
            self.stats["welcome_sent"] += 1
            self._start_internal(
                node.ip, node.port, "store", (key, value, token), now, node.id, _WELCOME
            )
            self._welcome_next = now + interval

    def _drain_verify(self, now: float) -> None:
        slots = max(1, self.config.verify_concurrency)
        while self._verify and self._verifying < slots:
            item = self._verify.popleft()
            _, host, port = item
            subnet = subnet_of(host)
            self._verify_subnets[subnet] -= 1
            if self._verify_subnets[subnet] <= 0:
                del self._verify_subnets[subnet]
            if self._start_internal(host, port, "ping", (), now, None, _VERIFY, item):
                self._verifying += 1
            else:
                self._verify_pending.discard(item)

    def _ping_head(self, head: Node, now: float) -> None:
        """A full bucket met a new node: ping its least recently seen contact; it is
        evicted after max_failures failed pings (ours or other RPCs), then replaced."""
        if head.id in self._pinging_heads or len(self._pinging_heads) >= MAX_HEAD_PINGS:
            return
        if self._start_internal(head.ip, head.port, "ping", (), now, head.id, _HEAD):
            self._pinging_heads.add(head.id)

    def _record_failure(self, node: Node) -> None:
        """A failed RPC to ``node``: evict it after max_failures in a row."""
        known = self.table.node_for(node.id)
        if known is None or known.ip != node.ip or known.port != node.port:
            return
        failures = self._failures.get(node.id, 0) + 1
        self.stats["failures"] += 1
        if failures < self.config.max_failures:
            self._failures[node.id] = failures
            return
        self._failures.pop(node.id, None)
        self._last_seen.pop(node.id, None)
        self._rtt.pop(node.id, None)
        promoted = self.table.remove_contact(known)
        self.stats["evictions"] += 1
        self._events.append(ContactRemoved(known))
        if promoted is not None:
            self._events.append(ContactAdded(promoted))

    def _prune_last_seen(self) -> None:
        keep = {n.id for n in self.table.all_nodes()} | self.table.replacement_ids()
        self._last_seen = {k: v for k, v in self._last_seen.items() if k in keep}
        self._rtt = {k: v for k, v in self._rtt.items() if k in keep}

    def last_seen(self, node_id: bytes) -> float | None:
        """When ``node_id`` last answered us or asked us (clock time), or None."""
        return self._last_seen.get(node_id)

    def rtt(self, node_id: bytes) -> float | None:
        """The smoothed round-trip time of ``node_id``'s answers (seconds), or None."""
        return self._rtt.get(node_id)

    def failures(self, node_id: bytes) -> int:
        return self._failures.get(node_id, 0)

    def refresh_ids(self, now: float) -> list[bytes]:
        """A random id in every bucket not looked up for refresh_interval."""
        ids = []
        for bucket in self.table.lonely_buckets(now - self.config.refresh_interval):
            low, high = bucket.range
            ids.append(self.rng.randint(low, min(high, MAX_ID)).to_bytes(20, "big"))
        return ids

    # -- lifecycle and introspection -----------------------------------------------

    def close(self) -> None:
        """Fail every call of the API in flight (CallFailed "closed"); forget the rest."""
        self.closed = True
        for call in list(self._calls.values()):
            if call.origin == _API:
                self._events.append(CallFailed(call.call_id, CLOSED))
        self._calls.clear()
        self._call_ids.clear()
        self._timeouts.clear()
        self._welcome.clear()
        self._verify.clear()
        self._verify_pending.clear()
        self._verify_subnets.clear()
        self._proving.clear()
        self._pinging_heads.clear()
        self._verifying = 0
        self._out.clear()

    def snapshot(self) -> dict[str, int]:
        out = dict(self.stats)
        out["contacts"] = len(self.table)
        out["stored_values"] = len(self.storage)
        out["provider_records"] = len(self.providers)
        out["provider_keys"] = self.providers.key_count
        out["stored_value_bytes"] = self.storage.bytes_used
        out["provider_record_bytes"] = self.providers.bytes_used
        for name, count in self.storage.stats.items():
            out[f"value_store.{name}"] = count
        for name, count in self.providers.stats.items():
            out[f"provider_store.{name}"] = count
        for reason, count in self.table.refused.items():
            out[f"table_refused.{reason}"] = count
        out["unproven_contacts"] = sum(
            1 for n in self.table.all_nodes() if not self.table.is_proven(n.id)
        )
        out["outstanding_rpcs"] = len(self._calls)
        out["welcome_queue"] = len(self._welcome)
        out["verify_queue"] = len(self._verify)
        out["verify_in_flight"] = self._verifying
        out["head_pings"] = len(self._pinging_heads)
        out["rate_limited_sources"] = len(self._limiter)
        out["client_mode"] = int(self.client_mode)
        return out


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
