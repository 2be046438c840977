"""Discovery: the typed facade the rest of p2pnode uses for the Kademlia DHT.

It drives a pure :class:`~p2pnode.dht.core.DhtCore` through the asyncio shell
:class:`~p2pnode.dht.protocol.DhtProtocol`, and runs the iterative lookups
(:mod:`.lookup`) and the maintenance loops. Nothing outside ``p2pnode.dht`` sees
kademlia's ``Node`` objects or raw answers: only :class:`Contact`,
:class:`ProviderRecord` and plain values.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import itertools
import logging
import os
import random
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from kademlia.node import Node
from kademlia.utils import digest

from p2pnode.clock import MONOTONIC, Clock
from p2pnode.dht import records as rec
from p2pnode.dht.codec import MessageError
from p2pnode.dht.config import DhtConfig
from p2pnode.dht.core import DhtCore, Event
from p2pnode.dht.lookup import iterative_lookup
from p2pnode.dht.protocol import DhtProtocol
from p2pnode.dht.rpc_schema import (
    FoundValue,
    Value,
    check_value,
    is_node_id,
    is_port,
    normalize_host,
)
from p2pnode.dht.table import diversity_group
from p2pnode.endpoints import LOOP_ENDPOINTS, Endpoints
from p2pnode.errors import P2PError, UsageError
from p2pnode.identity import Identity, as_node_id
from p2pnode.tasks import TaskSet

log = logging.getLogger(__name__)

MIN_INTERVAL = 0.05  # maintenance loops never spin
MIN_STALL = 0.25  # seconds: a lookup query is never deemed stalled sooner
STALL_RTTS = 4.0  # ... nor before this many smoothed round trips
LOOKUP_SEEDS_K = 3  # a lookup starts from this many times k routing-table contacts
# After joining, each range of distances farther than our closest neighbour is
# looked up until it holds this many contacts (see Discovery._refresh_far_ranges).
JOIN_RANGE_CONTACTS = 1
REANNOUNCE_RECENT = 64  # nodes told of a mode switch besides our routing table
PROOF_CACHE = 4096  # identify answers kept for our writes (token, observed address)
# Writes pick their k targets among the closest WRITE_CANDIDATES x k that answered.
WRITE_CANDIDATES = 2
# Holders verify an unknown relay of ours in the background: announce once more
# after this long, so the relay addresses stick (issue 12).
RELAY_RECHECK_DELAY = 1.0


@dataclass(frozen=True)
class Contact:
    node_id: bytes  # 20 bytes
    host: str
    port: int  # DHT UDP port == the peer's TCP port by convention
    # When we last heard from it, on the Discovery's clock (Discovery.clock.now()'s
    # scale, monotonic by default; not wall time), None if never.
    last_seen: float | None
    rtt: float | None = None  # smoothed round trip of its answers, seconds


@dataclass
class LookupTrace:
    """How one lookup went: find_node queries sent, and hops: through how many
    successive answers the target was first learned (0: already in the table;
    None: not found, or never named in an answer)."""

    queries: int = 0
    hops: int | None = None


@dataclass(frozen=True)
class ProviderRecord:
    node_id: bytes  # provider's 20-byte node id (peer id)
    host: str  # the IP its announcement came from (never a claimed IP)
    port: int  # TCP port to dial
    # (relay host, relay port, relay peer id): relays it is reachable through,
    # each proven by the holder that kept the record
    relays: tuple[tuple[str, int, bytes], ...] = ()


@dataclass(frozen=True)
class PutOutcome:
    """Where a put landed. ``here``: stored in this node's own store (True), refused
    by it (False), or not tried (None: this node is not among the k closest);
    ``remote`` of the ``asked`` closest nodes accepted it; ``unproven`` of the
    closest could not prove their id and were not asked. ``address``: a signed
    record's address (what ``get_record`` takes), None for a plain value."""

    here: bool | None
    remote: int
    asked: int
    unproven: int = 0
    address: str | None = None

    @property
    def stored(self) -> bool:
        return bool(self.here) or self.remote > 0

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "stored": self.stored,
            "here": self.here,
            "remote": self.remote,
            "asked": self.asked,
            "unproven": self.unproven,
        }
        if self.address is not None:
            out["address"] = self.address
        return out


def _local_host(listen_host: str) -> str:
    """The address we record for our own provider records."""
    try:
        ip = ipaddress.ip_address(listen_host)
    except ValueError:
        return "127.0.0.1"
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return normalize_host(listen_host) or "127.0.0.1"


def _provider(record: rec.ProviderRecord) -> ProviderRecord:
    host, port = record.addrs[0]
    return ProviderRecord(record.peer_id, host, port, record.relays)


def merge_provider_answers(
    own: Sequence[rec.ProviderRecord],
    holders: Sequence[Sequence[rec.ProviderRecord]],
    want: int,
) -> list[ProviderRecord]:
    """At most ``want`` providers from our own records and the holders' answers
    (closest holder first): pure.

    - Which peers: ours first, then one record per holder in turn, so no holder
      fills the list alone.
    - Each peer's addresses: from its copy with the highest sequence number among
      all answers (the peer signed it last; an older copy a holder replays, say
      to send us to an address the peer left, loses).
    - Its relays: from every copy, ours too (each holder proved the relays it
      kept; a relay's own copy, maybe the newest, leaves itself out), at most
      ``MAX_RELAY_ADDRS``.
    """
    newest: dict[bytes, rec.ProviderRecord] = {}
    for record in itertools.chain(own, *holders):
        kept = newest.get(record.peer_id)
        if kept is None or record.seq > kept.seq:
            newest[record.peer_id] = record
    chosen: dict[bytes, None] = {}
    for record in own:
        chosen.setdefault(record.peer_id)
    queues = [list(records) for records in holders]
    while len(chosen) < want and any(queues):
        for queue in queues:
            if queue:
                chosen.setdefault(queue.pop(0).peer_id)
    found = {peer: _provider(newest[peer]) for peer in chosen}
    for record in itertools.chain(own, *holders):
        kept_provider = found.get(record.peer_id)
        if kept_provider is not None and record.relays:
            merged = tuple(dict.fromkeys(kept_provider.relays + record.relays))
            found[record.peer_id] = dataclasses.replace(
                kept_provider, relays=merged[: rec.MAX_RELAY_ADDRS]
            )
    return list(found.values())[: max(0, want)]


def _check_key(key: bytes) -> bytes:
    if not is_node_id(key):
        raise UsageError("DHT keys are 20 bytes")
    return key


class Discovery:
    """One node's view of the Kademlia DHT (wire compatible with kademlia 2.2.3).

    Lifecycle: ``Discovery(...)`` → ``await listen(host, port)`` → calls →
    ``await close()``. Lookups: :meth:`bootstrap`, :meth:`closest`,
    :meth:`find_peer` (:meth:`find_peer_traced`); values: :meth:`put`, :meth:`get`;
    provider records: :meth:`add_provider`, :meth:`remove_provider`,
    :meth:`find_providers`. Calls fail only on local misuse (``UsageError``); what
    the network does not answer is ``None`` / empty.

    Injected: ``clock`` (expiry, rate limits, call timeouts, last_seen),
    ``endpoints`` (real sockets, or a simulated network) and ``rng`` (message ids,
    refresh ids: a seeded ``random.Random`` makes a simulated run repeatable;
    default seeded from os.urandom). Every background job (bucket refresh,
    republishing our values and provider records, checking their holders) is an
    owned task that close() cancels and awaits.
    """

    def __init__(
        self,
        identity: Identity,
        config: DhtConfig,
        clock: Clock = MONOTONIC,
        endpoints: Endpoints = LOOP_ENDPOINTS,
        rng: random.Random | None = None,
    ) -> None:
        if not isinstance(identity, Identity):
            raise UsageError("Discovery takes the node's Identity (its id is proven with it)")
        node_id = identity.node_id
        self.identity = identity
        self.node_id = node_id
        self.config = config
        self.clock = clock
        self.endpoints = endpoints
        self._tasks = TaskSet("dht")
        self.rng = rng if rng is not None else random.Random(os.urandom(16))
        self._node = Node(node_id)
        self._core = DhtCore(identity, config, clock=clock, rng=self.rng)
        self._storage = self._core.storage  # the core builds it from the config
        self._protocol: DhtProtocol | None = None
        self._port: int | None = None
        self._local_host = "127.0.0.1"
        self._own_values: dict[bytes, Value] = {}  # plain values and immutable records
        self._own_names: dict[str, Value] = {}  # our mutable records, re-signed each time
        self._seq = 0  # the last sequence number we signed
        # Identify answers of the nodes we write to: (token, our address as they see
        # it, their address, when); a token is good for one to two rotations.
        self._proofs: OrderedDict[bytes, tuple[bytes, str, tuple[str, int], float]] = OrderedDict()
        self._announced: dict[bytes, int] = {}
        # relays we hold a reservation on: announced in our provider records
        self._relays: tuple[tuple[str, int, bytes], ...] = ()
        # Who accepted each of our announcements: watched so that records lost with
        # their holders are announced again long before provider_republish.
        self._holders: dict[bytes, list[Node]] = {}
        self._listeners: list[Callable[[Event], None]] = []
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------

    async def listen(self, host: str, port: int) -> int:
        """Bind the UDP socket (port 0: any free port); the bound port. OSError if
        the address cannot be bound."""
        if self._closed:
            raise UsageError("this Discovery is closed")
        if self._protocol is not None:
            raise UsageError("already listening")
        protocol = DhtProtocol(self._core, self.clock)
        protocol.listeners = self._listeners
        _, self._port = await self.endpoints.datagram_endpoint(lambda: protocol, host, port)
        self._protocol = protocol
        self._local_host = _local_host(host)
        self._tasks.spawn(self._every(self.config.refresh_interval, self._refresh), "refresh")
        self._tasks.spawn(
            self._every(self.config.value_republish, self._republish_values), "republish"
        )
        self._tasks.spawn(
            self._every(self.config.provider_republish, self._republish_providers),
            "provider-republish",
        )
        self._tasks.spawn(
            self._every(self.config.provider_check_interval, self._check_holders),
            "provider-holders",
        )
        log.info("DHT listening on %s port %d", host, self._port)
        return self._port

    @property
    def port(self) -> int:
        if self._port is None:
            raise UsageError("not listening")
        return self._port

    async def close(self) -> None:
        """Stop every background task and close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._tasks.close()
        if self._protocol is not None:
            await self._protocol.close()
        else:
            self._core.close()

    def wrap_transport(
        self, wrap: Callable[[asyncio.DatagramTransport], asyncio.DatagramTransport]
    ) -> None:
        """Put ``wrap(transport)`` between the DHT and its socket (e.g. a loss and
        latency emulator in simulations). Every datagram we send goes through it."""
        protocol = self._proto()
        if protocol.transport is None:
            raise UsageError("call listen() first")
        protocol.transport = wrap(protocol.transport)

    def _proto(self) -> DhtProtocol:
        if self._closed:
            raise UsageError("this Discovery is closed")
        if self._protocol is None:
            raise UsageError("call listen() first")
        return self._protocol

    @property
    def core(self) -> DhtCore:
        """The protocol core (routing table, stores, counters): for simulators and
        tests that look inside; calls go through Discovery."""
        return self._core

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener`` with the core's events other than call outcomes
        (:class:`~p2pnode.dht.core.AddressObserved`, ``DialBackReceived``, ...)."""
        self._listeners.append(listener)

    @property
    def client_mode(self) -> bool:
        return self._core.client_mode

    def set_client_mode(self, client: bool) -> None:
        """Switch between DHT server and client mode (libp2p kad-dht's): a client
        answers no lookups or stores for others, and identify says so. The switch
        is re-announced: each contact is asked to identify with our new mode said,
        which makes it prove us again (the signed answer decides)."""
        if client == self._core.client_mode:
            return
        self._core.set_client_mode(client)
        self._core.stats["mode_switches"] += 1
        log.info("DHT %s mode", "client" if client else "server")
        if self._protocol is None or self._closed:
            return
        mode = "client" if client else "server"
        # Our contacts, and the nodes that proved themselves to us lately (those
        # we talked to: they may hold us even where our table does not hold them).
        targets = {n.id: n for n in self._core.recently_proven(REANNOUNCE_RECENT)}
        targets.update((n.id, n) for n in self._core.table.all_nodes())
        for node in targets.values():
            self._tasks.spawn(self._reannounce(node, mode), "reannounce")

    async def _reannounce(self, node: Node, mode: str) -> None:
        answer = await self._proto().call_identify(node, mode)
        if answer is not None:  # a fresh token for our writes, too
            now = self.clock.now()
            self._proofs[node.id] = (answer.token, answer.observed_host, (node.ip, node.port), now)
            while len(self._proofs) > PROOF_CACHE:
                self._proofs.popitem(last=False)

    # -- contacts ------------------------------------------------------------------

    def _contact(self, node: Node) -> Contact:
        core = self._core
        return Contact(node.id, node.ip, node.port, core.last_seen(node.id), core.rtt(node.id))

    def contacts(self) -> list[Contact]:
        """The routing table's contents."""
        if self._protocol is None:
            return []
        return [self._contact(node) for node in self._core.table.all_nodes()]

    def stats(self) -> dict[str, int]:
        out = self._core.snapshot() if self._protocol is not None else {}
        out["own_values"] = len(self._own_values)
        out["announced_keys"] = len(self._announced)
        out["background_tasks"] = len(self._tasks)
        return out

    async def ping(self, host: str, port: int) -> bytes | None:
        """The node id answering at host:port (an IP literal), or None."""
        protocol = self._proto()
        clean = normalize_host(host)
        if clean is None or not is_port(port):
            return None
        return await protocol.ping_address(clean, port)

    async def bootstrap(self, addrs: Sequence[tuple[str, int]]) -> list[Contact]:
        """Ping ``addrs`` (IP literals), then look up our own id through those that
        answered. Returns the contacts that answered the ping ([] if none did)."""
        protocol = self._proto()
        targets: list[tuple[str, int]] = []
        for host, port in addrs:
            clean = normalize_host(host)
            if clean is None or not is_port(port):
                log.warning("not bootstrapping from %r:%r: not an IP address and port", host, port)
                continue
            if (clean, port) not in targets:
                targets.append((clean, port))
        ids = await asyncio.gather(*(protocol.ping_address(h, p) for h, p in targets))
        answered = [
            Node(node_id, host, port)
            for (host, port), node_id in zip(targets, ids, strict=True)
            if node_id is not None and node_id != self.node_id
        ]
        if answered:
            await self._lookup_nodes(self.node_id, seeds=answered, explore=True)
            await self._refresh_far_ranges()
        return [self._contact(node) for node in answered]

    async def _refresh_far_ranges(self) -> None:
        """After the lookup of our own id, look up a random id at each distance
        farther than our closest neighbour (section 2.3 of the paper: a joining node
        "refreshes all k-buckets further away than its closest neighbor").

        The own-id lookup only meets nodes on the way to our own neighbourhood, so
        without this the ranges far from our id hold a handful of contacts or none
        (the refresh loop runs only every refresh_interval), and lookups from here,
        or through here, toward those ranges can end among nodes that know nothing
        closer. A range already holding JOIN_RANGE_CONTACTS contacts is skipped, and
        each lookup stops once its range holds that many (every node that answers
        enters the table): the stock full lookups would cost about ten lookups per
        join. They run concurrently, so joining takes about one lookup longer.
        Bucket refresh fills the ranges further later."""
        mine = self._node.long_id
        counts: dict[int, int] = {}
        for node in self._core.table.all_nodes():
            bit = (node.long_id ^ mine).bit_length()  # 160: differs in the top bit
            counts[bit] = counts.get(bit, 0) + 1
        if not counts:
            return
        closest = min(counts)
        targets = []
        enough = min(JOIN_RANGE_CONTACTS, self.config.ksize)
        for bit in range(160, closest, -1):
            if counts.get(bit, 0) >= enough:
                continue
            # Same prefix as ours above this bit, that bit flipped, the rest random.
            low = self.rng.getrandbits(bit - 1) if bit > 1 else 0
            goal = ((mine >> bit) << bit) | ((~mine >> (bit - 1) & 1) << (bit - 1)) | low
            targets.append((bit, goal.to_bytes(20, "big")))
        self._core.stats["join_refresh_lookups"] += len(targets)
        table = self._core.table

        def filled(bit: int) -> Callable[[], bool]:
            def done() -> bool:
                nodes = table.all_nodes()
                return sum(1 for n in nodes if (n.long_id ^ mine).bit_length() == bit) >= enough

            return done

        await asyncio.gather(
            *(self._lookup_nodes(t, done=filled(bit), explore=True) for bit, t in targets)
        )

    # -- lookups -------------------------------------------------------------------

    def _stall(self, protocol: DhtProtocol) -> float:
        """When a lookup query counts as stalled: a few smoothed RTTs, within
        [MIN_STALL, lookup_stall] (the ceiling until an RTT is known)."""
        if protocol.srtt is None:
            return self.config.lookup_stall
        return min(self.config.lookup_stall, max(MIN_STALL, STALL_RTTS * protocol.srtt))

    async def _lookup(
        self,
        target: bytes,
        query: Callable[[Node], Awaitable[list[Node] | None]],
        *,
        seeds: Sequence[Node] = (),
        done: Callable[[], bool] | None = None,
        k: int | None = None,
        explore: bool = False,
    ) -> list[Node]:
        protocol = self._proto()
        # More than k starting points: when the k closest we know are all dead, the
        # lookup goes on from the next ones instead of ending empty.
        start = list(seeds) + self._core.table.closest_to(
            target, LOOKUP_SEEDS_K * self.config.ksize, self.clock.now()
        )
        k_wanted = self.config.ksize if k is None else k
        paths = self.config.lookup_paths
        return await iterative_lookup(
            target,
            start,
            query,
            self_id=self.node_id,
            k=k_wanted,
            alpha=self.config.alpha,
            timeout=self.config.lookup_timeout,
            max_queries=self.config.max_lookup_queries,
            paths=paths,
            # Each path converges on its share of the k closest: the union finds the
            # same k closest at about one lookup's RPCs (bench_lookup_paths). Lookups
            # that fill the routing table explore with whole paths instead.
            path_k=None if explore else -(-k_wanted // paths),
            group_of=self._group_of,
            group_cap=self.config.max_contacts_per_subnet_bucket,
            done=done,
            stall=self._stall(protocol),
            clock=self.clock,
        )

    def _group_of(self, ip: str) -> str | None:
        return diversity_group(ip, self.config.diversity_exempt_loopback)

    async def _lookup_nodes(
        self,
        target: bytes,
        seeds: Sequence[Node] = (),
        done: Callable[[], bool] | None = None,
        k: int | None = None,
        explore: bool = False,
    ) -> list[Node]:
        protocol = self._proto()
        wanted = Node(target)

        async def query(node: Node) -> list[Node] | None:
            return await protocol.call_find_node(node, wanted)

        return await self._lookup(target, query, seeds=seeds, done=done, k=k, explore=explore)

    async def _write_targets(self, dkey: bytes) -> tuple[list[tuple[Node, bytes, str]], int]:
        """Where to write ``dkey``: up to k of the closest nodes that answered a
        lookup of WRITE_CANDIDATES x k, that proved their id, at most
        max_contacts_per_subnet_bucket from one /24 or /64, closest first, each with
        (token, our address as it sees us); and how many could not prove their id.
        Sybils crowding a key from one subnet, or claiming ids they cannot prove,
        then leave room for the honest nodes behind them."""
        config = self.config
        candidates = await self._lookup_nodes(dkey, k=WRITE_CANDIDATES * config.ksize)
        cap, exempt = config.max_contacts_per_subnet_bucket, config.diversity_exempt_loopback
        taken: Counter[str] = Counter()
        chosen: list[tuple[Node, bytes, str]] = []
        unproven = 0
        rest = iter(candidates)
        while len(chosen) < config.ksize:
            batch: list[Node] = []
            for node in rest:
                group = diversity_group(node.ip, exempt)
                if group is None or taken[group] < cap:
                    batch.append(node)
                if len(chosen) + len(batch) >= config.ksize:
                    break
            if not batch:
                break
            proofs = await asyncio.gather(*(self._proof(node) for node in batch))
            for node, proof in zip(batch, proofs, strict=True):
                group = diversity_group(node.ip, exempt)
                if proof is None:
                    unproven += 1
                elif group is None or taken[group] < cap:
                    if group is not None:
                        taken[group] += 1
                    chosen.append((node, *proof))
        return chosen, unproven

    async def closest(self, key: bytes) -> list[Contact]:
        """The k closest nodes to a 20-byte key that answered a lookup."""
        key = _check_key(key)
        return [self._contact(node) for node in await self._lookup_nodes(key)]

    async def find_peer(self, node_id: str | bytes) -> Contact | None:
        """The contact with exactly this id (text peer id or 20 bytes), if it can be
        found and it answers."""
        contact, _ = await self.find_peer_traced(node_id)
        return contact

    async def find_peer_traced(self, peer_id: str | bytes) -> tuple[Contact | None, LookupTrace]:
        """:meth:`find_peer`, plus how the lookup went (queries sent, hops)."""
        node_id = _check_key(as_node_id(peer_id))
        protocol = self._proto()
        trace = LookupTrace()
        known = self._core.table.node_for(node_id)
        if known is not None and self._core.is_proven(known):
            trace.hops = 0
            return self._contact(known), trace
        wanted = Node(node_id)
        answered: list[Node] = []
        depth: dict[bytes, int] = {}

        async def query(node: Node) -> list[Node] | None:
            nodes = await protocol.call_find_node(node, wanted)
            trace.queries += 1
            level = depth.get(node.id, 0)
            for found in nodes or ():
                depth.setdefault(found.id, level + 1)
            # Anyone can list the sought id at its own address: only a node that
            # proves the id there is the peer; an impostor counts as failed, so the
            # real node, listed at its own address, is still asked.
            if nodes is not None and node.id == node_id:
                if await self._proof(node) is None:
                    return None
                answered.append(node)
            return nodes

        # Stop as soon as the target itself answered: waiting for the rest of the
        # k closest would only add the timeouts of dead contacts. Whole paths: Sybils
        # ground next to the id fill a path's share of the k closest before any
        # honest neighbour of the target is asked.
        await self._lookup(node_id, query, done=lambda: bool(answered), explore=True)
        if not answered:
            return None, trace
        trace.hops = depth.get(node_id)
        return self._contact(answered[0]), trace

    # -- values --------------------------------------------------------------------

    @staticmethod
    def _digest(key: str | bytes) -> bytes:
        if not isinstance(key, str | bytes):
            raise UsageError("DHT keys are str or bytes")
        dkey: bytes = digest(key)  # kademlia's: sha1 of the bytes, or of str's UTF-8
        return dkey

    def _check_value(self, value: object) -> Value:
        try:
            return check_value(value, self.config.max_value_bytes)
        except MessageError as exc:
            raise UsageError(f"cannot store this value: {exc}") from None

    async def put(self, key: str | bytes, value: str | bytes | int | float | bool) -> bool:
        """Store ``value`` under sha1(key) on the k closest nodes (and here if we are
        one of them); republished every value_republish. True if stored anywhere.
        A plain kademlia value: unauthenticated, any node can overwrite it (except
        here); see :meth:`put_mutable` and :meth:`put_immutable`."""
        return (await self.put_outcome(key, value)).stored

    async def put_outcome(
        self, key: str | bytes, value: str | bytes | int | float | bool
    ) -> PutOutcome:
        """:meth:`put`, saying where the value was stored."""
        checked = self._check_value(value)
        dkey = self._digest(key)
        self._proto()
        self._keep_own(dkey, checked)
        return await self._publish(dkey, checked)

    async def put_mutable(self, name: str, value: Value) -> PutOutcome:
        """Publish ``value`` as our signed record ``name`` (BEP 44 / IPNS style): it
        lives at ``<our peer id>/<name>``, only we can sign it, and a newer one (a
        higher sequence number) replaces the old everywhere. Republished, re-signed,
        every value_republish."""
        checked = self._check_value(value)
        self._proto()
        record = self._sign_mutable(name, checked)
        if name in self._own_names or len(self._own_names) < self.config.max_stored_values:
            self._own_names[name] = checked
        outcome = await self._publish(rec.mutable_key(self.node_id, name), rec.to_value(record))
        return dataclasses.replace(outcome, address=rec.record_address(record))

    async def put_immutable(self, value: Value) -> PutOutcome:
        """Publish ``value`` under the hash of its record: anyone can check it, no one
        can change it. The outcome's address is what :meth:`get_record` takes."""
        checked = self._check_value(value)
        self._proto()
        record = rec.ImmutableRecord(checked)
        envelope = rec.to_value(record)
        if len(envelope) > self.config.max_value_bytes:
            raise UsageError(
                f"cannot store this value: its record is over {self.config.max_value_bytes} bytes"
            )
        key = rec.immutable_key(record)
        self._keep_own(key, envelope)
        outcome = await self._publish(key, envelope)
        return dataclasses.replace(outcome, address=rec.record_address(record))

    def _keep_own(self, dkey: bytes, value: Value) -> None:
        if dkey in self._own_values or len(self._own_values) < self.config.max_stored_values:
            self._own_values[dkey] = value

    def _next_seq(self) -> int:
        # Milliseconds of the clock, so a restarted node still signs higher numbers.
        self._seq = max(self._seq + 1, int(self.clock.now() * 1000))
        return self._seq

    def _sign_mutable(self, name: str, value: Value) -> rec.MutableRecord:
        expires = int(self.clock.now() + self.config.value_ttl)
        try:
            return rec.sign_mutable(self.identity, name, value, self._next_seq(), expires)
        except rec.RecordError as exc:
            raise UsageError(f"cannot publish {name!r}: {exc}") from None

    async def _proof(self, node: Node) -> tuple[bytes, str] | None:
        """(token, our address as ``node`` sees it) for a write to ``node``, once it
        proved its id; None if it cannot (a stock node, or a liar)."""
        now = self.clock.now()
        cached = self._proofs.get(node.id)
        if (
            cached is not None
            and cached[2] == (node.ip, node.port)
            and now - cached[3] < self.config.token_rotation / 2
        ):
            return cached[0], cached[1]
        answer = await self._proto().call_identify(node)
        if answer is None:
            return None
        self._proofs[node.id] = (answer.token, answer.observed_host, (node.ip, node.port), now)
        self._proofs.move_to_end(node.id)
        while len(self._proofs) > PROOF_CACHE:
            self._proofs.popitem(last=False)
        return answer.token, answer.observed_host

    async def _store_at(self, node: Node, dkey: bytes, value: Value) -> bool | None:
        """Store at a proven node with its token; None if it could not prove its id."""
        proof = await self._proof(node)
        if proof is None:
            return None
        return await self._proto().call_store(node, dkey, value, proof[0])

    async def _publish(self, dkey: bytes, value: Value) -> PutOutcome:
        targets, unproven = await self._write_targets(dkey)
        target = Node(dkey)
        stored_here: bool | None = None
        if len(targets) < self.config.ksize or self._node.distance_to(target) < max(
            n.distance_to(target) for n, _, _ in targets
        ):
            stored_here = self._storage.put(dkey, value)
        protocol = self._proto()
        results = await asyncio.gather(
            *(protocol.call_store(n, dkey, value, token) for n, token, _ in targets)
        )
        remote = sum(1 for result in results if result is True)
        return PutOutcome(stored_here, remote, len(targets), unproven)

    async def get(self, key: str | bytes) -> str | bytes | int | float | bool | None:
        """The plain value stored under sha1(key), here or on the network; None if
        none. Unauthenticated (kademlia's get): the first answer wins. Signed
        records are read with :meth:`get_record`."""
        dkey = self._digest(key)
        self._proto()
        local = self._storage.get(dkey)
        if local is not None:
            return local
        found, without = await self._find_values(dkey, first_only=True)
        if not found:
            return None
        value = found[0]
        self._cache_at_nearest(dkey, value, without)
        return value

    async def _find_values(
        self, dkey: bytes, *, first_only: bool
    ) -> tuple[list[Value], list[Node]]:
        """The values holders of ``dkey`` answered, and the nodes that answered
        without one (for caching). ``first_only``: stop at the first value; else the
        lookup runs to its end."""
        protocol = self._proto()
        wanted = Node(dkey)
        found: list[Value] = []
        without: list[Node] = []

        async def query(node: Node) -> list[Node] | None:
            answer = await protocol.call_find_value(node, wanted)
            if isinstance(answer, FoundValue):
                found.append(answer.value)
                return []
            if answer is not None:
                without.append(node)
            return answer

        await self._lookup(dkey, query, done=(lambda: bool(found)) if first_only else None)
        return found, without

    def _cache_at_nearest(self, dkey: bytes, value: Value, without: list[Node]) -> None:
        # Cache it on the closest node that did not have it (section 2.3).
        if without:
            wanted = Node(dkey)
            nearest = min(without, key=lambda n: n.distance_to(wanted))
            self._tasks.spawn(self._store_at(nearest, dkey, value), "cache-store")

    async def get_record(self, address: str) -> Value | None:
        """The value of the signed record at ``address`` (``<peer id>/<name>`` or
        ``imm:<hex>``), or None if no valid one was found. Every record found is
        verified; the valid one with the highest sequence number wins, so forged,
        unsigned or stale answers are passed over (counted in the DHT stats)."""
        try:
            dkey, _kind = rec.parse_address(address)
        except rec.RecordError as exc:
            raise UsageError(str(exc)) from None
        self._proto()
        local = self._storage.get(dkey)
        # To its end: holders replaying an older record (validly signed) must not
        # be able to end the lookup before the newest one is found.
        found, without = await self._find_values(dkey, first_only=False)
        if local is not None:
            found.insert(0, local)
        record, envelope, rejected = rec.best_record(
            dkey, found, self.clock.now(), self.config.value_ttl, allow_unsigned=False
        )
        stats = self._core.stats
        for reason, count in rejected.items():
            stats[f"records_rejected.{reason}"] += count
        if record is None or envelope is None:
            return None
        self._cache_at_nearest(dkey, envelope, without)
        return record.value

    # -- providers -----------------------------------------------------------------

    def _provider_record(
        self, key: bytes, host: str, port: int, holder: bytes | None = None
    ) -> rec.ProviderRecord:
        expires = int(self.clock.now() + self.config.provider_ttl)
        # A holder cannot prove itself as a relay (it is not in its own table):
        # its copy names the other relays.
        relays = [r for r in self._relays if r[2] != holder]
        return rec.sign_provider_record(
            self.identity, key, [(host, port)], self._next_seq(), expires, relays
        )

    @property
    def relays(self) -> tuple[tuple[str, int, bytes], ...]:
        return self._relays

    def set_relays(self, relays: Iterable[tuple[str, int, bytes]]) -> None:
        """Announce these relay addresses (at most ``MAX_RELAY_ADDRS``) in our
        provider records from now on; every announced key is announced again."""
        relays = tuple(relays)[: rec.MAX_RELAY_ADDRS]
        if relays == self._relays:
            return
        self._relays = relays
        if self._protocol is not None and self._announced and not self._closed:
            self._tasks.spawn(self._relays_changed(bool(relays)), "relay-reannounce")

    async def add_provider(self, key: bytes, port: int) -> int:
        """Announce this node as a provider of ``key`` (TCP ``port``) on the k closest
        nodes and locally, as records signed with our identity; re-announced every
        provider_republish until remove_provider(key). Returns how many remote nodes
        accepted."""
        key = _check_key(key)
        if not is_port(port):
            raise UsageError("port must be in 1..65535")
        protocol = self._proto()
        self._announced[key] = port
        own = self._provider_record(key, self._local_host, port)
        protocol.providers.add_record(own, None, self.clock.now())
        accepted = await self._announce(key, port)
        if self._relays and not self._closed:
            self._tasks.spawn(self._announce_again_later([key]), "relay-recheck")
        return accepted

    async def _relays_changed(self, have_relays: bool) -> None:
        await self._republish_providers()
        if have_relays:
            await self._announce_again_later(list(self._announced))

    async def _announce_again_later(self, keys: list[bytes]) -> None:
        """Announce ``keys`` once more after RELAY_RECHECK_DELAY: holders that did
        not know our relays yet verify them in the background and keep their
        addresses from the next announcement on."""
        await asyncio.sleep(RELAY_RECHECK_DELAY)
        for key in keys:
            port = self._announced.get(key)
            if port is not None:
                await self._announce(key, port)

    async def _announce(self, key: bytes, port: int) -> int:
        protocol = self._proto()
        targets, _ = await self._write_targets(key)
        nodes = [node for node, _, _ in targets]

        async def announce_to(node: Node, token: bytes, seen_as: str) -> bool:
            # Holders keep a record only if it dials the address it came from.
            record = self._provider_record(key, seen_as, port, node.id)
            return await protocol.call_add_provider(node, key, record, token) is True

        results = await asyncio.gather(*(announce_to(*target) for target in targets))
        holders = [n for n, result in zip(nodes, results, strict=True) if result]
        if key in self._announced:
            self._holders[key] = holders
        return len(holders)

    async def _check_holders(self) -> None:
        """Ping the nodes holding our provider records (each once, a bounded number
        per round); announce again every key that lost half its holders or more, or
        that no node accepted last time."""
        protocol = self._proto()
        distinct: dict[bytes, Node] = {}
        for holders in self._holders.values():
            for node in holders:
                distinct.setdefault(node.id, node)
        checked = list(distinct.values())[: self.config.max_holder_pings]
        answers = await asyncio.gather(*(protocol.call_ping(n) for n in checked))
        dead = {n.id for n, answer in zip(checked, answers, strict=True) if answer is None}
        for key, holders in list(self._holders.items()):  # no holder at all: retried too
            lost = sum(1 for n in holders if n.id in dead)
            port = self._announced.get(key)
            if port is not None and (not holders or 2 * lost >= len(holders)):
                self._core.stats["provider_reannounced"] += 1
                await self._announce(key, port)

    def remove_provider(self, key: bytes) -> None:
        """Stop announcing ``key`` (remote records expire after provider_ttl)."""
        self._announced.pop(key, None)
        self._holders.pop(key, None)
        if self._protocol is not None:
            self._protocol.providers.remove(key, self.node_id)

    async def find_providers(self, key: bytes, want: int = 20) -> list[ProviderRecord]:
        """Providers of ``key``: our own records, then those the nodes closest to it
        hold. The lookup runs to its end (an early stop on "enough records" or "no new
        record" is what Sybils flooding fake records, or repeating them, would
        trigger), and the answers are merged one record per holder in turn, closest
        holder first, so no holder fills the list alone. Deduplicated by node id."""
        key = _check_key(key)
        protocol = self._proto()
        own = protocol.providers.get_records(key, max(1, want), self.clock.now())
        by_holder: dict[bytes, tuple[Node, list[rec.ProviderRecord]]] = {}

        async def query(node: Node) -> list[Node] | None:
            answer = await protocol.call_get_providers(node, key)
            if answer is None:
                return None
            records, nodes, _token = answer  # (records were verified by the core)
            if records:
                by_holder[node.id] = (node, records)
            return nodes

        await self._lookup(key, query)
        target = Node(key)
        holders = sorted(by_holder.values(), key=lambda held: held[0].distance_to(target))
        return merge_provider_answers(own, [records for _, records in holders], want)

    # -- maintenance ---------------------------------------------------------------

    async def _every(self, interval: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(max(interval, MIN_INTERVAL))
            try:
                await job()
            except P2PError as exc:
                log.warning("DHT maintenance step failed: %s", exc)

    async def _refresh(self) -> None:
        """Look up a random id in every bucket not used for refresh_interval."""
        protocol = self._proto()
        self._storage.cull()
        protocol.providers.cull()
        for node_id in protocol.get_refresh_ids():
            await self._lookup_nodes(node_id, explore=True)

    async def _republish_values(self) -> None:
        for dkey, value in list(self._own_values.items()):
            await self._publish(dkey, value)
        for name, plain in list(self._own_names.items()):
            record = self._sign_mutable(name, plain)  # a fresh expiry needs a new seq
            await self._publish(rec.mutable_key(self.node_id, name), rec.to_value(record))

    async def _republish_providers(self) -> None:
        protocol = self._proto()
        for key, port in list(self._announced.items()):
            own = self._provider_record(key, self._local_host, port)
            protocol.providers.add_record(own, None, self.clock.now())
            await self._announce(key, port)
