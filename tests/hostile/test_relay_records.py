"""Relay addresses in provider records cannot send dialers to a victim: a holder
keeps a record with relay addresses only when each names a relay it has proven
(a contact with that id, at that address, that proved its id)."""

from __future__ import annotations

import os

from p2pnode.dht.records import sign_provider_record
from tests.unit.test_dht_core import Net, ident, kid


def test_holders_refuse_relay_addresses_that_name_no_proven_relay() -> None:
    net = Net()
    a, b, relay = net.add(1), net.add(2), net.add(3)
    victim = ("10.0.9.1", 4009)  # no node there
    core_b = net.cores[b]
    net.answered(b, relay, "ping")  # b has proven the relay
    assert core_b.table.is_proven(net.id_of(relay))
    net.answered(a, b, "ping")
    key = kid(80)
    expires = int(net.clock.now()) + 3600

    def announce(relays: list[tuple[str, int, bytes]], seq: int) -> object:
        record = sign_provider_record(ident(1), key, [(a[0], 7001)], seq, expires, relays)
        return net.answered(a, b, "add_provider", key, record.to_wire(), net.token(a, b))

    # A made-up relay at the victim's address; the real relay's id at the victim's
    # address; the real relay's address with another id.
    assert announce([(victim[0], victim[1], os.urandom(20))], 1) is False
    assert announce([(victim[0], victim[1], net.id_of(relay))], 2) is False
    assert announce([(relay[0], relay[1], os.urandom(20))], 3) is False
    assert core_b.stats["providers_refused_unproven_relay"] == 3
    assert core_b.providers.get_records(key, 10, net.clock.now()) == []
    # The proven relay: kept, and handed out with the record.
    assert announce([(relay[0], relay[1], net.id_of(relay))], 4) is True
    (kept,) = core_b.providers.get_records(key, 10, net.clock.now())
    assert kept.relays == ((relay[0], relay[1], net.id_of(relay)),)
