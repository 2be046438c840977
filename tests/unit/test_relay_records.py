"""Relay addresses in signed provider records: [relay host, relay port, relay id]
after the direct addresses, at most 2, covered by the signature."""

from __future__ import annotations

import pytest

from p2pnode.dht.records import (
    RecordError,
    parse_provider_record,
    sign_provider_record,
    verify_provider_record,
)
from p2pnode.identity import Identity

KEY = bytes(range(20))
R1 = ("203.0.113.5", 4001, b"\x01" * 20)
R2 = ("2001:db8::5", 4002, b"\x02" * 20)
NOW = 1_000_000.0


def test_relay_addresses_round_trip_and_are_signed() -> None:
    me = Identity.generate()
    record = sign_provider_record(me, KEY, [("198.51.100.7", 4000)], 1, int(NOW) + 600, [R1, R2])
    assert record.addrs == (("198.51.100.7", 4000),)
    assert record.relays == (R1, R2)
    wire = record.to_wire()
    assert wire[2] == [["198.51.100.7", 4000], list(R1), list(R2)]
    parsed = parse_provider_record(KEY, wire)
    assert parsed == record
    verify_provider_record(parsed, NOW, 3600)
    # a relay swapped for another after signing: the signature no longer holds
    forged = list(wire)
    forged[2] = [["198.51.100.7", 4000], ["192.0.2.66", 4001, b"\x01" * 20]]
    with pytest.raises(RecordError) as bad:
        verify_provider_record(parse_provider_record(KEY, forged), NOW, 3600)
    assert bad.value.reason == "bad_signature"


def test_a_record_without_relays_signs_the_same_bytes_as_before() -> None:
    me = Identity.generate()
    plain = sign_provider_record(me, KEY, [("198.51.100.7", 4000)], 1, int(NOW) + 600)
    assert plain.relays == ()
    assert plain.to_wire()[2] == [["198.51.100.7", 4000]]


@pytest.mark.parametrize(
    "addrs",
    [
        [list(R1)],  # no direct address
        [list(R1), ["198.51.100.7", 4000]],  # a direct address after a relay
        [["198.51.100.7", 4000], list(R1), list(R2), ["203.0.113.9", 4003, b"\x03" * 20]],
        [["198.51.100.7", 4000], ["203.0.113.5", 4001, b"\x01" * 19]],  # short id
        [["198.51.100.7", 4000], ["203.0.113.5", 4001, "not bytes"]],
        [["198.51.100.7", 4000], list(R1), list(R1)],  # duplicate
        [["198.51.100.7", 4000], ["203.0.113.5", 0, b"\x01" * 20]],  # port 0
        [["198.51.100.7", 4000], ["relay.example", 4001, b"\x01" * 20]],
    ],
)
def test_bad_relay_addresses_are_refused(addrs: list[list[object]]) -> None:
    me = Identity.generate()
    good = sign_provider_record(me, KEY, [("198.51.100.7", 4000)], 1, int(NOW) + 600)
    wire = good.to_wire()
    wire[2] = addrs
    with pytest.raises(RecordError) as bad:
        parse_provider_record(KEY, wire)
    assert bad.value.reason == "bad_record"
