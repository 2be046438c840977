"""Signed DHT records: provider records, and mutable / immutable values (BEP 44,
IPNS). Pure: no I/O, no clock (``now`` is unix seconds, given).

Every byte here may come from an attacker. Decoding is strict (exact types, sizes,
canonical msgpack) and every failure is a :class:`RecordError` whose ``reason`` is
a short counter name. Signatures are Ed25519 over a domain tag, the DHT key and a
canonical msgpack, so a record signed for one key or one kind can never be
replayed under another.

- **Provider records** travel in ``add_provider`` / ``get_providers`` as the wire
  list ``[peer_id, public_key, [[host, port], ...], seq, expires, signature]``;
  the key is the RPC's own argument. An address may also be a relay address
  ``[relay host, relay port, relay peer id]`` (reach the peer through that relay,
  ``p2pnode/nat/relay.py``): at most ``MAX_RELAY_ADDRS``, after the direct ones,
  and at least one direct address first.
- **Mutable records** live under ``mutable_key(peer_id, name)``: only the holder
  of the key pair can publish there, and a higher ``seq`` wins.
- **Immutable records** live under the hash of their envelope: any holder checks
  the value against the key.

Both value kinds travel as ordinary DHT values of type bytes (an *envelope*:
``RECORD_MAGIC``, a version byte, a msgpack list), so kademlia's store /
find_value wire format is unchanged. Any other value is a plain, unauthenticated
kademlia value (``open_value`` gives None); a bytes value that starts with the
magic but is not a valid record is refused.

Envelope overhead: a mutable record with a 3.5 KiB value and an n-byte name (UTF-8)
costs 117 + n bytes besides its value while seq < 128 and expires < 2**32, at most
``ENVELOPE_OVERHEAD`` (130) + n; an immutable one 10. With the longest name (64
characters, up to 256 bytes) a 3.5 KiB value still fits in a 4096-byte DHT value.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeGuard

import msgpack  # type: ignore[import-untyped,unused-ignore]

from p2pnode.dht.codec import Limits, unpack
from p2pnode.dht.rpc_schema import MAX_INT, MIN_INT, Value, normalize_host
from p2pnode.errors import MessageError, ProtocolError, UsageError
from p2pnode.identity import (
    NODE_ID_LEN,
    PUBLIC_KEY_LEN,
    Identity,
    node_id_from_public_key,
    peer_id_from_str,
    peer_id_to_str,
    verify_signature,
)

__all__ = [
    "ENVELOPE_OVERHEAD",
    "FUTURE_SLACK",
    "IMMUTABLE_PREFIX",
    "MAX_ENVELOPE_BYTES",
    "MAX_NAME_LEN",
    "MAX_PROVIDER_ADDRS",
    "MAX_RELAY_ADDRS",
    "MAX_SEQ",
    "RECORD_MAGIC",
    "RECORD_VERSION",
    "SIGNATURE_LEN",
    "ImmutableRecord",
    "MutableRecord",
    "ProviderRecord",
    "Record",
    "RecordError",
    "best_record",
    "check_lifetime",
    "immutable_key",
    "mutable_key",
    "names_host",
    "open_value",
    "parse_address",
    "parse_provider_record",
    "pick_best",
    "record_address",
    "sign_mutable",
    "sign_provider_record",
    "to_value",
    "verify_provider_record",
]

SIGNATURE_LEN = 64
MAX_PROVIDER_ADDRS = 4
# Of those, at most this many relay addresses ([relay host, relay port, relay id]).
MAX_RELAY_ADDRS = 2
MAX_SEQ = 2**63 - 1
MAX_NAME_LEN = 64
# A record may claim to expire at most max_ttl seconds from now, plus this much
# for clocks that disagree.
FUTURE_SLACK = 60
# An envelope is a DHT value: it fits kademlia's value limit.
MAX_ENVELOPE_BYTES = 4096

RECORD_MAGIC = b"\xfap2p"  # 0xfa is not valid UTF-8, and rarely starts a plain value
RECORD_VERSION = 1
_PREFIX = RECORD_MAGIC + bytes([RECORD_VERSION])
_MUTABLE = 1
_IMMUTABLE = 2
IMMUTABLE_PREFIX = "imm:"

_PROVIDER_TAG = b"p2pnode/provider/v1"
_MUTABLE_TAG = b"p2pnode/mutable/v1"
_MUTABLE_KEY_TAG = b"p2pnode/mutable-key/v1"
_LIMITS = Limits(max_datagram=MAX_ENVELOPE_BYTES, max_array_len=8, max_map_len=0)

# What an envelope adds to its value, at most, for a value of up to 64 KiB:
# magic + version, list header, kind, public key (bin8), name header, value header
# (str16/bin16), seq (uint64), expires (uint64 here, uint32 until 2106), signature.
ENVELOPE_OVERHEAD = 5 + 1 + 1 + (2 + PUBLIC_KEY_LEN) + 2 + 3 + 9 + 9 + (2 + SIGNATURE_LEN)


class RecordError(ProtocolError, ValueError):
    """A record or address is not acceptable; ``reason`` names the counter
    (``bad_record``, ``bad_signature``, ``id_mismatch``, ``wrong_key``,
    ``expired``, ``too_far_future``, ``bad_address``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _pack(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _is_int(value: object, low: int, high: int) -> TypeGuard[int]:
    return type(value) is int and low <= value <= high


def _is_bytes(value: object, length: int) -> TypeGuard[bytes]:
    return type(value) is bytes and len(value) == length


# -- provider records -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """``peer_id`` provides ``key`` at ``addrs`` until ``expires``, signed by the key
    whose hash is ``peer_id``; a higher ``seq`` replaces a lower one."""

    key: bytes
    peer_id: bytes
    public_key: bytes
    addrs: tuple[tuple[str, int], ...]
    seq: int
    expires: int
    signature: bytes
    # (relay host, relay port, relay peer id): also reachable through these relays
    relays: tuple[tuple[str, int, bytes], ...] = ()

    def to_wire(self) -> list[object]:
        addrs = _wire_addrs(self.addrs, self.relays)
        return [self.peer_id, self.public_key, addrs, self.seq, self.expires, self.signature]

    @property
    def host(self) -> str:
        """The first address's host: one answer lists one record per host."""
        return self.addrs[0][0]


def names_host(record: ProviderRecord, host: str) -> bool:
    """Whether one of ``record``'s addresses is at ``host`` (an announcement's
    source ip): a holder that takes only such records cannot be made to send
    downloaders to a third party's address."""
    normalized = normalize_host(host)
    return normalized is not None and any(h == normalized for h, _ in record.addrs)


def _wire_addrs(
    addrs: Iterable[tuple[str, int]], relays: Iterable[tuple[str, int, bytes]]
) -> list[list[object]]:
    out: list[list[object]] = [[host, port] for host, port in addrs]
    out += [[host, port, relay] for host, port, relay in relays]
    return out


def _provider_signed_bytes(
    key: bytes,
    peer_id: bytes,
    addrs: Iterable[tuple[str, int]],
    seq: int,
    expires: int,
    relays: Iterable[tuple[str, int, bytes]] = (),
) -> bytes:
    # Without relays, the same bytes as before relay addresses existed.
    body = _pack([peer_id, _wire_addrs(addrs, relays), seq, expires])
    return _PROVIDER_TAG + key + body


def _check_addrs(
    addrs: object,
) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int, bytes], ...]]:
    """Canonical (host, port) pairs and (host, port, relay id) relay addresses, or
    RecordError: 1..4 in all, direct ones first (at least one), at most 2 relay
    addresses, IP literals in normalized form (not normalized here: the signature
    covers the text), no duplicates."""
    if not isinstance(addrs, list | tuple) or not 1 <= len(addrs) <= MAX_PROVIDER_ADDRS:
        raise RecordError("bad_record", f"1 to {MAX_PROVIDER_ADDRS} addresses")
    out: list[tuple[str, int]] = []
    relays: list[tuple[str, int, bytes]] = []
    for entry in addrs:
        if not isinstance(entry, list | tuple) or len(entry) not in (2, 3):
            raise RecordError("bad_record", "an address is [host, port] or [host, port, relay id]")
        host, port = entry[0], entry[1]
        if type(host) is not str or normalize_host(host) != host:
            raise RecordError("bad_record", "a host is a normalized IP literal")
        if not _is_int(port, 1, 65535):
            raise RecordError("bad_record", "a port is 1..65535")
        if len(entry) == 2:
            if relays:
                raise RecordError("bad_record", "direct addresses come before relay addresses")
            out.append((host, port))
            continue
        relay = entry[2]
        if not _is_bytes(relay, NODE_ID_LEN):
            raise RecordError("bad_record", "a relay id is 20 bytes")
        relays.append((host, port, relay))
    if not out:
        raise RecordError("bad_record", "at least one direct address")
    if len(relays) > MAX_RELAY_ADDRS:
        raise RecordError("bad_record", f"at most {MAX_RELAY_ADDRS} relay addresses")
    if len(set(out)) != len(out) or len(set(relays)) != len(relays):
        raise RecordError("bad_record", "duplicate address")
    return tuple(out), tuple(relays)


def _check_seq_expires(seq: object, expires: object) -> None:
    if not _is_int(seq, 0, MAX_SEQ):
        raise RecordError("bad_record", "seq is an integer 0..2**63-1")
    if not _is_int(expires, 0, MAX_SEQ):
        raise RecordError("bad_record", "expires is an integer (unix seconds)")


def sign_provider_record(
    identity: Identity,
    key: bytes,
    addrs: Iterable[tuple[str, int]],
    seq: int,
    expires: int,
    relays: Iterable[tuple[str, int, bytes]] = (),
) -> ProviderRecord:
    """Our record for ``key``; hosts are normalized (IPv4-mapped IPv6 -> IPv4).
    ``relays``: relay addresses (relay host, port, relay id). ValueError (a
    RecordError) on a bad argument."""
    if not _is_bytes(key, NODE_ID_LEN):
        raise RecordError("bad_record", "keys are 20 bytes")
    normalized: list[list[object]] = []
    entries: list[tuple[object, ...]] = [*addrs, *relays]
    for host, port, *relay in entries:
        norm = normalize_host(host) if isinstance(host, str) else None
        if norm is None:
            raise RecordError("bad_record", f"not an IP literal: {host!r}")
        normalized.append([norm, port, *relay])
    checked, relay_addrs = _check_addrs(normalized)
    _check_seq_expires(seq, expires)
    peer_id = identity.node_id
    signed = _provider_signed_bytes(key, peer_id, checked, seq, expires, relay_addrs)
    signature = identity.sign(signed)
    return ProviderRecord(
        key, peer_id, identity.public_key, checked, seq, expires, signature, relay_addrs
    )


def parse_provider_record(key: bytes, wire: object) -> ProviderRecord:
    """A record from its wire list, checked in structure, types and sizes (not the
    signature: see :func:`verify_provider_record`); RecordError("bad_record")."""
    if not _is_bytes(key, NODE_ID_LEN):
        raise RecordError("bad_record", "keys are 20 bytes")
    if not isinstance(wire, list | tuple) or len(wire) != 6:
        raise RecordError("bad_record", "a provider record is a list of 6")
    peer_id, public_key, addrs, seq, expires, signature = wire
    if not _is_bytes(peer_id, NODE_ID_LEN):
        raise RecordError("bad_record", "peer id is 20 bytes")
    if not _is_bytes(public_key, PUBLIC_KEY_LEN):
        raise RecordError("bad_record", "public key is 32 bytes")
    checked, relays = _check_addrs(addrs)
    if not _is_int(seq, 0, MAX_SEQ) or not _is_int(expires, 0, MAX_SEQ):
        raise RecordError("bad_record", "seq and expires are integers 0..2**63-1")
    if not _is_bytes(signature, SIGNATURE_LEN):
        raise RecordError("bad_record", "signature is 64 bytes")
    return ProviderRecord(key, peer_id, public_key, checked, seq, expires, signature, relays)


def check_lifetime(expires: int, now: float, max_ttl: float) -> None:
    """RecordError ``expired`` or ``too_far_future`` unless ``expires`` is in
    (now, now + max_ttl + FUTURE_SLACK]: all a holder re-checks for a record it
    already verified."""
    if expires <= now:
        raise RecordError("expired", f"expired {now - expires:.0f} s ago")
    if expires > now + max_ttl + FUTURE_SLACK:
        raise RecordError("too_far_future", f"expires in {expires - now:.0f} s")


def verify_provider_record(record: ProviderRecord, now: float, max_ttl: float) -> None:
    """None if ``record`` is good now, else RecordError: ``id_mismatch``,
    ``expired``, ``too_far_future``, ``bad_signature`` (cheap checks first)."""
    if node_id_from_public_key(record.public_key) != record.peer_id:
        raise RecordError("id_mismatch", "peer id is not the hash of the public key")
    check_lifetime(record.expires, now, max_ttl)
    signed = _provider_signed_bytes(
        record.key, record.peer_id, record.addrs, record.seq, record.expires, record.relays
    )
    if not verify_signature(record.public_key, record.signature, signed):
        raise RecordError("bad_signature", "provider record")


# -- mutable and immutable records ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MutableRecord:
    """``value`` published by ``peer_id`` under ``name``; lives at
    ``mutable_key(peer_id, name)``."""

    peer_id: bytes
    public_key: bytes
    name: str
    value: Value
    seq: int
    expires: int
    signature: bytes

    @property
    def key(self) -> bytes:
        return mutable_key(self.peer_id, self.name)


@dataclass(frozen=True, slots=True)
class ImmutableRecord:
    """A value whose DHT key is the hash of its envelope."""

    value: Value


Record = MutableRecord | ImmutableRecord


def _check_name(name: object) -> str:
    if (
        type(name) is not str
        or not 1 <= len(name) <= MAX_NAME_LEN
        or not name.isprintable()
        or "/" in name
    ):
        raise RecordError("bad_record", f"a name is 1..{MAX_NAME_LEN} printable characters, no '/'")
    return name


def _check_record_value(value: object) -> Value:
    if type(value) is int:
        if not MIN_INT <= value <= MAX_INT:
            raise RecordError("bad_record", "integer out of range")
        return value
    if type(value) is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RecordError("bad_record", "text is not valid UTF-8") from None
        return value
    if type(value) is bytes or type(value) is float or type(value) is bool:
        return value
    raise RecordError("bad_record", f"a value of type {type(value).__name__}")


def mutable_key(peer_id: bytes, name: str) -> bytes:
    """The DHT key of ``peer_id``'s record ``name`` (peer ids are fixed length, so
    the concatenation is unambiguous)."""
    digest = hashlib.sha256(_MUTABLE_KEY_TAG + peer_id + name.encode("utf-8")).digest()
    return digest[:NODE_ID_LEN]


def _mutable_signed_bytes(key: bytes, name: str, value: Value, seq: int, expires: int) -> bytes:
    return _MUTABLE_TAG + key + _pack([name, value, seq, expires])


def sign_mutable(
    identity: Identity, name: str, value: Value, seq: int, expires: int
) -> MutableRecord:
    """Our record ``name``; RecordError("bad_record") on a bad argument or when
    its envelope would not fit in a DHT value (``MAX_ENVELOPE_BYTES``)."""
    _check_name(name)
    _check_record_value(value)
    _check_seq_expires(seq, expires)
    peer_id = identity.node_id
    key = mutable_key(peer_id, name)
    signature = identity.sign(_mutable_signed_bytes(key, name, value, seq, expires))
    record = MutableRecord(peer_id, identity.public_key, name, value, seq, expires, signature)
    if len(to_value(record)) > MAX_ENVELOPE_BYTES:
        raise RecordError("bad_record", f"the record does not fit in {MAX_ENVELOPE_BYTES} bytes")
    return record


def to_value(record: Record) -> bytes:
    """The envelope: the DHT value that carries ``record``."""
    if isinstance(record, MutableRecord):
        body: list[object] = [
            _MUTABLE,
            record.public_key,
            record.name,
            record.value,
            record.seq,
            record.expires,
            record.signature,
        ]
    else:
        body = [_IMMUTABLE, record.value]
    return _PREFIX + _pack(body)


def immutable_key(record: ImmutableRecord) -> bytes:
    return hashlib.sha256(to_value(record)).digest()[:NODE_ID_LEN]


def _decode_envelope(value: bytes) -> Record:
    """The record in an envelope, checked in structure and canonical encoding (the
    same record has exactly one envelope); no signature or key check."""
    if len(value) > MAX_ENVELOPE_BYTES:
        raise RecordError("bad_record", "envelope too long")
    if value[len(RECORD_MAGIC) : len(_PREFIX)] != _PREFIX[len(RECORD_MAGIC) :]:
        raise RecordError("bad_record", "unknown envelope version")
    body = value[len(_PREFIX) :]
    try:
        obj = unpack(body, _LIMITS)
    except MessageError as exc:
        raise RecordError("bad_record", f"undecodable envelope ({exc})") from None
    if type(obj) is not list or not obj:
        raise RecordError("bad_record", "an envelope is a list")
    record: Record
    if obj[0] == _MUTABLE and type(obj[0]) is int and len(obj) == 7:
        _, public_key, name, inner, seq, expires, signature = obj
        if not _is_bytes(public_key, PUBLIC_KEY_LEN):
            raise RecordError("bad_record", "public key is 32 bytes")
        _check_name(name)
        _check_record_value(inner)
        _check_seq_expires(seq, expires)
        if not _is_bytes(signature, SIGNATURE_LEN):
            raise RecordError("bad_record", "signature is 64 bytes")
        peer_id = node_id_from_public_key(public_key)
        record = MutableRecord(peer_id, public_key, name, inner, seq, expires, signature)
    elif obj[0] == _IMMUTABLE and type(obj[0]) is int and len(obj) == 2:
        record = ImmutableRecord(_check_record_value(obj[1]))
    else:
        raise RecordError("bad_record", "unknown record kind")
    if to_value(record) != value:
        raise RecordError("bad_record", "not canonically encoded")
    return record


def is_envelope(value: object) -> bool:
    """Whether ``value`` claims to be a record (it may still be a bad one)."""
    return type(value) is bytes and value.startswith(RECORD_MAGIC)


def open_value(key: bytes, value: object, now: float, max_ttl: float) -> Record | None:
    """The record carried by ``value`` stored under ``key``, verified: None for a
    plain value (not an envelope), RecordError for an envelope that is malformed
    (``bad_record``), under another key (``wrong_key``), ``expired``,
    ``too_far_future`` or badly signed (``bad_signature``). A mutable record's
    peer id is the hash of its public key by construction."""
    if not is_envelope(value):
        return None
    assert isinstance(value, bytes)
    record = _decode_envelope(value)
    if isinstance(record, ImmutableRecord):
        if hashlib.sha256(value).digest()[:NODE_ID_LEN] != key:
            raise RecordError("wrong_key", "the key is not the hash of the record")
        return record
    if mutable_key(record.peer_id, record.name) != key:
        raise RecordError("wrong_key", "the key is not this publisher's name")
    check_lifetime(record.expires, now, max_ttl)
    signed = _mutable_signed_bytes(key, record.name, record.value, record.seq, record.expires)
    if not verify_signature(record.public_key, record.signature, signed):
        raise RecordError("bad_signature", "mutable record")
    return record


# -- addresses ---------------------------------------------------------------------------


def record_address(record: Record) -> str:
    """What the CLI prints and accepts: ``<peer id>/<name>`` for a mutable record,
    ``imm:<40 hex digits>`` (its key) for an immutable one."""
    if isinstance(record, MutableRecord):
        return f"{peer_id_to_str(record.peer_id)}/{record.name}"
    return IMMUTABLE_PREFIX + immutable_key(record).hex()


def parse_address(text: str) -> tuple[bytes, str]:
    """``(dht key, "mutable" | "immutable")`` for a record address, else
    RecordError("bad_address"): also for a text that is no address at all (a
    plain kademlia name), so a caller can fall back to the unauthenticated get."""
    if not isinstance(text, str):
        raise RecordError("bad_address", "an address is text")
    if text.startswith(IMMUTABLE_PREFIX):
        digits = text[len(IMMUTABLE_PREFIX) :]
        try:
            key = bytes.fromhex(digits)
        except ValueError:
            key = b""
        if len(key) != NODE_ID_LEN or len(digits) != 2 * NODE_ID_LEN:
            raise RecordError(
                "bad_address", f"{text!r}: an immutable address is imm:<40 hex digits>"
            )
        return key, "immutable"
    peer, slash, name = text.partition("/")
    if not slash:
        raise RecordError(
            "bad_address",
            f"{text!r} is not a record address (<peer id>/<name> or imm:<40 hex digits>)",
        )
    try:
        peer_id = peer_id_from_str(peer)
    except UsageError as exc:
        raise RecordError("bad_address", f"{text!r}: {exc}") from None
    try:
        _check_name(name)
    except RecordError:
        raise RecordError(
            "bad_address",
            f"{text!r}: a name is 1..{MAX_NAME_LEN} printable characters, no '/'",
        ) from None
    return mutable_key(peer_id, name), "mutable"


# -- choosing among values found by a lookup -----------------------------------------------


def best_record(
    key: bytes,
    values: Iterable[object],
    now: float,
    max_ttl: float,
    *,
    allow_unsigned: bool = True,
) -> tuple[Record | None, Value | None, Counter[str]]:
    """Like :func:`pick_best`, also giving the winning record (None for a plain
    value)."""
    rejected: Counter[str] = Counter()
    best: tuple[Record, bytes] | None = None
    plain: Value | None = None
    for value in values:
        try:
            record = open_value(key, value, now, max_ttl)
        except RecordError as exc:
            rejected[exc.reason] += 1
            continue
        if record is None:
            if type(value) not in (str, bytes, int, float, bool):
                rejected["bad_value"] += 1
            elif plain is None:
                plain = value  # type: ignore[assignment]
            else:
                rejected["unsigned"] += 1
            continue
        assert isinstance(value, bytes)
        if best is None or _beats(record, value, best):
            best = (record, value)
    if best is not None:
        if plain is not None:
            rejected["unsigned"] += 1
        return best[0], best[1], rejected
    if plain is not None and not allow_unsigned:
        rejected["unsigned"] += 1
        plain = None
    return None, plain, rejected


def _beats(record: Record, value: bytes, best: tuple[Record, bytes]) -> bool:
    other, _ = best
    if isinstance(record, ImmutableRecord) or isinstance(other, ImmutableRecord):
        return False  # under one key, every valid immutable record is the same bytes
    if record.seq != other.seq:
        return record.seq > other.seq
    return record.signature < other.signature


def pick_best(
    key: bytes,
    values: Iterable[object],
    now: float,
    max_ttl: float,
    *,
    allow_unsigned: bool = True,
) -> tuple[Value | None, Counter[str]]:
    """The value a lookup should return from the ``values`` holders sent for
    ``key``, and the rejected ones counted by reason.

    Each is verified. The valid mutable record with the highest seq wins (equal
    seqs: the lowest signature, so every node picks the same); a valid immutable
    record wins. A plain (unsigned) value is returned only when no signed record
    was found and ``allow_unsigned``: a caller that asked for a record address
    passes False, since there only a signed record is an answer. Unsigned values
    passed over are counted as ``unsigned``."""
    _, value, rejected = best_record(key, values, now, max_ttl, allow_unsigned=allow_unsigned)
    return value, rejected
