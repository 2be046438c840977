"""Bounded, clock-driven stores for DHT values and provider records. Pure: no I/O.

Both stores keep entries in refresh order (an ``OrderedDict``, a refresh moves the
entry to the end), so expiry only ever looks at the front: O(1) amortised per call.

A limit never locks newcomers out: a sender (source IP) or subnet over its quota
evicts its own oldest entries, and a full store evicts from its heaviest user (the
heaviest sender of the heaviest subnet, see :mod:`.quota`), so a flood only pushes
out the flooder's records. Our own entries (sender None) are never evicted by
remote writes, and a remote store never replaces our own value under the same key.
Every eviction and refusal is counted in ``stats`` (``evicted.<why>``,
``refused.<why>``); ``last_refused`` names the latest refusal.

Signed records (:mod:`.records`) are checked on the way in, so a store never holds
one that does not verify:

- a value that is a record envelope must verify for its key, else it is refused
  (``refused.invalid_record``, and ``invalid_record.<reason>``);
- a mutable record replaces a stored one only with a higher seq (the same bytes
  refresh its ttl; an equal or lower seq is ``refused.stale_seq``), and it goes
  when it expires even if its ttl has not run out;
- an unsigned value never replaces a signed record
  (``refused.unsigned_over_signed``); a signed record replaces an unsigned value;
- provider records (``ProviderStore.add_record``) are verified inside the store; a
  higher seq from the same peer for the same key replaces the older record.

Methods take ``now`` (default: the injected clock).
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from p2pnode.clock import Clock
from p2pnode.dht.codec import MessageError
from p2pnode.dht.config import PROVIDER_RECORD_BYTES, VALUE_OVERHEAD
from p2pnode.dht.quota import Ledger, subnet_of
from p2pnode.dht.records import (
    MutableRecord,
    ProviderRecord,
    Record,
    RecordError,
    check_lifetime,
    open_value,
    verify_provider_record,
)
from p2pnode.dht.rpc_schema import BAD_ARGS, Value, check_value, is_node_id

_BIG = 1 << 62
_INF = float("inf")
# A provider record's public key and signature, besides PROVIDER_RECORD_BYTES.
SIGNED_PROVIDER_EXTRA = 96
# Why a record was refused (``invalid_record.<reason>``).
RECORD_REASONS = (
    "bad_record",
    "bad_signature",
    "id_mismatch",
    "wrong_key",
    "expired",
    "too_far_future",
)

# Why entries went or were refused (the stores' ``stats``; shown from the start).
VALUE_COUNTERS = (
    "evicted.sender_quota",
    "evicted.subnet_quota",
    "evicted.full",
    "refused.full",
    "refused.own_value",
    "refused.invalid_record",
    *(f"invalid_record.{reason}" for reason in RECORD_REASONS),
    "refused.stale_seq",
    "refused.unsigned_over_signed",
)
PROVIDER_COUNTERS = (
    "evicted.key_sender_quota",
    "evicted.key_subnet_quota",
    "evicted.sender_quota",
    "evicted.subnet_quota",
    "evicted.key_full",
    "evicted.keys_full",
    "evicted.full",
    "refused.key_full",
    "refused.keys_full",
    "refused.full",
    "refused.invalid_record",
    *(f"invalid_record.{reason}" for reason in RECORD_REASONS),
    "refused.stale_seq",
    "refused.own_value",
)

Ident = TypeVar("Ident", bound=Hashable)


class _Deadlines(Generic[Ident]):
    """Entries due before their turn in refresh order (a signed record's own expiry
    comes before its ttl runs out): a min-heap of (deadline, id). Stale pairs are
    checked by the caller when they come due, and purged when they outnumber the
    live entries."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, Ident]] = []

    def push(self, deadline: float, ident: Ident) -> None:
        heapq.heappush(self._heap, (deadline, ident))

    def due(self, now: float) -> Iterator[Ident]:
        heap = self._heap
        while heap and heap[0][0] <= now:
            yield heapq.heappop(heap)[1]

    def compact(self, live: int, early: Callable[[], Iterable[tuple[float, Ident]]]) -> None:
        if len(self._heap) > 2 * live + 64:
            self._heap = list(early())
            heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)


def _same(a: object, b: object) -> bool:
    """Equal values of one type (True == 1 == 1.0 in Python, not in the DHT)."""
    return type(a) is type(b) and a == b


def _record_counters(stats: Counter[str], reason: str) -> None:
    stats["refused.invalid_record"] += 1
    stats[f"invalid_record.{reason}"] += 1


def _check_key(key: object) -> bytes:
    if not is_node_id(key):
        raise MessageError(BAD_ARGS, "keys are 20 bytes")
    assert isinstance(key, bytes)
    return key


def value_size(value: Value) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8")) + VALUE_OVERHEAD
    if isinstance(value, bytes):
        return len(value) + VALUE_OVERHEAD
    return 8 + VALUE_OVERHEAD


@dataclass(frozen=True, slots=True)
class _Stored:
    stored_at: float
    value: Value
    sender: str | None
    size: int
    record: Record | None = None  # the verified record the value carries
    deadline: float = _INF  # goes then at the latest (a mutable record's expiry)


class ValueStore:
    """key (20 bytes) -> value for ``ttl`` seconds after its last store. Bounded in
    entries (``max_values``) and bytes (``max_bytes``); one sender holds at most
    ``max_per_sender`` entries and one subnet ``max_per_subnet``, past which their
    own oldest go. A mutable record may claim to expire at most ``max_record_ttl``
    (default ``ttl``) from now (plus a minute of clock skew)."""

    def __init__(
        self,
        clock: Clock,
        *,
        max_values: int,
        ttl: float,
        max_value_bytes: int,
        max_per_sender: int | None = None,
        max_per_subnet: int | None = None,
        max_bytes: int | None = None,
        max_record_ttl: float | None = None,
    ) -> None:
        self._clock = clock
        self.max_values = max_values
        self.ttl = ttl
        self.max_record_ttl = ttl if max_record_ttl is None else max_record_ttl
        self.max_value_bytes = max_value_bytes
        self.max_per_sender = max_values if max_per_sender is None else max_per_sender
        self.max_per_subnet = max_values if max_per_subnet is None else max_per_subnet
        self.max_bytes = _BIG if max_bytes is None else max_bytes
        self._data: OrderedDict[bytes, _Stored] = OrderedDict()
        self._ledger: Ledger[bytes] = Ledger()
        self._bytes = 0
        self._deadlines: _Deadlines[bytes] = _Deadlines()
        self.stats: Counter[str] = Counter(dict.fromkeys(VALUE_COUNTERS, 0))
        self.last_refused: str | None = None

    def _refuse(self, why: str) -> bool:
        self.stats[f"refused.{why}"] += 1
        self.last_refused = why
        return False

    def put(
        self, key: bytes, value: object, sender: str | None = None, now: float | None = None
    ) -> bool:
        """Store (or refresh) a value; ``sender`` None means our own. False when
        refused (counted, and named in ``last_refused``): a record envelope that
        does not verify for ``key`` (``invalid_record``), a stale mutable record
        (``stale_seq``), an unsigned value over a signed record
        (``unsigned_over_signed``), a remote write to our own value
        (``own_value``), or no room that a remote entry could give up (``full``).
        MessageError when invalid."""
        key = _check_key(key)
        checked = check_value(value, self.max_value_bytes)
        now = self._clock.now() if now is None else now
        self.cull(now)
        old = self._data.get(key)
        try:
            record = self._open(key, checked, old, now)
        except RecordError as exc:
            _record_counters(self.stats, exc.reason)
            self.last_refused = "invalid_record"
            return False
        if old is not None and old.sender is None and sender is not None:
            if _same(old.value, checked):
                return True  # it holds what was asked; our copy keeps its own ttl
            return self._refuse("own_value")
        if old is not None:
            why = _replace_refusal(old, checked, record)
            if why is not None:
                return self._refuse(why)
        size = value_size(checked)
        if old is not None:
            self._drop(key)
        if sender is not None:
            self._make_quota_room(sender)
        while len(self._data) >= self.max_values or self._bytes + size > self.max_bytes:
            victim = self._ledger.heaviest()
            if victim is None:
                if old is not None:  # nothing was taken: put back what was there
                    self._insert(key, old)
                return self._refuse("full")
            self._evict_oldest(victim, "full")
        deadline = now + self.ttl
        if isinstance(record, MutableRecord) and record.expires < deadline:
            deadline = record.expires
            self._deadlines.push(deadline, key)
            self._deadlines.compact(len(self._data), self._early_values)
        self._insert(key, _Stored(now, checked, sender, size, record, deadline))
        return True

    def _open(self, key: bytes, value: Value, old: _Stored | None, now: float) -> Record | None:
        # The record already held, sent again (a refresh, or a replay flood): its
        # signature was checked when stored (~90 µs); only its lifetime can change.
        if old is not None and old.record is not None and _same(old.value, value):
            if isinstance(old.record, MutableRecord):
                check_lifetime(old.record.expires, now, self.max_record_ttl)
            return old.record
        return open_value(key, value, now, self.max_record_ttl)

    def _early_values(self) -> Iterable[tuple[float, bytes]]:
        return (
            (entry.deadline, key)
            for key, entry in self._data.items()
            if entry.deadline < entry.stored_at + self.ttl
        )

    def record(self, key: bytes, now: float | None = None) -> Record | None:
        """The verified record stored under ``key``, if the value there is one."""
        self.cull(now)
        entry = self._data.get(key)
        return None if entry is None else entry.record

    def _make_quota_room(self, sender: str) -> None:
        while self._ledger.count(sender) >= self.max_per_sender:
            self._evict_oldest(sender, "sender_quota")
        subnet = subnet_of(sender)
        while self._ledger.subnet_count(subnet) >= self.max_per_subnet:
            victim = self._ledger.heaviest_in(subnet)
            assert victim is not None
            self._evict_oldest(victim, "subnet_quota")

    def _evict_oldest(self, sender: str, why: str) -> None:
        key = self._ledger.oldest(sender)
        assert key is not None
        self._drop(key)
        self.stats[f"evicted.{why}"] += 1

    def _insert(self, key: bytes, entry: _Stored) -> None:
        self._data[key] = entry
        self._data.move_to_end(key)
        self._bytes += entry.size
        if entry.sender is not None:
            self._ledger.add(entry.sender, key, entry.size)

    def _drop(self, key: bytes) -> _Stored | None:
        entry = self._data.pop(key, None)
        if entry is not None:
            self._bytes -= entry.size
            if entry.sender is not None:
                self._ledger.remove(entry.sender, key)
        return entry

    def get(self, key: bytes, now: float | None = None) -> Value | None:
        self.cull(now)
        entry = self._data.get(key)
        return None if entry is None else entry.value

    def is_own(self, key: bytes) -> bool:
        """Whether ``key`` holds a value we put ourselves."""
        entry = self._data.get(key)
        return entry is not None and entry.sender is None

    def remove(self, key: bytes) -> None:
        self._drop(key)

    def items(self, now: float | None = None) -> list[tuple[bytes, Value]]:
        """Live entries, least recently stored first."""
        self.cull(now)
        return [(key, entry.value) for key, entry in self._data.items()]

    def newest(self, limit: int, now: float | None = None) -> list[tuple[bytes, Value]]:
        """At most ``limit`` live entries, most recently stored first."""
        self.cull(now)
        out: list[tuple[bytes, Value]] = []
        for key in reversed(self._data):
            if len(out) >= limit:
                break
            out.append((key, self._data[key].value))
        return out

    def cull(self, now: float | None = None) -> int:
        now = self._clock.now() if now is None else now
        deadline = now - self.ttl
        removed = 0
        while self._data:
            key, entry = next(iter(self._data.items()))
            if entry.stored_at > deadline:
                break
            self._drop(key)
            removed += 1
        for key in self._deadlines.due(now):
            due = self._data.get(key)
            if due is not None and due.deadline <= now:
                self._drop(key)
                removed += 1
        return removed

    def sender_count(self, sender: str) -> int:
        self.cull()
        return self._ledger.count(sender)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        self.cull()
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        self.cull()
        return key in self._data


def _replace_refusal(old: _Stored, value: Value, record: Record | None) -> str | None:
    """Why ``value`` (carrying ``record``) may not replace ``old``, or None."""
    if old.record is not None and record is None:
        return "unsigned_over_signed"
    if (
        isinstance(old.record, MutableRecord)
        and isinstance(record, MutableRecord)
        and not _same(old.value, value)
        and record.seq <= old.record.seq
    ):
        return "stale_seq"
    return None


def _stale(record: ProviderRecord, held: ProviderRecord) -> bool:
    """A lower seq than the record held, or the same seq with other contents."""
    return record.seq < held.seq or (record.seq == held.seq and record != held)


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    key: bytes
    node_id: bytes
    host: str
    port: int
    sender: str | None  # source IP it came from; None for our own records
    expires: float
    record: ProviderRecord  # verified when it was added
    announced: float = 0.0  # when last announced

    @property
    def size(self) -> int:
        hosts = sum(len(host) + 8 for host, _ in self.record.addrs)
        hosts += sum(len(host) + 30 for host, _, _ in self.record.relays)
        return PROVIDER_RECORD_BYTES + SIGNED_PROVIDER_EXTRA + hosts


class ProviderStore:
    """Who provides which 20-byte key: records expire ``ttl`` seconds after their last
    announcement (a signed record at its own expiry if sooner). A record is
    identified by (key, node id); announcing again refreshes it.

    Records are signed (``add_record``) and verified here, so the store never
    holds one that does not verify; a higher seq replaces a lower one.
    ``get_records`` answers peers; ``get`` shows the entries (sender, expiry).

    Bounds, each evicting rather than refusing: per key (``max_per_key``; the
    least deserving record goes: from the subnet, then the address, holding most
    of the key, then the oldest), per key and sender /
    subnet, per sender and subnet overall, in total records, bytes and distinct
    keys."""

    def __init__(
        self,
        clock: Clock,
        *,
        ttl: float,
        max_per_key: int,
        max_per_sender: int,
        max_keys: int,
        max_records: int,
        max_per_key_per_sender: int | None = None,
        max_per_key_per_subnet: int | None = None,
        max_per_subnet: int | None = None,
        max_bytes: int | None = None,
        max_record_ttl: float | None = None,
    ) -> None:
        self._clock = clock
        self.ttl = ttl
        # A signed record may claim to expire at most this far ahead (plus a minute).
        self.max_record_ttl = ttl if max_record_ttl is None else max_record_ttl
        self.max_per_key = max_per_key
        self.max_per_sender = max_per_sender
        self.max_keys = max_keys
        self.max_records = max_records
        self.max_per_key_per_sender = (
            max_per_key if max_per_key_per_sender is None else max_per_key_per_sender
        )
        self.max_per_key_per_subnet = (
            max_per_key if max_per_key_per_subnet is None else max_per_key_per_subnet
        )
        self.max_per_subnet = max_records if max_per_subnet is None else max_per_subnet
        self.max_bytes = _BIG if max_bytes is None else max_bytes
        self._order: OrderedDict[tuple[bytes, bytes], ProviderEntry] = OrderedDict()
        self._by_key: dict[bytes, dict[bytes, ProviderEntry]] = {}
        self._ledger: Ledger[tuple[bytes, bytes]] = Ledger()
        self._bytes = 0
        self._deadlines: _Deadlines[tuple[bytes, bytes]] = _Deadlines()
        self.stats: Counter[str] = Counter(dict.fromkeys(PROVIDER_COUNTERS, 0))
        self.last_refused: str | None = None

    def _refuse(self, why: str) -> bool:
        self.stats[f"refused.{why}"] += 1
        self.last_refused = why
        return False

    def add_record(
        self, record: ProviderRecord, sender_host: str | None, now: float | None = None
    ) -> bool:
        """Verify and store (or refresh) a signed provider record; ``sender_host``
        None means our own. False (counted, named in ``last_refused``) when it does
        not verify (``invalid_record``), when a record of the same peer with a
        higher seq, or the same seq and other contents, is held (``stale_seq``),
        or when no remote record could make room."""
        now = self._clock.now() if now is None else now
        self.cull(now)
        old = self._by_key.get(record.key, {}).get(record.peer_id)
        try:
            if old is not None and old.record == record:
                # Held already, so verified (~90 µs): a refresh or a replay flood
                # only costs this lifetime check.
                check_lifetime(record.expires, now, self.max_record_ttl)
            else:
                verify_provider_record(record, now, self.max_record_ttl)
        except RecordError as exc:
            _record_counters(self.stats, exc.reason)
            self.last_refused = "invalid_record"
            return False
        if old is not None and _stale(record, old.record):
            return self._refuse("stale_seq")
        if old is not None and old.sender is None and sender_host is not None:
            # Our own entry: an echo changes nothing, anything else is refused.
            return True if old.record == record else self._refuse("own_value")
        host, port = record.addrs[0]
        expires = min(now + self.ttl, record.expires)
        entry = ProviderEntry(
            record.key, record.peer_id, host, port, sender_host, expires, record, now
        )
        return self._put(entry, old)

    def _put(self, entry: ProviderEntry, old: ProviderEntry | None) -> bool:
        key, sender = entry.key, entry.sender
        if old is not None:
            self._forget(old)
        if sender is not None:
            self._make_quota_room(key, sender)
        if not self._make_key_room(key) or not self._make_total_room(key, entry.size):
            if old is not None:
                self._insert(old)
            return False
        if entry.expires < entry.announced + self.ttl:
            self._deadlines.push(entry.expires, (entry.key, entry.node_id))
            self._deadlines.compact(len(self._order), self._early_records)
        self._insert(entry)
        return True

    def _early_records(self) -> Iterable[tuple[float, tuple[bytes, bytes]]]:
        return (
            (entry.expires, ident)
            for ident, entry in self._order.items()
            if entry.expires < entry.announced + self.ttl
        )

    def _make_quota_room(self, key: bytes, sender: str) -> None:
        subnet = subnet_of(sender)
        records = self._by_key.get(key, {})
        mine = [e for e in records.values() if e.sender == sender]
        while len(mine) >= self.max_per_key_per_sender:
            self._evict(min(mine, key=lambda e: e.expires), "key_sender_quota")
            mine = [e for e in self._by_key.get(key, {}).values() if e.sender == sender]
        while True:
            ours = [
                e
                for e in self._by_key.get(key, {}).values()
                if e.sender is not None and subnet_of(e.sender) == subnet
            ]
            if len(ours) < self.max_per_key_per_subnet:
                break
            self._evict(self._least_deserving(ours), "key_subnet_quota")
        while self._ledger.count(sender) >= self.max_per_sender:
            self._evict_oldest(sender, "sender_quota")
        while self._ledger.subnet_count(subnet) >= self.max_per_subnet:
            victim = self._ledger.heaviest_in(subnet)
            assert victim is not None
            self._evict_oldest(victim, "subnet_quota")

    def _make_key_room(self, key: bytes) -> bool:
        records = self._by_key.get(key)
        if records is None:
            # A new key: the heaviest users' oldest records go until a key is free
            # (a few rounds at most; then refused).
            for _ in range(16):
                if len(self._by_key) < self.max_keys:
                    return True
                victim = self._ledger.heaviest()
                if victim is None:
                    break
                self._evict_oldest(victim, "keys_full")
            if len(self._by_key) < self.max_keys:
                return True
            return self._refuse("keys_full")
        while len(records) >= self.max_per_key:
            remote = [e for e in records.values() if e.sender is not None]
            if not remote:
                return self._refuse("key_full")
            self._evict(self._least_deserving(remote), "key_full")
        return True

    def _make_total_room(self, key: bytes, size: int) -> bool:
        while len(self._order) >= self.max_records or self._bytes + size > self.max_bytes:
            victim = self._ledger.heaviest()
            if victim is None:
                return self._refuse("full")
            self._evict_oldest(victim, "full")
        return True

    @staticmethod
    def _least_deserving(records: list[ProviderEntry]) -> ProviderEntry:
        """From the subnet, then the address, with most of ``records``; then the
        least recently announced."""
        subnets = Counter(subnet_of(e.sender or "") for e in records)
        senders = Counter(e.sender for e in records)
        return min(
            records,
            key=lambda e: (
                -subnets[subnet_of(e.sender or "")],
                -senders[e.sender],
                e.announced,
                e.expires,
            ),
        )

    def _evict_oldest(self, sender: str, why: str) -> None:
        ident = self._ledger.oldest(sender)
        assert ident is not None
        self._evict(self._order[ident], why)

    def _evict(self, entry: ProviderEntry, why: str) -> None:
        self._forget(entry)
        self.stats[f"evicted.{why}"] += 1

    def _insert(self, entry: ProviderEntry) -> None:
        ident = (entry.key, entry.node_id)
        self._by_key.setdefault(entry.key, {})[entry.node_id] = entry
        self._order[ident] = entry
        self._order.move_to_end(ident)
        self._bytes += entry.size
        if entry.sender is not None:
            self._ledger.add(entry.sender, ident, entry.size)

    def get(
        self, key: bytes, limit: int | None = None, now: float | None = None
    ) -> list[ProviderEntry]:
        """A fair sample of the live records for ``key``: one record per address
        (its freshest) before any address gets a second, addresses whose freshest
        record is freshest first; at most ``limit``."""
        self.cull(now)
        records = self._by_key.get(key)
        if not records:
            return []
        by_host: dict[str, list[ProviderEntry]] = {}
        for entry in sorted(records.values(), key=lambda e: e.expires, reverse=True):
            by_host.setdefault(entry.host, []).append(entry)
        groups = list(by_host.values())  # in order of each host's freshest record
        out: list[ProviderEntry] = []
        limit = len(records) if limit is None else limit
        depth = 0
        while len(out) < limit and groups:
            groups = [g for g in groups if len(g) > depth]
            for group in groups:
                if len(out) >= limit:
                    break
                out.append(group[depth])
            depth += 1
        return out

    def get_records(
        self, key: bytes, n: int | None = None, now: float | None = None
    ) -> list[ProviderRecord]:
        """A fair sample of the live signed records for ``key``, at most ``n``: at
        most one per host (a record's first address), freshest (last announced,
        then latest expiry) first, taken in turns from the senders' subnets (our
        own first) so one flooding subnet holds at most every other slot while
        others have records to give."""
        self.cull(now)
        entries = list(self._by_key.get(key, {}).values())
        entries.sort(key=lambda e: (e.announced, e.expires), reverse=True)
        groups: dict[str | None, list[ProviderEntry]] = {}
        for entry in entries:
            group = None if entry.sender is None else subnet_of(entry.sender)
            groups.setdefault(group, []).append(entry)
        # Our own group first, then in order of each group's freshest record.
        turns = sorted(groups.items(), key=lambda item: item[0] is not None)
        queues = [iter(group) for _, group in turns]
        limit = len(entries) if n is None else n
        out: list[ProviderRecord] = []
        hosts: set[str] = set()
        while queues and len(out) < limit:
            still: list[Iterator[ProviderEntry]] = []
            for queue in queues:
                if len(out) >= limit:
                    break
                for entry in queue:  # this group's freshest with a host not yet listed
                    record = entry.record
                    if record.host not in hosts:
                        hosts.add(record.host)
                        out.append(record)
                        still.append(queue)
                        break
            queues = still
        return out

    def remove(self, key: bytes, node_id: bytes) -> None:
        records = self._by_key.get(key)
        if records is not None and node_id in records:
            self._forget(records[node_id])

    def _forget(self, entry: ProviderEntry) -> None:
        ident = (entry.key, entry.node_id)
        if self._order.pop(ident, None) is None:
            return
        self._bytes -= entry.size
        records = self._by_key.get(entry.key)
        if records is not None:
            records.pop(entry.node_id, None)
            if not records:
                del self._by_key[entry.key]
        if entry.sender is not None:
            self._ledger.remove(entry.sender, ident)

    def cull(self, now: float | None = None) -> int:
        now = self._clock.now() if now is None else now
        removed = 0
        while self._order:
            entry = next(iter(self._order.values()))
            if entry.expires > now:
                break
            self._forget(entry)
            removed += 1
        for ident in self._deadlines.due(now):
            due = self._order.get(ident)
            if due is not None and due.expires <= now:
                self._forget(due)
                removed += 1
        return removed

    def sender_count(self, sender: str) -> int:
        self.cull()
        return self._ledger.count(sender)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    @property
    def key_count(self) -> int:
        self.cull()
        return len(self._by_key)

    def __len__(self) -> int:
        self.cull()
        return len(self._order)
