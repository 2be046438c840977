"""How find_providers merges the holders' answers (pure: merge_provider_answers)."""

from __future__ import annotations

import os

from p2pnode.dht import records as rec
from p2pnode.dht.discovery import merge_provider_answers
from p2pnode.identity import Identity

KEY = os.urandom(20)
EXPIRES = 2_000_000_000


def record(
    who: Identity, host: str, seq: int, relays: tuple[tuple[str, int, bytes], ...] = ()
) -> rec.ProviderRecord:
    return rec.sign_provider_record(who, KEY, [(host, 4001)], seq, EXPIRES, relays)


def test_the_newest_copy_gives_the_address_whoever_holds_it() -> None:
    """The closest holder replays the provider's old record (an address it left);
    a farther holder has its newer one: the newer address wins (found in review:
    the first copy met won, so a replayed old record could send us to a dead
    address, or to a victim's)."""
    provider = Identity.generate()
    old = record(provider, "192.0.2.1", seq=1)
    new = record(provider, "192.0.2.2", seq=5)
    (found,) = merge_provider_answers([], [[old], [new]], want=20)
    assert (found.node_id, found.host) == (provider.node_id, "192.0.2.2")
    (found,) = merge_provider_answers([], [[new], [old]], want=20)
    assert found.host == "192.0.2.2"


def test_one_record_per_holder_in_turn_and_relays_from_every_copy() -> None:
    a, b, c, relay = (Identity.generate() for _ in range(4))
    hop = ("198.51.100.7", 4001, relay.node_id)
    flood = [record(Identity.generate(), "203.0.113.9", 1) for _ in range(5)]
    found = merge_provider_answers(
        [record(a, "192.0.2.10", 3)],
        [
            [*flood, record(b, "192.0.2.11", 1)],
            [record(b, "192.0.2.11", 1, (hop,)), record(c, "192.0.2.12", 2)],
        ],
        want=3,
    )
    ids = [p.node_id for p in found]
    assert ids[0] == a.node_id and len(ids) == 3
    assert b.node_id in ids  # the second holder's turn came before the flood's second
    assert {p.node_id: p.relays for p in found}[b.node_id] == (hop,)


def test_relays_of_an_older_copy_stay_beside_the_newest_address() -> None:
    """The relay's own copy is the newest and leaves the relay out; ours, older,
    names it: the relay stays (the lab caught a first version that lost it)."""
    provider, relay = Identity.generate(), Identity.generate()
    hop = ("198.51.100.7", 4001, relay.node_id)
    ours = record(provider, "192.0.2.1", seq=1, relays=(hop,))
    relays_copy = record(provider, "192.0.2.1", seq=2)
    (found,) = merge_provider_answers([ours], [[relays_copy]], want=20)
    assert found.relays == (hop,)
