"""Adversaries for ``--mode virtual``: colluding Sybils at the datagram level.

Each Sybil is a UDP endpoint on its own virtual host that speaks the DHT's wire
format (decoded with :mod:`p2pnode.dht.codec`, so it does not depend on the
core's internals) and lies in every way the protocol lets it. The Sybils of a run
collude through one :class:`SybilRegistry`, as a real attacker coordinates its
machines. Behaviours (each can be switched off, see ``ScenarioConfig.adv_*``):

- ids clustered around the workload's target keys: every Sybil has a real
  Ed25519 key whose id (sha256(public key)[:20]) shares a long prefix with the
  key it attacks, found by grinding keys (:func:`grind`: one pool of tries shared
  by every target, capped; the cost is reported). So Sybils can prove their ids;
- eclipse: find_node / find_value / get_providers answers list only colluders,
  the closest to the key first, never an honest node (lookups are dropped into
  the Sybil cluster); impersonation: a find_node answer also lists the Sybil
  itself under the very id being looked up;
- forged values: find_value answers a forged value; under a signed record's key
  a forged envelope (the publisher's key, a huge sequence number, a signature by
  the Sybil: invalid) or a replay of the first version stored to a colluder
  (validly signed, stale);
- provider spam: get_providers answers fake records (validly signed by
  throw-away Sybil keys, addresses where nothing listens) and Sybils push
  add_provider announcements to the honest nodes closest to provider keys;
- ping, stun and identify are answered correctly (so Sybils enter routing
  tables); store and add_provider are accepted and dropped.

The wire format is the DHT's of the day, detected by feature: ``identify``,
tokens and signed provider records once :mod:`p2pnode.dht.records` and the
identify RPC exist; kademlia's plain ``add_provider(nodeid, key, port)`` before.
Everything a Sybil does is counted in the registry (deterministic per seed).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import heapq
import importlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pnode.dht import codec, rpc_schema
from p2pnode.dht.codec import Limits, Request, Response
from p2pnode.errors import MessageError
from p2pnode.identity import Identity
from p2pnode.sim.engine import FORGED_MARK, LookupOutcome, NodeFailure, SimNode, Traffic
from p2pnode.sim.vnet import BASE, SUBNETS, VirtualHost

PORT = 4001
K = 20  # contacts per answer, as honest nodes give
FAKE_PROVIDERS = 8  # fake records per get_providers answer
PUSHED_PER_NODE = 4  # fake announcements pushed to each honest node near a key
PUSH_TARGETS = 20  # honest nodes near a provider key that get them
SPAMMERS_PER_KEY = 8  # Sybils pushing announcements for each provider key
SPAM_INTERVAL = 30.0  # seconds between push rounds
CRAWL_ALPHA = 3
CRAWL_ROUNDS = 8
CRAWL_TIMEOUT = 2.0
BLACKHOLE_HOST = 250  # x.y.z.250 in 100.64.0.0/10: no simulated host has it
DEAD_PORT = 9  # a port where nothing listens (pushed records must name our own IP)
RECORD_TTL = 3600
IDENTIFY_DOMAIN = b"p2pnode/dht/identify/v1"


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


records: Any = _optional("p2pnode.dht.records")


# -- the wire format of the day ---------------------------------------------------------


@dataclass(frozen=True)
class WireFormat:
    """What today's DHT expects, found by trying its own parsers."""

    identify: bool  # the identify RPC exists
    identify_fields: int  # its answer's length (3 or 4: + the asker's IP)
    provider_token: bool  # get_providers answers carry a token
    signed_providers: bool  # provider records are signed records

    @classmethod
    def detect(cls) -> WireFormat:
        identify = "identify" in rpc_schema.RPC_NAMES
        fields = 3
        parse_identify = getattr(rpc_schema, "parse_identify_response", None)
        if parse_identify is not None:
            with contextlib.suppress(MessageError):
                parse_identify([b"\0" * 32, b"\0" * 64, b"t", "100.64.0.1"])
                fields = 4
        token = False
        with contextlib.suppress(MessageError):
            rpc_schema.parse_get_providers_response(
                {"providers": [], "nodes": [], "token": b"t"}, rpc_schema.SchemaLimits()
            )
            token = True
        signed = records is not None and hasattr(records, "sign_provider_record") and token
        return cls(identify, fields, token, signed)


# -- targets and grinding ---------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A key the workload uses: a plain value's, a signed record's (with its
    publisher and name), a resource's provider key, or an honest node's id."""

    kind: str  # value, record, provider, node
    key: bytes
    publisher_key: bytes = b""  # record: the publisher's public key
    name: str = ""  # record: its name


@dataclass(frozen=True)
class SybilSpec:
    slot: int
    identity: Identity
    target: int  # index into the registry's targets
    prefix_bits: int  # bits its id shares with the target key


def _common_prefix(a: int, b: int) -> int:
    return 160 - (a ^ b).bit_length()


def _try_identity(seed: int, attempt: int) -> Identity:
    raw = hashlib.sha256(f"p2pnode-sim:{seed}:sybil-key:{attempt}".encode()).digest()
    return Identity.from_seed(raw) if hasattr(Identity, "from_seed") else _identity(raw)


def _identity(raw: bytes) -> Identity:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Identity(Ed25519PrivateKey.from_private_bytes(raw))


def grind(
    seed: int, targets: Sequence[Target], count: int, tries: int
) -> tuple[list[SybilSpec], dict[str, Any]]:
    """``count`` Sybil identities, slot j attacking target j mod len(targets), each
    id as close as ``tries`` Ed25519 keys in all allow (the best keys go to the
    targets they are nearest to). Deterministic per seed; returns the specs and
    what the grinding cost."""
    if count == 0 or not targets:
        return [], {"tries": 0, "sybils": 0}
    started = time.perf_counter()
    wanted = Counter(j % len(targets) for j in range(count))
    order = sorted(range(len(targets)), key=lambda t: targets[t].key)
    points = [int.from_bytes(targets[t].key, "big") for t in order]
    # Per target, a min-heap of its best (prefix bits, -attempt) candidates.
    best: dict[int, list[tuple[int, int]]] = {t: [] for t in wanted}
    for attempt in range(tries):
        ident = _try_identity(seed, attempt)
        x = int.from_bytes(ident.node_id, "big")
        pos = bisect.bisect_left(points, x)
        # The longest common prefix is with a neighbour in sorted order.
        near = [p for p in (pos - 1, pos) if 0 <= p < len(points)]
        p = max(near, key=lambda i: (_common_prefix(points[i], x), -i))
        t = order[p]
        heap = best.get(t)
        if heap is None:
            continue
        entry = (_common_prefix(points[p], x), -attempt)
        if len(heap) < wanted[t]:
            heapq.heappush(heap, entry)
        elif entry > heap[0]:
            heapq.heapreplace(heap, entry)
    specs: list[SybilSpec] = []
    chosen = {t: sorted(heap, reverse=True) for t, heap in best.items()}
    fallback = tries
    for slot in range(count):
        t = slot % len(targets)
        key = int.from_bytes(targets[t].key, "big")
        if chosen[t]:
            bits, neg = chosen[t].pop(0)
            ident = _try_identity(seed, -neg)
        else:  # the pool left this target short: a key off the pool, wherever it falls
            ident = _try_identity(seed, fallback)
            fallback += 1
            bits = _common_prefix(key, int.from_bytes(ident.node_id, "big"))
        specs.append(SybilSpec(slot, ident, t, bits))
    cost = {
        "tries": fallback,
        "sybils": count,
        "targets": len(targets),
        "tries_per_sybil": fallback / count,
        "prefix_bits": _spread([s.prefix_bits for s in specs]),
        "wall_seconds": time.perf_counter() - started,
    }
    return specs, cost


def _spread(values: Sequence[int]) -> dict[str, float | int | None]:
    if not values:
        return {"min": None, "mean": None, "max": None}
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


# -- the colluders' shared state --------------------------------------------------------


class SybilRegistry:
    """What the Sybils of one run share: who they are, what they captured, counts."""

    def __init__(
        self,
        config: Any,  # ScenarioConfig (its adv_* switches)
        targets: Sequence[Target],
        specs: Sequence[SybilSpec],
        grind_cost: dict[str, Any],
        honest_ids: Sequence[bytes] = (),
    ) -> None:
        self.config = config
        self.targets = list(targets)
        self.specs = list(specs)
        self.wire = WireFormat.detect()
        self.by_key = {t.key: t for t in targets}
        self.provider_keys = [t.key for t in targets if t.kind == "provider"]
        self.members: dict[bytes, tuple[str, int]] = {}  # running Sybils
        self.ids = {s.identity.node_id for s in specs}
        self.stats: Counter[str] = Counter()
        # The first value a colluder was asked to store under each key (replayed
        # later: for a signed record, a validly signed but stale version).
        self.captured: dict[bytes, object] = {}
        self._closest: dict[bytes, list[list[object]]] = {}
        self.grind_cost = grind_cost
        self.closeness = _closeness(targets, specs, honest_ids)

    def join(self, node_id: bytes, host: str, port: int) -> None:
        self.members[node_id] = (host, port)
        self._closest.clear()

    def leave(self, node_id: bytes) -> None:
        if self.members.pop(node_id, None) is not None:
            self._closest.clear()

    def closest(self, key: bytes) -> list[list[object]]:
        """The k + 1 running colluders closest to ``key``, as [id, ip, port] entries
        (an answer lists k; the next one lends its address to an impersonation)."""
        cached = self._closest.get(key)
        if cached is None:
            goal = int.from_bytes(key, "big")
            ids = heapq.nsmallest(
                K + 1, self.members, key=lambda i: int.from_bytes(i, "big") ^ goal
            )
            cached = [[i, *self.members[i]] for i in ids]
            if len(self._closest) > 4096:
                self._closest.clear()
            self._closest[key] = cached
        return cached

    def report(self) -> dict[str, Any]:
        """The simulated part (deterministic); the grinding's wall time is apart."""
        cost = {k: v for k, v in self.grind_cost.items() if k != "wall_seconds"}
        kinds = Counter(self.targets[s.target].kind for s in self.specs)
        return {
            "sybils": len(self.specs),
            "behaviours": {
                name: bool(getattr(self.config, f"adv_{name}"))
                for name in (
                    "cluster",
                    "eclipse",
                    "impersonate",
                    "forge",
                    "spam_providers",
                    "drop_stores",
                )
            },
            "wire": {
                "identify": self.wire.identify,
                "provider_token": self.wire.provider_token,
                "signed_providers": self.wire.signed_providers,
                "records_module": records is not None,
            },
            "targets": dict(Counter(t.kind for t in self.targets)),
            "sybils_by_target_kind": dict(kinds),
            "grinding": cost,
            "closeness": self.closeness,
            "actions": dict(sorted(self.stats.items())),
        }


def _closeness(
    targets: Sequence[Target], specs: Sequence[SybilSpec], honest_ids: Sequence[bytes]
) -> dict[str, Any]:
    """How the ground ids compare with the honest ones: for each attacked target,
    whether its best Sybil is nearer than every honest node (the target node itself
    left out)."""
    if not specs or not honest_ids:
        return {}
    honest = [int.from_bytes(i, "big") for i in honest_ids]
    best: dict[int, int] = {}
    for s in specs:
        best[s.target] = max(best.get(s.target, 0), s.prefix_bits)
    nearer = 0
    honest_bits = []
    for t, bits in best.items():
        goal = int.from_bytes(targets[t].key, "big")
        top = max((_common_prefix(h, goal) for h in honest if h != goal), default=0)
        honest_bits.append(top)
        nearer += bits > top
    return {
        "targets_attacked": len(best),
        "sybil_nearer_than_every_honest_node": nearer,
        "honest_best_prefix_bits": _spread(honest_bits),
    }


# -- one Sybil on the wire --------------------------------------------------------------


class SybilProtocol(asyncio.DatagramProtocol):
    """A Sybil's DHT socket: answers every request as an attacker would, and sends
    its own requests (joining, crawling, pushing fake announcements)."""

    def __init__(
        self, spec: SybilSpec, registry: SybilRegistry, host: str, clock: Any, seed: int
    ) -> None:
        self.spec = spec
        self.identity = spec.identity
        self.node_id = spec.identity.node_id
        self.registry = registry
        self.config = registry.config
        self.host = host
        self.port = PORT
        self.clock = clock
        self.rng = random.Random(f"p2pnode-sim:{seed}:sybil:{spec.slot}")
        self.transport: asyncio.DatagramTransport | None = None
        self.limits = Limits()
        self.known: dict[bytes, tuple[str, int]] = {}  # honest contacts met
        self.tokens: dict[bytes, bytes] = {}  # tokens honest nodes gave us
        self._pending: dict[bytes, asyncio.Future[object]] = {}
        self._fakes: dict[bytes, list[object]] = {}  # fake provider records per key
        self._throwaway: list[Identity] = []
        self._kept: dict[bytes, object] = {}  # stores kept when not dropping

    # -- asyncio ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            message = codec.decode_datagram(data, self.limits)
        except MessageError:
            self.registry.stats["dropped_undecodable"] += 1
            return
        if isinstance(message, Response):
            future = self._pending.pop(message.msg_id, None)
            if future is not None and not future.done():
                future.set_result(message.payload)
            return
        try:
            reply = self._answer(message, addr)
        except (MessageError, ValueError, TypeError, IndexError):
            self.registry.stats["dropped_bad_request"] += 1
            return
        if reply is not _SILENT and self.transport is not None:
            with contextlib.suppress(MessageError):
                self.transport.sendto(codec.encode_response(message.msg_id, reply), addr)

    # -- answers -----------------------------------------------------------------------

    def _answer(self, request: Request, addr: tuple[str, int]) -> object:
        stats = self.registry.stats
        name, args = request.name, request.args
        sender = args[0] if args and rpc_schema.is_node_id(args[0]) else None
        if isinstance(sender, bytes) and sender not in self.registry.ids:
            self.known.setdefault(sender, (addr[0], addr[1]))
        stats[f"received.{name}"] += 1
        if name == "ping":
            return self.node_id
        if name == "stun":
            return [addr[0], addr[1]]
        challenge = args[1] if len(args) == 2 else None
        if name == "identify" and isinstance(sender, bytes) and isinstance(challenge, bytes):
            stats["identify_answered"] += 1
            signed = IDENTIFY_DOMAIN + sender + challenge + self.node_id
            answer: list[object] = [
                self.identity.public_key,
                self.identity.sign(signed),
                self.rng.randbytes(16),
            ]
            if self.registry.wire.identify_fields == 4:
                answer.append(addr[0])
            return answer
        if name == "store" and len(args) >= 3 and isinstance(args[1], bytes):
            self.registry.captured.setdefault(args[1], args[2])
            if self.config.adv_drop_stores:
                stats["stores_dropped"] += 1
            else:
                self._kept[args[1]] = args[2]
            return True
        if name == "add_provider":
            stats["provider_announcements_dropped"] += 1
            return True
        if len(args) != 2 or not rpc_schema.is_node_id(args[1]):
            return _SILENT
        key = args[1]
        assert isinstance(key, bytes)
        if name == "find_node":
            return self._nodes(key, impersonate=self.config.adv_impersonate)
        if name == "find_value":
            if self.config.adv_forge:
                return {"value": self._forged(key)}
            kept = self._kept.get(key)
            return {"value": kept} if kept is not None else self._nodes(key)
        if name == "get_providers":
            fakes = self._fake_providers(key) if self.config.adv_spam_providers else []
            stats["fake_provider_records_sent"] += len(fakes)
            payload: dict[str, object] = {"providers": fakes, "nodes": self._nodes(key)}
            if self.registry.wire.provider_token:
                payload["token"] = self.rng.randbytes(16)
            return payload
        return _SILENT

    def _nodes(self, key: bytes, impersonate: bool = False) -> list[list[object]]:
        stats = self.registry.stats
        colluders = self.registry.closest(key)
        if self.config.adv_eclipse:
            stats["eclipse_answers"] += 1
            nodes = colluders[:K]
        else:  # an honest-looking answer: everyone we know, colluders included
            goal = int.from_bytes(key, "big")
            pool = {**self.known, **self.registry.members}
            ids = heapq.nsmallest(K, pool, key=lambda i: int.from_bytes(i, "big") ^ goal)
            nodes = [[i, *pool[i]] for i in ids]
        if impersonate and key != self.node_id and key not in self.registry.ids:
            # The sought id at a colluder's address that this answer does not list
            # (a lookup asks each address once, and has already asked ours).
            stats["impersonations"] += 1
            lender = colluders[-1] if len(colluders) > K - 1 else [b"", self.host, self.port]
            nodes = [[key, lender[1], lender[2]], *nodes[: K - 1]]
        return nodes

    def _forged(self, key: bytes) -> object:
        stats = self.registry.stats
        target = self.registry.by_key.get(key)
        if target is not None and target.kind == "record" and records is not None:
            stale = self.registry.captured.get(key)
            if stale is not None and self.rng.random() < 0.5:
                stats["stale_records_sent"] += 1
                return stale
            stats["forged_records_sent"] += 1
            return self._forged_record(target)
        stats["forged_values_sent"] += 1
        return f"{FORGED_MARK}{key.hex()[:16]}"

    def _forged_record(self, target: Target) -> bytes:
        """The publisher's record with our value, the highest sequence number, and a
        signature that is ours (so it does not verify under the publisher's key)."""
        from p2pnode.identity import node_id_from_public_key

        value = f"{FORGED_MARK}{target.key.hex()[:16]}"
        expires = int(self.clock.now()) + RECORD_TTL
        seq = 2**62
        record = records.MutableRecord(
            node_id_from_public_key(target.publisher_key),
            target.publisher_key,
            target.name,
            value,
            seq,
            expires,
            self.identity.sign(value.encode() + target.key),
        )
        envelope: bytes = records.to_value(record)
        return envelope

    def _fake_providers(self, key: bytes) -> list[object]:
        fakes = self._fakes.get(key)
        if fakes is None:
            fakes = [self._fake_record(key, i) for i in range(FAKE_PROVIDERS)]
            self._fakes[key] = fakes
        return fakes

    def _blackhole(self) -> str:
        subnet = self.rng.randrange(SUBNETS)
        return _ip(BASE + (subnet << 8) + BLACKHOLE_HOST)

    def _fake_record(self, key: bytes, i: int, host: str | None = None) -> object:
        where = host or self._blackhole()
        port = DEAD_PORT if host else PORT
        if not self.registry.wire.signed_providers:
            return [self.rng.randbytes(20), where, port]
        ident = self._throwaway_key(i)
        expires = int(self.clock.now()) + RECORD_TTL
        record = records.sign_provider_record(ident, key, [(where, port)], 1, expires)
        return record.to_wire()

    def _throwaway_key(self, i: int) -> Identity:
        while len(self._throwaway) <= i:
            raw = hashlib.sha256(
                f"sybil:{self.spec.slot}:throwaway:{len(self._throwaway)}".encode()
            ).digest()
            self._throwaway.append(_identity(raw))
        return self._throwaway[i]

    # -- requests of ours --------------------------------------------------------------

    async def call(self, addr: tuple[str, int], name: str, args: Sequence[object]) -> object:
        """Send a request; its answer's payload, or None on no answer in time."""
        if self.transport is None:
            return None
        msg_id = self.rng.randbytes(codec.MSG_ID_LEN)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        self.registry.stats[f"sent.{name}"] += 1
        self.transport.sendto(codec.encode_request(msg_id, name, list(args)), addr)
        try:
            return await asyncio.wait_for(future, CRAWL_TIMEOUT)
        except TimeoutError:
            return None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being stopped
            return None  # the socket closed under the call
        finally:
            self._pending.pop(msg_id, None)

    def _learn(self, payload: object) -> list[tuple[bytes, str, int]]:
        if isinstance(payload, dict):
            payload = payload.get("nodes")
        try:
            listed = rpc_schema.parse_node_list(payload, rpc_schema.SchemaLimits())
        except MessageError:
            return []
        out = []
        for n in listed.nodes:
            if n.node_id not in self.registry.ids and n.node_id != self.node_id:
                self.known.setdefault(n.node_id, (n.host, n.port))
                out.append((n.node_id, n.host, n.port))
        return out

    async def crawl(self, key: bytes, rpc: str = "find_node") -> list[bytes]:
        """An iterative lookup among honest nodes (colluders skipped): the ids of
        the honest nodes that answered, nearest to ``key`` first. Every node asked
        hears from us, so it verifies us and puts us in its table."""
        goal = int.from_bytes(key, "big")
        answered: list[bytes] = []
        asked: set[bytes] = set()
        for _ in range(CRAWL_ROUNDS):
            pool = sorted(
                (i for i in self.known if i not in asked),
                key=lambda i: int.from_bytes(i, "big") ^ goal,
            )[:CRAWL_ALPHA]
            if not pool:
                break
            asked.update(pool)
            replies = await asyncio.gather(
                *(self.call(self.known[i], rpc, [self.node_id, key]) for i in pool)
            )
            for node_id, reply in zip(pool, replies, strict=True):
                if reply is None:
                    continue
                answered.append(node_id)
                if isinstance(reply, dict) and isinstance(reply.get("token"), bytes):
                    self.tokens[node_id] = reply["token"]
                self._learn(reply)
        answered.sort(key=lambda i: int.from_bytes(i, "big") ^ goal)
        return answered

    async def push_providers(self, key: bytes) -> None:
        """Announce fake providers of ``key`` to the honest nodes closest to it."""
        nearest = await self.crawl(key, "get_providers")
        stats = self.registry.stats
        for node_id in nearest[:PUSH_TARGETS]:
            addr = self.known[node_id]
            for i in range(PUSHED_PER_NODE):
                if self.registry.wire.signed_providers:
                    token = self.tokens.get(node_id)
                    if token is None:
                        break
                    # A holder only takes records naming the address they came from.
                    record = self._fake_record(key, i, host=self.host)
                    args: list[object] = [self.node_id, key, record, token]
                else:  # kademlia's plain announcement: a made-up provider id
                    args = [self.rng.randbytes(20), key, DEAD_PORT]
                answer = await self.call(addr, "add_provider", args)
                stats["provider_announcements_pushed"] += 1
                stats["provider_announcements_accepted"] += answer is True


_SILENT = object()


def _ip(value: int) -> str:
    return ".".join(str((value >> s) & 255) for s in (24, 16, 8, 0))


# -- the simulated node -----------------------------------------------------------------


class AdversaryNode(SimNode):
    """A Sybil as the simulation engine sees a node: it starts, joins and stops;
    it never takes part in the workload."""

    def __init__(
        self,
        index: int,
        workdir: Path,
        vhost: VirtualHost,
        spec: SybilSpec,
        registry: SybilRegistry,
        clock: Any,
        seed: int,
        port: int = PORT,
    ) -> None:
        super().__init__(index, workdir)
        self.vhost = vhost
        self._port = port
        self.host = vhost.ip
        self.spec = spec
        self.registry = registry
        self.sybil_id = spec.identity.node_id
        self.node_id = self.sybil_id
        self._clock = clock
        self._seed = seed
        self.protocol: SybilProtocol | None = None
        self._task: asyncio.Task[None] | None = None
        self._joined = False

    async def start(self, bootstrap: list[tuple[str, int]], port: int = 0) -> None:
        self.vhost.recover()
        protocol = SybilProtocol(self.spec, self.registry, self.host, self._clock, self._seed)
        wanted = port or self._port
        _, bound = await self.vhost.datagram_endpoint(lambda: protocol, self.host, wanted)
        protocol.port = bound
        self.protocol, self.port = protocol, bound
        self.registry.join(self.sybil_id, self.host, bound)
        self.running = True
        self._joined = False
        self._task = asyncio.get_running_loop().create_task(
            self._live(list(bootstrap)), name=f"sybil-{self.index}"
        )

    async def _live(self, bootstrap: list[tuple[str, int]]) -> None:
        protocol = self.protocol
        assert protocol is not None
        for addr in bootstrap:
            answer = await protocol.call(addr, "ping", [self.sybil_id])
            if rpc_schema.is_node_id(answer):
                assert isinstance(answer, bytes)
                protocol.known[answer] = addr
        target = self.registry.targets[self.spec.target]
        await protocol.crawl(self.sybil_id)
        await protocol.crawl(target.key)
        self._joined = True
        keys = self.registry.provider_keys
        stride = max(1, len(self.registry.specs) // max(1, SPAMMERS_PER_KEY * len(keys)))
        if not (self.registry.config.adv_spam_providers and keys and self.spec.slot % stride == 0):
            return
        key = keys[(self.spec.slot // stride) % len(keys)]
        while True:
            await protocol.push_providers(key)
            await asyncio.sleep(SPAM_INTERVAL)

    async def joined(self) -> bool:
        return self._joined

    async def kill(self) -> None:
        await self.stop()

    async def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        self.registry.leave(self.sybil_id)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()

    def _no(self) -> NodeFailure:
        return NodeFailure("adversary: a Sybil takes no part in the workload")

    async def share(self, path: Path) -> str:
        raise self._no()

    async def fetch(self, rid: str, dest: Path) -> Path:
        raise self._no()

    async def dht_put(self, key: str, value: str) -> bool:
        raise self._no()

    async def dht_get(self, key: str) -> str | None:
        raise self._no()

    async def find_peer(self, node_id: bytes) -> LookupOutcome:
        raise self._no()

    async def traffic(self) -> Traffic:
        known = len(self.protocol.known) if self.protocol is not None else 0
        return Traffic(routing_table_size=known, dht={"sybil": 1})
