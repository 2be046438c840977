"""Bounded, clock-driven stores for DHT values and provider records. Pure: no I/O.

Both stores keep entries in refresh order (an ``OrderedDict``, a refresh moves the
entry to the end), so expiry only ever looks at the front: O(1) amortised per call.
Limits refuse new entries rather than evict old ones, so a flood cannot push out
records that are kept fresh by their owners.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from itertools import islice

from p2pnode.clock import Clock
from p2pnode.dht.codec import MessageError
from p2pnode.dht.rpc_schema import BAD_ARGS, Value, check_value, is_node_id, is_port


def _check_key(key: object) -> bytes:
    if not is_node_id(key):
        raise MessageError(BAD_ARGS, "keys are 20 bytes")
    assert isinstance(key, bytes)
    return key


class ValueStore:
    """key (20 bytes) -> value, at most ``max_values`` entries, each for ``ttl`` seconds
    after its last store, and at most ``max_per_sender`` of them last stored by one
    sender (source IP; our own values have none), so that one address cannot fill
    the store and have everyone else's values refused."""

    def __init__(
        self,
        clock: Clock,
        *,
        max_values: int,
        ttl: float,
        max_value_bytes: int,
        max_per_sender: int | None = None,
    ) -> None:
        self._clock = clock
        self.max_values = max_values
        self.ttl = ttl
        self.max_value_bytes = max_value_bytes
        self.max_per_sender = max_values if max_per_sender is None else max_per_sender
        self._data: OrderedDict[bytes, tuple[float, Value, str | None]] = OrderedDict()
        self._per_sender: Counter[str] = Counter()

    def put(self, key: bytes, value: object, sender: str | None = None) -> bool:
        """Store (or refresh) a value. False when full; MessageError when invalid."""
        key = _check_key(key)
        checked = check_value(value, self.max_value_bytes)
        self.cull()
        old = self._data.get(key)
        if old is None and len(self._data) >= self.max_values:
            return False
        old_sender = None if old is None else old[2]
        if (
            sender is not None
            and sender != old_sender
            and self._per_sender[sender] >= self.max_per_sender
        ):
            return False
        self._uncount(old_sender)
        self._data[key] = (self._clock.now(), checked, sender)
        self._data.move_to_end(key)
        if sender is not None:
            self._per_sender[sender] += 1
        return True

    def get(self, key: bytes) -> Value | None:
        self.cull()
        entry = self._data.get(key)
        return None if entry is None else entry[1]

    def remove(self, key: bytes) -> None:
        entry = self._data.pop(key, None)
        if entry is not None:
            self._uncount(entry[2])

    def items(self) -> list[tuple[bytes, Value]]:
        """Live entries, least recently stored first."""
        self.cull()
        return [(key, entry[1]) for key, entry in self._data.items()]

    def newest(self, limit: int) -> list[tuple[bytes, Value]]:
        """At most ``limit`` live entries, most recently stored first."""
        self.cull()
        return [(key, entry[1]) for key, entry in islice(reversed(self._data.items()), limit)]

    def cull(self) -> int:
        deadline = self._clock.now() - self.ttl
        removed = 0
        while self._data:
            key, (stored_at, _, sender) = next(iter(self._data.items()))
            if stored_at > deadline:
                break
            del self._data[key]
            self._uncount(sender)
            removed += 1
        return removed

    def sender_count(self, sender: str) -> int:
        self.cull()
        return self._per_sender[sender]

    def _uncount(self, sender: str | None) -> None:
        if sender is not None:
            self._per_sender[sender] -= 1
            if self._per_sender[sender] <= 0:
                del self._per_sender[sender]

    def __len__(self) -> int:
        self.cull()
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        self.cull()
        return key in self._data


@dataclass(frozen=True)
class ProviderEntry:
    key: bytes
    node_id: bytes
    host: str
    port: int
    sender: str | None  # source IP it came from; None for our own records
    expires: float


class ProviderStore:
    """Who provides which 20-byte key: records expire ``ttl`` seconds after their last
    announcement and are bounded per key, per sender (source IP), in distinct keys and
    in total. A record is identified by (key, node id); announcing again refreshes it
    (last writer wins for host and port)."""

    def __init__(
        self,
        clock: Clock,
        *,
        ttl: float,
        max_per_key: int,
        max_per_sender: int,
        max_keys: int,
        max_records: int,
    ) -> None:
        self._clock = clock
        self.ttl = ttl
        self.max_per_key = max_per_key
        self.max_per_sender = max_per_sender
        self.max_keys = max_keys
        self.max_records = max_records
        self._order: OrderedDict[tuple[bytes, bytes], ProviderEntry] = OrderedDict()
        self._by_key: dict[bytes, dict[bytes, ProviderEntry]] = {}
        self._per_sender: Counter[str] = Counter()

    def add(self, key: bytes, node_id: bytes, host: str, port: int, sender: str | None) -> bool:
        """Record (or refresh) a provider. False when a limit refuses it."""
        key = _check_key(key)
        if not is_node_id(node_id) or not is_port(port):
            raise MessageError(BAD_ARGS, "provider needs a 20-byte id and a port")
        self.cull()
        records = self._by_key.get(key)
        old = records.get(node_id) if records is not None else None
        sender_changes = old is None or old.sender != sender
        if (
            sender_changes
            and sender is not None
            and self._per_sender[sender] >= self.max_per_sender
        ):
            return False
        if old is None:
            if records is None and len(self._by_key) >= self.max_keys:
                return False
            if records is not None and len(records) >= self.max_per_key:
                return False
            if len(self._order) >= self.max_records:
                return False
        else:
            self._forget(old)
        entry = ProviderEntry(key, node_id, host, port, sender, self._clock.now() + self.ttl)
        self._by_key.setdefault(key, {})[node_id] = entry
        self._order[(key, node_id)] = entry
        if sender is not None:
            self._per_sender[sender] += 1
        return True

    def get(self, key: bytes, limit: int | None = None) -> list[ProviderEntry]:
        """Live records for ``key``, most recently announced first."""
        self.cull()
        records = self._by_key.get(key)
        if not records:
            return []
        newest = sorted(records.values(), key=lambda e: e.expires, reverse=True)
        return newest if limit is None else newest[:limit]

    def remove(self, key: bytes, node_id: bytes) -> None:
        records = self._by_key.get(key)
        if records is not None and node_id in records:
            self._forget(records[node_id])

    def _forget(self, entry: ProviderEntry) -> None:
        self._order.pop((entry.key, entry.node_id), None)
        records = self._by_key.get(entry.key)
        if records is not None:
            records.pop(entry.node_id, None)
            if not records:
                del self._by_key[entry.key]
        if entry.sender is not None:
            self._per_sender[entry.sender] -= 1
            if self._per_sender[entry.sender] <= 0:
                del self._per_sender[entry.sender]

    def cull(self) -> int:
        now = self._clock.now()
        removed = 0
        while self._order:
            entry = next(iter(self._order.values()))
            if entry.expires > now:
                break
            self._forget(entry)
            removed += 1
        return removed

    def sender_count(self, sender: str) -> int:
        self.cull()
        return self._per_sender[sender]

    @property
    def key_count(self) -> int:
        self.cull()
        return len(self._by_key)

    def __len__(self) -> int:
        self.cull()
        return len(self._order)
