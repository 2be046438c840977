"""The relay's pure parts: reservations, circuits and their limits (RelayCore),
and the hello frames (relay_wire)."""

from __future__ import annotations

import pytest

from p2pnode.errors import ProtocolError, UsageError
from p2pnode.nat.relay_core import RelayConfig, RelayCore, RelayLimits, RelayStatus
from p2pnode.nat.relay_wire import (
    Accept,
    Connect,
    Status,
    decode_hello,
    encode_hello,
    hello_length,
)
from p2pnode.net.firstbytes import NOISE_FIRST

A, B, C, D = (bytes([i]) * 20 for i in range(1, 5))


def test_reservations_are_capped_in_all_and_per_ip_and_renewed() -> None:
    core = RelayCore(RelayLimits(max_reservations=2, max_reservations_per_ip=1))
    assert core.reserve(A, "10.0.0.1", 0.0) is RelayStatus.OK
    assert core.reserve(B, "10.0.0.1", 0.0) is RelayStatus.RESERVATIONS_PER_IP
    assert core.reserve(B, "10.0.0.2", 0.0) is RelayStatus.OK
    assert core.reserve(C, "10.0.0.3", 0.0) is RelayStatus.RESERVATIONS_FULL
    assert core.reserve(A, "10.0.0.1", 10.0) is RelayStatus.OK  # a renewal, not a new one
    assert core.reservations[A].expires == 10.0 + core.limits.reservation_ttl
    stats = core.stats()
    assert stats["refused.reservations_per_ip"] == 1
    assert stats["refused.reservations_full"] == 1
    assert stats["reservations"] == 2 and stats["reservations_renewed"] == 1


def test_reservations_expire() -> None:
    core = RelayCore(RelayLimits(reservation_ttl=60.0))
    core.reserve(A, "10.0.0.1", 0.0)
    assert core.next_deadline() == 60.0
    core.expire(59.0)
    assert A in core.reservations
    core.expire(60.0)
    assert A not in core.reservations
    assert core.open_circuit(A, "10.0.0.9", 61.0) is RelayStatus.NO_RESERVATION
    assert core.counters["reservations_expired"] == 1


def test_a_circuit_needs_a_reservation_and_the_right_secret() -> None:
    core = RelayCore(RelayLimits())
    assert core.open_circuit(A, "10.0.0.9", 0.0) is RelayStatus.NO_RESERVATION
    core.reserve(A, "10.0.0.1", 0.0)
    circuit = core.open_circuit(A, "10.0.0.9", 0.0)
    assert not isinstance(circuit, RelayStatus)
    wrong = bytes(16) if circuit.secret != bytes(16) else b"\x01" * 16
    assert core.accept(circuit.circuit_id, wrong, 0.1) is RelayStatus.BAD_SECRET
    assert core.accept(circuit.circuit_id + 1, circuit.secret, 0.1) is RelayStatus.BAD_SECRET
    assert core.accept(circuit.circuit_id, circuit.secret, 0.2) is circuit
    assert circuit.accepted
    # a secret is good once
    assert core.accept(circuit.circuit_id, circuit.secret, 0.3) is RelayStatus.BAD_SECRET
    assert core.counters["refused.bad_secret"] == 3


def test_circuit_caps_total_per_reservation_and_per_dialer_ip() -> None:
    limits = RelayLimits(max_circuits=3, max_circuits_per_reservation=2, max_circuits_per_ip=2)
    core = RelayCore(limits)
    core.reserve(A, "10.0.0.1", 0.0)
    core.reserve(B, "10.0.0.2", 0.0)
    assert not isinstance(core.open_circuit(A, "10.0.1.1", 0.0), RelayStatus)
    assert not isinstance(core.open_circuit(A, "10.0.1.2", 0.0), RelayStatus)
    assert core.open_circuit(A, "10.0.1.3", 0.0) is RelayStatus.CIRCUITS_PER_RESERVATION
    assert not isinstance(core.open_circuit(B, "10.0.1.1", 0.0), RelayStatus)
    assert core.open_circuit(B, "10.0.1.4", 0.0) is RelayStatus.CIRCUITS_FULL
    core.end(list(core.circuits)[1], "closed")  # A's from 10.0.1.2: room again
    assert core.open_circuit(B, "10.0.1.1", 0.0) is RelayStatus.CIRCUITS_PER_IP
    assert not isinstance(core.open_circuit(B, "10.0.1.5", 0.0), RelayStatus)
    for status in ("circuits_per_reservation", "circuits_full", "circuits_per_ip"):
        assert core.counters[f"refused.{status}"] == 1


def test_circuits_end_at_their_time_and_byte_limits() -> None:
    limits = RelayLimits(
        accept_timeout=5.0, circuit_duration=100.0, circuit_idle=10.0, circuit_bytes=1000
    )
    core = RelayCore(limits)
    core.reserve(A, "10.0.0.1", 0.0)
    opened = [core.open_circuit(A, f"10.0.1.{i}", 0.0) for i in range(4)]
    pending, idle, busy, heavy = (c for c in opened if not isinstance(c, RelayStatus))
    for c in (idle, busy, heavy):
        assert core.accept(c.circuit_id, c.secret, 1.0) is c
    assert core.next_deadline() == 5.0  # the pending one's accept deadline
    assert core.carried(heavy, 600, 2.0)
    assert not core.carried(heavy, 600, 2.0)  # past 1000 bytes: ended at once
    assert heavy.ended == "bytes"
    assert core.expire(5.0) == [pending]
    assert pending.ended == "not_accepted"
    for t in range(6, 100, 5):  # busy moves a byte every 5 s; idle moves none
        core.carried(busy, 1, float(t))
        ended = core.expire(float(t))
        assert busy not in ended
        if t >= 11:
            assert idle.ended == "idle"
    assert core.expire(101.0) == [busy]
    assert busy.ended == "duration"
    stats = core.stats()
    for reason in ("not_accepted", "idle", "bytes", "duration"):
        assert stats[f"ended.{reason}"] == 1
    assert stats["circuits_live"] == 0 and core.reservations[A].circuits == 0


def test_limits_and_config_are_checked() -> None:
    with pytest.raises(UsageError):
        RelayLimits(max_circuits=0)
    with pytest.raises(UsageError):
        RelayConfig(client="sometimes")
    with pytest.raises(UsageError):
        RelayConfig(relays=(("relay.example", 4001),))
    assert RelayConfig(relays=(("203.0.113.5", 4001),)).relays


def test_hellos_round_trip_and_never_look_like_a_noise_handshake() -> None:
    for hello in (
        Connect(A),
        Accept(7, b"s" * 16),
        Status("ok"),
        Status("circuits_full", "x" * 300),
    ):
        data = encode_hello(hello)
        assert data[:2] != NOISE_FIRST
        length = hello_length(data[:2])
        assert len(data) == 2 + length
        decoded = decode_hello(data[2:])
        if isinstance(hello, Status):
            assert isinstance(decoded, Status) and decoded.status == hello.status
        else:
            assert decoded == hello


@pytest.mark.parametrize(
    "body",
    [
        b"\x93\xabp2p-relay/1\xa7connect\xc4\x13" + b"a" * 19,  # short id
        b"\x92\xabp2p-relay/1\xa7connect",
        b"\x93\xabp2p-relay/2\xa7connect\xc4\x14" + b"a" * 20,
        b"\xc1",
        b"\x94\xabp2p-relay/1\xa6accept\x00\xc4\x10" + b"s" * 16,  # circuit id 0
    ],
)
def test_bad_hellos_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_hello(body)


def test_hello_prefixes_are_checked() -> None:
    with pytest.raises(ProtocolError):
        hello_length(NOISE_FIRST)
    with pytest.raises(ProtocolError):
        hello_length(b"\x80\x00")  # empty
    with pytest.raises(ProtocolError):
        hello_length(b"\xff\xff")  # too long
