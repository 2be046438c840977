"""The hole-punching state machines (p2pnode/nat/holepunch_core.py): pure,
time passed in; messages in any order, timeouts, bad addresses, budgets."""

from __future__ import annotations

import msgpack  # type: ignore[import-untyped]
import pytest

from p2pnode.errors import LimitExceeded, MessageDecodeError, ProtocolError
from p2pnode.nat.holepunch_core import (
    Action,
    Finished,
    HolePunchConfig,
    InitiatorState,
    Open,
    PunchBudget,
    PunchInitiator,
    PunchResponder,
    SendConnect,
    SendSync,
    plan,
    usable_targets,
)
from p2pnode.nat.holepunch_messages import (
    PunchConnect,
    PunchConnectReply,
    PunchSync,
    PunchSyncAck,
    pack_addr,
    unpack_addr,
)
from p2pnode.wire.messages import decode_envelope, encode_envelope_bytes, request, response

CONFIG = HolePunchConfig(attempts=3, reply_timeout=5.0, retry_delay=0.5, sync_timeout=10.0)
A_OWN = [("203.0.113.3", 4001)]
B_OWN = [("203.0.113.4", 4002)]
B_PACKED = (pack_addr("203.0.113.4", 4002),)


def initiator(public: bool = False) -> PunchInitiator:
    return PunchInitiator(CONFIG, A_OWN, public)


def responder(public: bool = False) -> PunchResponder:
    return PunchResponder(CONFIG, B_OWN, public)


# -- who opens, who is the Noise initiator ---------------------------------------


@pytest.mark.parametrize(
    ("dialed_relay", "self_public", "peer_public", "expected"),
    [
        (True, False, False, (Action.SIMULTANEOUS, True)),
        (False, False, False, (Action.SIMULTANEOUS, False)),
        (True, True, False, (Action.AWAIT, False)),
        (False, False, True, (Action.CONNECT, True)),
        (False, True, False, (Action.AWAIT, False)),
        (True, False, True, (Action.CONNECT, True)),
        (True, True, True, (Action.CONNECT, True)),
        (False, True, True, (Action.AWAIT, False)),
    ],
)
def test_plan(
    dialed_relay: bool, self_public: bool, peer_public: bool, expected: tuple[Action, bool]
) -> None:
    assert plan(dialed_relay, self_public, peer_public) == expected
    # the two sides always agree: exactly one Noise initiator, never two waiting
    mine = plan(dialed_relay, self_public, peer_public)
    theirs = plan(not dialed_relay, peer_public, self_public)
    assert mine[1] != theirs[1]
    assert Action.AWAIT not in (mine[0], theirs[0]) or {mine[0], theirs[0]} == {
        Action.AWAIT,
        Action.CONNECT,
    }


# -- the addresses a peer gives us ----------------------------------------------------


def test_addresses_that_parse_and_are_fit_are_kept_in_order() -> None:
    packed = [pack_addr("8.8.4.4", 4000), pack_addr("203.0.113.9", 5000)]
    targets, rejected = usable_targets(packed, A_OWN, 4)
    assert targets == [("8.8.4.4", 4000), ("203.0.113.9", 5000)] and not rejected


@pytest.mark.parametrize(
    ("host", "port", "why"),
    [
        ("203.0.113.9", 0, "bad_port"),
        ("0.0.0.0", 4000, "bad_ip"),
        ("224.0.0.1", 4000, "bad_ip"),
        ("255.255.255.255", 4000, "bad_ip"),
        ("240.0.0.1", 4000, "bad_ip"),
        ("ff02::1", 4000, "bad_ip"),
        ("127.0.0.1", 4000, "loopback"),
        ("::1", 4000, "loopback"),
        ("169.254.1.1", 4000, "link_local"),
        ("fe80::1", 4000, "link_local"),
        ("10.0.0.5", 22, "not_global"),  # someone's LAN: not ours
        ("192.168.1.1", 80, "not_global"),
        ("100.64.7.7", 4000, "not_global"),  # shared (carrier NAT) space, not our /16
        ("203.0.113.3", 4001, "ours"),
    ],
)
def test_a_peer_cannot_aim_us_at_unfit_addresses(host: str, port: int, why: str) -> None:
    targets, rejected = usable_targets([pack_addr(host, port)], A_OWN, 4)
    assert targets == [] and rejected == {why: 1}


def test_global_addresses_pass_and_local_ones_only_where_we_are() -> None:
    assert usable_targets([pack_addr("8.8.8.8", 4000)], A_OWN, 4)[0] == [("8.8.8.8", 4000)]
    # documentation ranges route nowhere outside a lab: harmless, and the lab's own
    far = pack_addr("198.51.100.7", 4000)
    assert usable_targets([far], A_OWN, 4)[0] == [("198.51.100.7", 4000)]
    on_lan = [("192.168.1.20", 4001)]
    assert usable_targets([pack_addr("192.168.1.9", 4000)], on_lan, 4)[0] == [("192.168.1.9", 4000)]
    on_loopback = [("127.0.0.1", 4001)]
    assert usable_targets([pack_addr("127.0.0.1", 4000)], on_loopback, 4)[0] == [
        ("127.0.0.1", 4000)
    ]


def test_malformed_duplicate_and_surplus_addresses_are_dropped() -> None:
    good = [pack_addr(f"203.0.113.{i}", 4000) for i in range(11, 17)]
    mapped = pack_addr("::ffff:203.0.113.11", 4000)  # the same as the first, v4-mapped
    packed = [b"\x01\x02\x03", b"x" * 17, good[0], mapped, *good[1:]]
    targets, rejected = usable_targets(packed, A_OWN, 4)
    assert targets == [(f"203.0.113.{i}", 4000) for i in range(11, 15)]
    assert rejected == {"malformed": 2, "duplicate": 1, "too_many": 2}


def test_addresses_pack_to_6_or_18_bytes() -> None:
    assert pack_addr("203.0.113.4", 4002) == bytes([203, 0, 113, 4, 0x0F, 0xA2])
    ip, port = unpack_addr(pack_addr("2001:db8::1", 443)) or (None, 0)
    assert str(ip) == "2001:db8::1" and port == 443
    assert unpack_addr(b"12345") is None


def test_messages_round_trip_and_refuse_too_many_addresses() -> None:
    for env in (
        request(5, PunchConnect(1, B_PACKED, False)),
        response(5, PunchConnectReply(3, B_PACKED * 8, True)),
        request(6, PunchSync(2)),
        response(6, PunchSyncAck()),
    ):
        assert decode_envelope(encode_envelope_bytes(env)) == env
    with pytest.raises(MessageDecodeError):
        decode_envelope(msgpack.packb([0, 1, 76, 1, [b"\x00" * 6] * 9, False]))
    with pytest.raises(MessageDecodeError):
        decode_envelope(msgpack.packb([0, 1, 78, 0]))  # attempt 0


# -- A: the side that dialed the relayed connection -----------------------------------


def test_initiator_round_connect_reply_sync_then_open_half_a_round_trip_later() -> None:
    a = initiator()
    (out,) = a.start(100.0)
    assert out == SendConnect(PunchConnect(1, (pack_addr(*A_OWN[0]),), False))
    assert a.get_timer() == 105.0
    (sync,) = a.on_reply(PunchConnectReply(1, B_PACKED, False), 100.2)
    assert sync == SendSync(PunchSync(1))
    assert a.rtt == pytest.approx(0.2) and a.get_timer() == pytest.approx(100.3)
    assert a.handle_timer(100.25) == []
    (opened,) = a.handle_timer(100.31)
    assert opened == Open(1, Action.SIMULTANEOUS, (("203.0.113.4", 4002),), True)
    assert a.on_open_result(1, True, "ok", 100.5) == [Finished(True, "ok")]
    assert a.state is InitiatorState.DONE and a.get_timer() is None


def test_initiator_retries_rounds_then_gives_up_with_the_last_reason() -> None:
    a = initiator()
    a.start(0.0)
    # round 1: no reply in time
    assert a.handle_timer(5.0) == [] and a.failures == ["no_reply"]
    (again,) = a.handle_timer(5.5)
    assert isinstance(again, SendConnect) and again.message.attempt == 2
    # round 2: the open times out
    a.on_reply(PunchConnectReply(2, B_PACKED, False), 5.6)
    a.handle_timer(5.65)
    assert a.on_open_result(2, False, "timeout", 7.0) == []
    (third,) = a.handle_timer(7.5)
    assert isinstance(third, SendConnect) and third.message.attempt == 3
    a.on_reply(PunchConnectReply(3, B_PACKED, False), 7.6)
    a.handle_timer(7.7)
    assert a.on_open_result(3, False, "refused", 9.0) == [Finished(False, "refused")]
    assert a.failures == ["no_reply", "timeout", "refused"]
    assert a.handle_timer(100.0) == [] and a.get_timer() is None


def test_initiator_ignores_messages_out_of_order_or_from_old_rounds() -> None:
    a = initiator()
    # an open result or a reply before anything was sent
    assert a.on_open_result(1, True, "ok", 0.0) == []
    assert a.on_reply(PunchConnectReply(1, B_PACKED, False), 0.0) == []
    a.start(1.0)
    assert a.on_reply(PunchConnectReply(2, B_PACKED, False), 1.1) == []  # wrong round
    assert a.on_open_result(1, True, "ok", 1.1) == []  # not opening yet
    assert a.on_reply(PunchConnectReply(1, B_PACKED, False), 1.2) != []
    assert a.on_reply(PunchConnectReply(1, B_PACKED, False), 1.2) == []  # twice
    assert a.rejected["stale_reply"] == 3
    a.handle_timer(1.3)
    assert a.on_request_failed(1, "closed", 1.3) == []  # the Sync's answer, once opened
    assert a.state is InitiatorState.OPENING


def test_initiator_stops_when_the_peer_refuses_or_gives_nothing_usable() -> None:
    a = initiator()
    a.start(0.0)
    assert a.on_request_failed(1, "peer_refused", 0.1) == [Finished(False, "peer_refused")]
    b = initiator()
    b.start(0.0)
    bad = (pack_addr("10.1.1.1", 4000), pack_addr("127.0.0.1", 4000))
    assert b.on_reply(PunchConnectReply(1, bad, False), 0.1) == [
        Finished(False, "no_usable_address")
    ]
    assert b.rejected == {"not_global": 1, "loopback": 1}


def test_public_initiator_waits_and_needs_no_address() -> None:
    a = initiator(public=True)
    a.start(0.0)
    a.on_reply(PunchConnectReply(1, (), False), 0.1)
    (opened,) = a.handle_timer(0.16)
    assert opened == Open(1, Action.AWAIT, (), False)


# -- B: the side that was dialed -----------------------------------------------------------


def test_responder_answers_connect_and_opens_on_sync() -> None:
    b = responder()
    reply = b.on_connect(PunchConnect(1, (pack_addr(*A_OWN[0]),), False), 10.0)
    assert reply == PunchConnectReply(1, B_PACKED, False)
    assert not b.expired(10.0)
    assert b.on_sync(PunchSync(1), 10.1) == Open(
        1, Action.SIMULTANEOUS, (("203.0.113.3", 4001),), False
    )
    with pytest.raises(ProtocolError, match="without"):
        b.on_sync(PunchSync(1), 10.2)  # a second Sync for the same Connect


def test_responder_refuses_sync_first_late_or_for_another_round() -> None:
    b = responder()
    with pytest.raises(ProtocolError):
        b.on_sync(PunchSync(1), 0.0)
    b.on_connect(PunchConnect(1, (pack_addr(*A_OWN[0]),), False), 0.0)
    with pytest.raises(ProtocolError):
        b.on_sync(PunchSync(2), 0.1)
    b.on_connect(PunchConnect(2, (pack_addr(*A_OWN[0]),), False), 1.0)
    assert b.expired(11.5)
    with pytest.raises(ProtocolError, match="late"):
        b.on_sync(PunchSync(2), 11.5)


def test_responder_refuses_a_connect_with_no_usable_address() -> None:
    b = responder()
    with pytest.raises(ProtocolError):
        b.on_connect(PunchConnect(1, (pack_addr("192.168.0.1", 22),), False), 0.0)
    assert b.rejected == {"not_global": 1}
    # a public responder waits for the peer: it needs no address of it
    public = responder(public=True)
    public.on_connect(PunchConnect(1, (), False), 0.0)
    assert public.on_sync(PunchSync(1), 0.1) == Open(1, Action.AWAIT, (), False)


# -- the budget ---------------------------------------------------------------------


def test_budget_caps_rounds_per_peer_per_window_and_peers_at_once() -> None:
    config = HolePunchConfig(per_peer_rounds=2, peer_window=60.0, max_inflight=2)
    budget = PunchBudget(config)
    budget.admit(b"p1", 0.0)
    budget.admit(b"p1", 1.0)
    with pytest.raises(LimitExceeded, match="rounds"):
        budget.admit(b"p1", 2.0)
    budget.admit(b"p2", 2.0)
    with pytest.raises(LimitExceeded, match="at once"):
        budget.admit(b"p3", 2.0)
    budget.release(b"p1")
    budget.admit(b"p3", 3.0)
    assert budget.inflight == 2
    budget.release(b"p2")
    budget.admit(b"p1", 60.5)  # the first round left the window
    with pytest.raises(LimitExceeded):
        budget.admit(b"p1", 60.6)
