"""DHT client mode on DhtCore alone (the in-memory Net of test_dht_core): a node
that is not reachable says "client" in its signed identify answer, is kept out of
(and removed from) routing tables, answers no lookups or stores for others, and
still makes its own calls; the dial_back probe is reported, never answered."""

from __future__ import annotations

from p2pnode.dht import codec, proof
from p2pnode.dht.core import AddressObserved, CallFailed, DialBackReceived, dial_back_datagram
from p2pnode.dht.rpc_schema import IdentifyAnswer
from tests.unit.test_dht_core import Net, ident, kid


def test_a_client_is_kept_out_of_a_servers_table_and_leaves_it_when_it_switches() -> None:
    net = Net()
    server, client = net.add(1), net.add(2)
    net.cores[client].set_client_mode(True)
    # the client asks; the server verifies it (ping: an unproven contact for one
    # round trip), then proves it (identify: client) and removes it
    net.answered(client, server, "find_node", kid(1))
    net.run(0.5)
    assert not net.knows(server, client)
    assert net.cores[server].stats["clients_refused"] == 1
    assert net.cores[server].stats["clients_removed"] == 1
    # more requests within CLIENT_RECHECK: not even pinged into the table again
    net.answered(client, server, "find_node", kid(2))
    net.run(0.5)
    assert not net.knows(server, client)
    assert net.cores[server].stats["clients_removed"] == 1
    # the client still has the server in its own table, and gets its own answers
    assert net.knows(client, server)
    # a server-mode node enters (after its mode is rechecked), then switches to client:
    net.cores[client].set_client_mode(False)
    net.clock.advance(200)
    net.answered(client, server, "find_node", kid(1))
    net.run(0.5)
    assert net.knows(server, client)
    assert net.cores[server].table.is_proven(net.id_of(client))
    net.cores[client].set_client_mode(True)
    net.clock.advance(20)
    # a plain identify request (a node proving the server) changes nothing ...
    net.answered(client, server, "identify")
    net.run(0.5)
    assert net.knows(server, client)
    # ... its re-announcement, one that says "client", makes the server prove it again
    answer = net.answered(client, server, "identify", "client")
    assert isinstance(answer, IdentifyAnswer) and answer.server
    net.run(0.5)
    assert not net.knows(server, client)
    assert net.cores[server].stats["clients_removed"] == 2
    # back to server mode: its re-announcement ends the recheck delay at once
    net.cores[client].set_client_mode(False)
    net.answered(client, server, "identify", "server")
    net.run(0.5)
    assert net.cores[server].table.is_proven(net.id_of(client))


def test_a_client_answers_no_lookups_or_stores_but_answers_ping_and_identify() -> None:
    net = Net()
    asker, client = net.add(1), net.add(2)
    net.cores[client].set_client_mode(True)
    for rpc, args in (
        ("find_node", (kid(1),)),
        ("find_value", (kid(1),)),
        ("get_providers", (kid(1),)),
    ):
        event = net.call(asker, client, rpc, *args, node_id=net.id_of(client))
        assert isinstance(event, CallFailed), (rpc, event)
    assert net.cores[client].stats["client_mode_unanswered"] == 3
    assert net.answered(asker, client, "ping") == net.id_of(client)
    answer = net.answered(asker, client, "identify")
    assert isinstance(answer, IdentifyAnswer) and answer.mode == "client"


def test_a_forged_mode_does_not_verify() -> None:
    """The mode is signed: a "server" signature cannot be passed off as "client"
    (nor the reverse), nor a v1 proof as either."""
    me, them, challenge = ident(1), ident(2), b"c" * 16
    signature = proof.prove(them, me.node_id, challenge, "server")
    key = them.public_key
    assert proof.check_proof(them.node_id, me.node_id, challenge, key, signature, "server")
    assert not proof.check_proof(them.node_id, me.node_id, challenge, key, signature, "client")
    v1 = proof.prove(them, me.node_id, challenge)
    assert not proof.check_proof(them.node_id, me.node_id, challenge, key, v1, "server")


def test_identify_reports_the_observed_address() -> None:
    net = Net()
    a, b = net.add(1), net.add(2)
    net.answered(a, b, "identify")
    observed = [e for e in net.events[a] if isinstance(e, AddressObserved)]
    assert observed == [AddressObserved(net.id_of(b), b[0], a[0])]


def test_dial_back_is_reported_and_never_answered() -> None:
    net = Net()
    a = net.add(1)
    core = net.cores[a]
    core.receive_datagram(dial_back_datagram(b"m" * 20, b"n" * 16), ("10.9.9.9", 5555), 0.0)
    assert core.datagrams_to_send() == []
    assert [e for e in core.events() if isinstance(e, DialBackReceived)] == [
        DialBackReceived(b"n" * 16, "10.9.9.9", 5555)
    ]
    # a bad nonce is dropped and counted
    bad = codec.encode_request(b"m" * 20, "dial_back", (b"short",))
    core.receive_datagram(bad, ("10.9.9.9", 5555), 0.0)
    assert core.stats["dropped.bad_args"] == 1
    assert core.stats["dial_backs_received"] == 1


def test_a_client_asked_to_serve_tells_the_asker_it_is_a_client() -> None:
    """A node that holds us though we re-announced to others (our table lacked
    it) learns it when it asks us: we answer nothing and say "client"."""
    net = Net()
    server, node = net.add(1), net.add(2)
    net.answered(node, server, "find_node", kid(1))
    net.run(0.5)
    assert net.cores[server].table.is_proven(net.id_of(node))
    net.cores[node].set_client_mode(True)  # no re-announcement reached the server
    event = net.call(server, node, "find_node", kid(3), node_id=net.id_of(node))
    assert isinstance(event, CallFailed)
    net.run(0.5)
    assert not net.knows(server, node)
    assert net.cores[node].stats["client_hints_sent"] == 1


def test_a_hint_reproves_a_node_proven_before_even_outside_the_table() -> None:
    """A proof says "server" and stays cached; a node kept out by the subnet caps
    could later enter on it. Its "client" hint drops that stale verdict."""
    net = Net()
    server, node = net.add(1), net.add(2)
    net.answered(node, server, "find_node", kid(1))
    net.run(0.5)
    core = net.cores[server]
    known = core.table.node_for(net.id_of(node))
    assert known is not None
    core.table.remove_contact(known)  # as if the table had no room for it
    net.cores[node].set_client_mode(True)
    net.answered(node, server, "identify", "client")
    net.run(0.5)
    assert core.stats["clients_refused"] == 1
    net.answered(node, server, "find_node", kid(2))  # it asks again: stays out
    net.run(0.5)
    assert not net.knows(server, node)
