"""Signed DHT records: provider records, mutable / immutable envelopes, addresses and
picking the best of several answers; every hostile variant is refused by reason."""

from __future__ import annotations

import dataclasses
import hashlib

import msgpack
import pytest

from p2pnode.dht import records as rec
from p2pnode.dht.records import (
    ENVELOPE_OVERHEAD,
    MAX_ENVELOPE_BYTES,
    MAX_SEQ,
    RECORD_MAGIC,
    ImmutableRecord,
    MutableRecord,
    RecordError,
    immutable_key,
    mutable_key,
    open_value,
    parse_address,
    parse_provider_record,
    pick_best,
    record_address,
    sign_mutable,
    sign_provider_record,
    to_value,
    verify_provider_record,
)
from p2pnode.identity import Identity, peer_id_to_str

NOW = 1_700_000_000
TTL = 3600.0
ALICE = Identity.generate()
MALLORY = Identity.generate()
KEY = hashlib.sha1(b"some resource").digest()
OTHER_KEY = hashlib.sha1(b"another resource").digest()


def provider(**kw: object) -> rec.ProviderRecord:
    args: dict[str, object] = {
        "identity": ALICE,
        "key": KEY,
        "addrs": [("127.0.0.1", 4001)],
        "seq": 1,
        "expires": NOW + 600,
    }
    args.update(kw)
    return sign_provider_record(**args)  # type: ignore[arg-type]


def reason(exc: pytest.ExceptionInfo[RecordError]) -> str:
    return exc.value.reason


# -- provider records ----------------------------------------------------------------------


def test_provider_record_round_trips_and_verifies() -> None:
    record = provider(addrs=[("::ffff:10.0.0.1", 4001), ("2001:db8::1", 9)])
    assert record.addrs == (("10.0.0.1", 4001), ("2001:db8::1", 9))  # normalized
    assert record.peer_id == ALICE.node_id and record.public_key == ALICE.public_key
    wire = record.to_wire()
    assert wire == [
        ALICE.node_id,
        ALICE.public_key,
        [["10.0.0.1", 4001], ["2001:db8::1", 9]],
        1,
        NOW + 600,
        record.signature,
    ]
    # Through msgpack, as the wire carries it.
    decoded = msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False)
    parsed = parse_provider_record(KEY, decoded)
    assert parsed == record
    verify_provider_record(parsed, NOW, TTL)


def test_provider_record_bound_to_its_key_and_signer() -> None:
    record = provider()
    with pytest.raises(RecordError) as exc:  # replayed under another key
        verify_provider_record(parse_provider_record(OTHER_KEY, record.to_wire()), NOW, TTL)
    assert reason(exc) == "bad_signature"
    # Another key's peer id with our key and signature: the id is not the key's hash.
    with pytest.raises(RecordError) as exc:
        verify_provider_record(dataclasses.replace(record, peer_id=MALLORY.node_id), NOW, TTL)
    assert reason(exc) == "id_mismatch"
    # Mallory's key and id with Alice's signature.
    forged = dataclasses.replace(record, peer_id=MALLORY.node_id, public_key=MALLORY.public_key)
    with pytest.raises(RecordError) as exc:
        verify_provider_record(forged, NOW, TTL)
    assert reason(exc) == "bad_signature"
    for field, value in (("addrs", (("127.0.0.2", 4001),)), ("seq", 2), ("expires", NOW + 601)):
        with pytest.raises(RecordError) as exc:
            verify_provider_record(dataclasses.replace(record, **{field: value}), NOW, TTL)
        assert reason(exc) == "bad_signature", field


def test_provider_record_every_flipped_signature_bit_is_refused() -> None:
    record = provider()
    for i in range(64 * 8):
        sig = bytearray(record.signature)
        sig[i // 8] ^= 1 << (i % 8)
        with pytest.raises(RecordError) as exc:
            verify_provider_record(dataclasses.replace(record, signature=bytes(sig)), NOW, TTL)
        assert reason(exc) == "bad_signature"


def test_provider_record_lifetime() -> None:
    with pytest.raises(RecordError) as exc:
        verify_provider_record(provider(expires=NOW), NOW, TTL)
    assert reason(exc) == "expired"
    verify_provider_record(provider(expires=NOW + int(TTL) + 60), NOW, TTL)  # clock slack
    with pytest.raises(RecordError) as exc:
        verify_provider_record(provider(expires=NOW + int(TTL) + 61), NOW, TTL)
    assert reason(exc) == "too_far_future"
    with pytest.raises(RecordError) as exc:
        verify_provider_record(provider(expires=MAX_SEQ), NOW, TTL)
    assert reason(exc) == "too_far_future"


BAD_AT_POSITION: list[list[object]] = [
    # peer id
    [None, b"", b"x" * 19, b"x" * 21, "x" * 20, 5, [b"x" * 20]],
    # public key
    [None, b"k" * 31, b"k" * 33, "k" * 32, 0, True],
    # addresses
    [
        None,
        [],
        [["127.0.0.1", 1]] * 2,
        [[f"127.0.0.{i}", 1] for i in range(1, 6)],
        ["127.0.0.1", 1],
        [["127.0.0.1"]],
        [["127.0.0.1", 1, 2]],
        [[b"127.0.0.1", 1]],
        [["localhost", 1]],
        [["::ffff:127.0.0.1", 1]],
        [["0.0.0.0", 1]],
        [["127.0.0.1", 0]],
        [["127.0.0.1", 65536]],
        [["127.0.0.1", True]],
        [["127.0.0.1", "1"]],
        [["127.0.0.1", 1.0]],
        {"127.0.0.1": 1},
        "127.0.0.1",
    ],
    # seq
    [None, -1, 2**63, 2**64 - 1, True, 1.0, "1", b"\x01"],
    # expires
    [None, -1, 2**63, False, float(NOW + 600), str(NOW + 600)],
    # signature
    [None, b"s" * 63, b"s" * 65, "s" * 64, 0],
]


def test_provider_record_wrong_types_at_every_position() -> None:
    wire = provider().to_wire()
    for position, bad_values in enumerate(BAD_AT_POSITION):
        for bad in bad_values:
            hostile = list(wire)
            hostile[position] = bad
            with pytest.raises(RecordError) as exc:
                parse_provider_record(KEY, hostile)
            assert reason(exc) == "bad_record", (position, bad)
    for hostile_wire in (None, b"", {}, wire[:5], [*wire, 0], tuple(wire[:5]), "x"):
        with pytest.raises(RecordError) as exc:
            parse_provider_record(KEY, hostile_wire)
        assert reason(exc) == "bad_record"
    for bad_key in (b"", b"k" * 21, "k" * 20, None):
        with pytest.raises(RecordError):
            parse_provider_record(bad_key, wire)  # type: ignore[arg-type]


def test_provider_record_names_its_hosts() -> None:
    record = provider(addrs=[("10.0.0.1", 1), ("2001:db8::1", 2)])
    assert rec.names_host(record, "10.0.0.1") and rec.names_host(record, "::ffff:10.0.0.1")
    assert rec.names_host(record, "2001:db8:0::1")
    assert not rec.names_host(record, "10.0.0.2") and not rec.names_host(record, "nonsense")


def test_provider_record_huge_seq_is_accepted_up_to_the_bound() -> None:
    record = provider(seq=MAX_SEQ)
    verify_provider_record(parse_provider_record(KEY, record.to_wire()), NOW, TTL)
    with pytest.raises(RecordError):
        provider(seq=MAX_SEQ + 1)
    with pytest.raises(RecordError):
        provider(addrs=[("not an ip", 1)])
    with pytest.raises(RecordError):
        provider(addrs=[])


# -- mutable and immutable records ----------------------------------------------------------


def mutable(name: str = "greeting", value: object = "hello", seq: int = 1, **kw: object) -> bytes:
    identity = kw.pop("identity", ALICE)
    expires = kw.pop("expires", NOW + 600)
    return to_value(sign_mutable(identity, name, value, seq, expires))  # type: ignore[arg-type]


def test_mutable_record_round_trips() -> None:
    for value in ("hello", b"\x00bytes", 0, -(2**63), 2**64 - 1, 1.5, True, False, "é" * 100):
        record = sign_mutable(ALICE, "greeting", value, 7, NOW + 600)
        assert record.key == mutable_key(ALICE.node_id, "greeting")
        opened = open_value(record.key, to_value(record), NOW, TTL)
        assert opened == record
        assert isinstance(opened, MutableRecord)
        assert type(opened.value) is type(value)
    assert mutable_key(ALICE.node_id, "a") != mutable_key(ALICE.node_id, "b")
    assert mutable_key(ALICE.node_id, "a") != mutable_key(MALLORY.node_id, "a")


def test_mutable_record_refused_by_reason() -> None:
    key = mutable_key(ALICE.node_id, "greeting")
    value = mutable()
    cases = {
        "wrong_key": (mutable_key(ALICE.node_id, "other"), value),
        "expired": (key, mutable(expires=NOW)),
        "too_far_future": (key, mutable(expires=NOW + int(TTL) + 61)),
    }
    for expected, (k, v) in cases.items():
        with pytest.raises(RecordError) as exc:
            open_value(k, v, NOW, TTL)
        assert reason(exc) == expected
    # Mallory's own record under Alice's key: the key is not Mallory's name.
    with pytest.raises(RecordError) as exc:
        open_value(key, mutable(identity=MALLORY), NOW, TTL)
    assert reason(exc) == "wrong_key"
    # Alice's record with Mallory's value and Alice's signature.
    body = msgpack.unpackb(value[5:], raw=False)
    body[3] = "pwned"
    forged = value[:5] + msgpack.packb(body, use_bin_type=True)
    with pytest.raises(RecordError) as exc:
        open_value(key, forged, NOW, TTL)
    assert reason(exc) == "bad_signature"
    # A provider record's signature never passes for a mutable record (domain tags).
    body = msgpack.unpackb(value[5:], raw=False)
    body[6] = provider(key=key).signature
    with pytest.raises(RecordError) as exc:
        open_value(key, value[:5] + msgpack.packb(body, use_bin_type=True), NOW, TTL)
    assert reason(exc) == "bad_signature"


def test_mutable_record_every_flipped_byte_is_refused() -> None:
    key = mutable_key(ALICE.node_id, "greeting")
    value = mutable()
    for i in range(len(value)):
        hostile = bytearray(value)
        hostile[i] ^= 0x01
        try:
            opened = open_value(key, bytes(hostile), NOW, TTL)
        except RecordError:
            continue
        assert opened is None and i < len(RECORD_MAGIC)  # no magic: a plain value


def test_envelope_truncated_at_every_byte() -> None:
    for value, key in (
        (mutable(), mutable_key(ALICE.node_id, "greeting")),
        (to_value(ImmutableRecord(b"data")), immutable_key(ImmutableRecord(b"data"))),
    ):
        for cut in range(len(value)):
            if cut < len(RECORD_MAGIC):
                assert open_value(key, value[:cut], NOW, TTL) is None
                continue
            with pytest.raises(RecordError) as exc:
                open_value(key, value[:cut], NOW, TTL)
            assert reason(exc) == "bad_record", cut
        with pytest.raises(RecordError) as exc:
            open_value(key, value + b"\x00", NOW, TTL)  # trailing bytes
        assert reason(exc) == "bad_record"


def test_envelope_structure_is_strict() -> None:
    key = mutable_key(ALICE.node_id, "greeting")
    value = mutable()
    body = msgpack.unpackb(value[5:], raw=False)
    hostile_bodies: list[object] = [
        [],
        {},
        [3, b"x"],
        [1],
        [*body, 0],
        body[:6],
        ["1", *body[1:]],
        [True, *body[1:]],
    ]
    for position, bad in (
        (1, b"k" * 31),
        (1, "k" * 32),
        (2, ""),
        (2, "a/b"),
        (2, "x" * 65),
        (2, "new\nline"),
        (2, b"greeting"),
        (3, None),
        (3, [1]),
        (3, {"a": 1}),
        (4, -1),
        (4, 2**63),
        (4, True),
        (5, 1.5),
        (5, None),
        (6, b"s" * 63),
        (6, "s" * 64),
    ):
        hostile = list(body)
        hostile[position] = bad
        hostile_bodies.append(hostile)
    for hostile_body in hostile_bodies:
        try:
            packed = msgpack.packb(hostile_body, use_bin_type=True)
        except (TypeError, ValueError):
            continue
        with pytest.raises(RecordError) as exc:
            open_value(key, value[:5] + packed, NOW, TTL)
        assert reason(exc) == "bad_record", hostile_body
    # Another version, and a non-canonical encoding of the same record (seq as uint64).
    with pytest.raises(RecordError):
        open_value(key, RECORD_MAGIC + b"\x02" + value[5:], NOW, TTL)
    seq_at = value.index(b"\x01\xce")  # seq 1, then expires as uint32
    long_seq = value[:seq_at] + b"\xcf" + (1).to_bytes(8, "big") + value[seq_at + 1 :]
    with pytest.raises(RecordError) as exc:
        open_value(key, long_seq, NOW, TTL)
    assert reason(exc) == "bad_record"
    # Not envelopes: plain values of other types and bytes without the magic.
    for plain in ("\xfap2p", b"p2p", 5, b"", "hello"):
        assert open_value(key, plain, NOW, TTL) is None


def test_sign_mutable_refuses_bad_arguments() -> None:
    for name in ("", "x" * 65, "a/b", "tab\there"):
        with pytest.raises(RecordError):
            sign_mutable(ALICE, name, "v", 1, NOW + 60)
    for value in (None, [1], 2**64, -(2**63) - 1, "\ud800", bytearray(b"x")):
        with pytest.raises(RecordError):
            sign_mutable(ALICE, "n", value, 1, NOW + 60)  # type: ignore[arg-type]
    for seq in (-1, 2**63, True):
        with pytest.raises(RecordError):
            sign_mutable(ALICE, "n", "v", seq, NOW + 60)
    with pytest.raises(RecordError):  # does not fit in a DHT value
        sign_mutable(ALICE, "n", b"x" * 4000, 1, NOW + 60)


def test_envelope_overhead_leaves_room_for_three_and_a_half_kib() -> None:
    value = b"x" * 3584
    small = to_value(sign_mutable(ALICE, "greeting", value, 1, NOW + 600))
    assert len(small) - len(value) == 117 + len("greeting")
    worst = to_value(sign_mutable(ALICE, "é" * 64, value, MAX_SEQ, MAX_SEQ))
    assert len(worst) - len(value) == ENVELOPE_OVERHEAD + len(("é" * 64).encode())
    assert len(worst) <= MAX_ENVELOPE_BYTES
    assert len(to_value(ImmutableRecord(value))) - len(value) == 10


def test_immutable_record_is_keyed_by_its_hash() -> None:
    for value in (b"data", "text", 5, 2.5, True):
        record = ImmutableRecord(value)
        envelope = to_value(record)
        assert immutable_key(record) == hashlib.sha256(envelope).digest()[:20]
        assert open_value(immutable_key(record), envelope, NOW, TTL) == record
    record = ImmutableRecord(b"data")
    with pytest.raises(RecordError) as exc:
        open_value(immutable_key(ImmutableRecord(b"datb")), to_value(record), NOW, TTL)
    assert reason(exc) == "wrong_key"
    # A mutable record under an immutable key, and the reverse, are under the wrong key.
    value = mutable()
    with pytest.raises(RecordError) as exc:
        open_value(immutable_key(record), value, NOW, TTL)
    assert reason(exc) == "wrong_key"
    with pytest.raises(RecordError) as exc:
        open_value(mutable_key(ALICE.node_id, "greeting"), to_value(record), NOW, TTL)
    assert reason(exc) == "wrong_key"
    assert immutable_key(ImmutableRecord(1)) != immutable_key(ImmutableRecord(True))


# -- addresses --------------------------------------------------------------------------------


def test_addresses_round_trip() -> None:
    record = sign_mutable(ALICE, "greeting", "hello", 1, NOW + 600)
    address = record_address(record)
    assert address == f"{peer_id_to_str(ALICE.node_id)}/greeting"
    assert parse_address(address) == (record.key, "mutable")
    assert parse_address(address.upper().replace("/GREETING", "/greeting")) == (
        record.key,
        "mutable",
    )
    immutable = ImmutableRecord(b"data")
    address = record_address(immutable)
    assert address == "imm:" + immutable_key(immutable).hex()
    assert parse_address(address) == (immutable_key(immutable), "immutable")


def test_bad_addresses_are_refused_with_a_reason() -> None:
    peer = peer_id_to_str(ALICE.node_id)
    for text in (
        "greeting",  # a plain name: the caller falls back to the unauthenticated get
        "",
        "imm:",
        "imm:" + "ab" * 19,
        "imm:" + "ab" * 21,
        "imm:" + "zz" * 20,
        "notapeer/name",
        peer[:-1] + "/name",
        f"{peer}/",
        f"{peer}/a/b",
        f"{peer}/" + "x" * 65,
        "/name",
    ):
        with pytest.raises(RecordError) as exc:
            parse_address(text)
        assert reason(exc) == "bad_address", text
        assert str(exc.value)


# -- the best of several answers ----------------------------------------------------------------


def test_pick_best_highest_valid_seq_wins() -> None:
    key = mutable_key(ALICE.node_id, "greeting")
    values = [
        mutable(value="one", seq=1),
        mutable(value="three", seq=3),
        mutable(value="two", seq=2),
        mutable(identity=MALLORY, seq=99),  # another publisher's name
        mutable(value="old", seq=50, expires=NOW - 1),  # expired
        b"plain",
        "plain text",
    ]
    best, rejected = pick_best(key, values, NOW, TTL)
    assert best == values[1]
    assert rejected == {"wrong_key": 1, "expired": 1, "unsigned": 2}
    # A forged higher seq (signature of another record) is counted, not chosen.
    body = msgpack.unpackb(values[1][5:], raw=False)
    body[4] = 1000
    forged = values[1][:5] + msgpack.packb(body, use_bin_type=True)
    best, rejected = pick_best(key, [forged, values[0]], NOW, TTL)
    assert best == values[0] and rejected == {"bad_signature": 1}


def test_pick_best_ties_are_deterministic() -> None:
    key = mutable_key(ALICE.node_id, "greeting")
    a, b = mutable(value="a", seq=5), mutable(value="b", seq=5)
    first, _ = pick_best(key, [a, b], NOW, TTL)
    second, _ = pick_best(key, [b, a], NOW, TTL)
    assert first == second
    signature = open_value(key, first, NOW, TTL).signature  # type: ignore[union-attr]
    assert signature == min(
        open_value(key, v, NOW, TTL).signature  # type: ignore[union-attr]
        for v in (a, b)
    )


def test_pick_best_unsigned_only_when_allowed_and_nothing_signed() -> None:
    key = hashlib.sha1(b"greeting").digest()
    assert pick_best(key, ["plain", "other"], NOW, TTL) == ("plain", {"unsigned": 1})
    best, rejected = pick_best(key, ["plain"], NOW, TTL, allow_unsigned=False)
    assert best is None and rejected == {"unsigned": 1}
    assert pick_best(key, [], NOW, TTL) == (None, {})
    best, rejected = pick_best(key, [None, [1]], NOW, TTL)
    assert best is None and rejected == {"bad_value": 2}
    immutable = ImmutableRecord(b"data")
    ikey = immutable_key(immutable)
    best, rejected = pick_best(ikey, ["plain", to_value(immutable), b"\xfap2p\x01"], NOW, TTL)
    assert best == to_value(immutable) and rejected == {"unsigned": 1, "bad_record": 1}
    record, value, _ = rec.best_record(ikey, [to_value(immutable)], NOW, TTL)
    assert record == immutable and value == to_value(immutable)
