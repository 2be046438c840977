"""The circuit relay's bookkeeping: reservations, circuits and their limits. Pure:
no sockets, no asyncio; time comes in as ``now``.

A private node C *reserves* a slot on a public relay R over an ordinary peer
connection; a dialer D then asks R for a *circuit* to C; R asks C to accept it
(a circuit id and a one-time secret), C opens a fresh TCP connection to R and
names both; R splices the two sockets. This module decides every yes or no of
that, counts every no, and says when a circuit must end.

Limits, compared with libp2p circuit relay v2 (whose defaults are reservation
TTL 1 h, 128 reservations, 4 per peer, 8 per IP, 16 circuits per peer, a
circuit limited to 2 min and 128 KiB: enough to coordinate a hole punch, not to
carry data). Here a relay must also carry real transfers when punching fails
(symmetric NATs), so the circuit limits are much larger, and every one is
configurable (``RelayLimits``): reservation TTL 1 h (renewed at half), 128
reservations, 1 per peer (a renewal replaces it), 8 per IP; 64 circuits, 8 per
reservation, 16 per dialer IP; a circuit lives at most 30 min, carries at most
4 GiB (both directions together) and ends after 120 s without a byte; a pending
circuit waits 10 s for the target's accept.

Every refusal is a :class:`RelayStatus` that travels to the asker as is, so the
dialer's error says which limit tripped.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import os
from collections import Counter
from dataclasses import dataclass, field

from p2pnode import confcheck

__all__ = [
    "Circuit",
    "RelayConfig",
    "RelayCore",
    "RelayLimits",
    "RelayStatus",
    "Reservation",
]


class RelayStatus(enum.StrEnum):
    """What a relay answers a reservation, a connect or an accept."""

    OK = "ok"
    DISABLED = "disabled"  # this node offers no relay service
    RESERVATIONS_FULL = "reservations_full"
    RESERVATIONS_PER_IP = "reservations_per_ip"
    NO_RESERVATION = "no_reservation"  # the target holds no (live) reservation here
    CIRCUITS_FULL = "circuits_full"
    CIRCUITS_PER_RESERVATION = "circuits_per_reservation"
    CIRCUITS_PER_IP = "circuits_per_ip"
    NOT_ACCEPTED = "not_accepted"  # the target did not accept in time
    BAD_HELLO = "bad_hello"
    BAD_SECRET = "bad_secret"  # an accept that names no pending circuit, or the wrong secret


@dataclass(frozen=True)
class RelayLimits:
    """A relay's limits (see the module text for the reasons)."""

    reservation_ttl: float = 3600.0
    max_reservations: int = 128
    max_reservations_per_ip: int = 8
    max_circuits: int = 64
    max_circuits_per_reservation: int = 8
    max_circuits_per_ip: int = 16
    circuit_duration: float = 1800.0
    circuit_bytes: int = 4 * 1024**3
    circuit_idle: float = 120.0
    accept_timeout: float = 10.0
    # A TCP connection to the relay's port must say what it is (a Noise handshake
    # or a circuit hello) within this time, and at most this many may be
    # undecided at once (the oldest is dropped for a newer one).
    hello_timeout: float = 5.0
    max_undecided: int = 256

    def __post_init__(self) -> None:
        confcheck.check_types(self)
        confcheck.at_least(
            self,
            1,
            "max_reservations",
            "max_reservations_per_ip",
            "max_circuits",
            "max_circuits_per_reservation",
            "max_circuits_per_ip",
            "circuit_bytes",
            "max_undecided",
        )
        confcheck.positive(
            self,
            "reservation_ttl",
            "circuit_duration",
            "circuit_idle",
            "accept_timeout",
            "hello_timeout",
        )


MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class RelayConfig:
    """``service``: offer a relay (``auto``: when the node knows it is public).
    ``client``: reserve slots on relays (``auto``: when it knows it is private).
    ``relays``: relays to use (IP literal, port) instead of picking among DHT
    contacts (proven, lowest RTT first); ``reservations``: how many to hold;
    ``check_interval``: how often the client checks them (and keeps their
    connections alive)."""

    service: str = "auto"
    client: str = "auto"
    limits: RelayLimits = field(default_factory=RelayLimits)
    reservations: int = 2
    relays: tuple[tuple[str, int], ...] = ()
    check_interval: float = 5.0

    def __post_init__(self) -> None:
        confcheck.check_types(self)
        for name in ("service", "client"):
            if getattr(self, name) not in MODES:
                confcheck.fail(self, name, f"must be one of {', '.join(MODES)}")
        confcheck.at_least(self, 1, "reservations")
        confcheck.positive(self, "check_interval")
        for entry in self.relays:
            ok = isinstance(entry, tuple) and len(entry) == 2
            if ok:
                try:
                    ipaddress.ip_address(entry[0])
                except ValueError:
                    ok = False
            if not ok:
                confcheck.fail(self, "relays", f"entries are (IP literal, port), got {entry!r}")
            confcheck.port(self, "relays", entry[1], zero=False)


@dataclass(slots=True)
class Reservation:
    peer: bytes
    ip: str
    expires: float
    circuits: int = 0


@dataclass(slots=True)
class Circuit:
    circuit_id: int
    target: bytes
    dialer_ip: str
    secret: bytes
    created: float
    accepted: bool = False
    started: float = 0.0
    last_active: float = 0.0
    bytes: int = 0
    ended: str | None = None


@dataclass
class RelayCore:
    """Reservations and circuits of one relay; ``counters`` holds every refusal
    (``refused.<status>``) and every end (``ended.<reason>``)."""

    limits: RelayLimits
    counters: Counter[str] = field(default_factory=Counter)
    reservations: dict[bytes, Reservation] = field(default_factory=dict)
    circuits: dict[int, Circuit] = field(default_factory=dict)
    _next_id: int = 1

    # -- reservations ---------------------------------------------------------

    def reserve(self, peer: bytes, ip: str, now: float) -> RelayStatus:
        """Reserve (or renew) ``peer``'s slot; OK or the refusal."""
        self.expire(now)
        limits = self.limits
        held = self.reservations.get(peer)
        if held is None:
            if len(self.reservations) >= limits.max_reservations:
                return self._refuse(RelayStatus.RESERVATIONS_FULL)
            same_ip = sum(1 for r in self.reservations.values() if r.ip == ip)
            if same_ip >= limits.max_reservations_per_ip:
                return self._refuse(RelayStatus.RESERVATIONS_PER_IP)
            self.reservations[peer] = Reservation(peer, ip, now + limits.reservation_ttl)
            self.counters["reservations_made"] += 1
        else:
            held.expires = now + limits.reservation_ttl
            held.ip = ip
            self.counters["reservations_renewed"] += 1
        return RelayStatus.OK

    def unreserve(self, peer: bytes) -> None:
        if self.reservations.pop(peer, None) is not None:
            self.counters["reservations_dropped"] += 1

    # -- circuits ---------------------------------------------------------------

    def open_circuit(self, target: bytes, dialer_ip: str, now: float) -> Circuit | RelayStatus:
        """A pending circuit to ``target`` (to be accepted with its id and secret),
        or the refusal."""
        self.expire(now)
        limits = self.limits
        reservation = self.reservations.get(target)
        if reservation is None:
            return self._refuse(RelayStatus.NO_RESERVATION)
        if len(self.circuits) >= limits.max_circuits:
            return self._refuse(RelayStatus.CIRCUITS_FULL)
        if reservation.circuits >= limits.max_circuits_per_reservation:
            return self._refuse(RelayStatus.CIRCUITS_PER_RESERVATION)
        same_ip = sum(1 for c in self.circuits.values() if c.dialer_ip == dialer_ip)
        if same_ip >= limits.max_circuits_per_ip:
            return self._refuse(RelayStatus.CIRCUITS_PER_IP)
        circuit_id = self._next_id
        self._next_id = (self._next_id % (2**31 - 1)) + 1
        circuit = Circuit(circuit_id, target, dialer_ip, os.urandom(16), now)
        self.circuits[circuit_id] = circuit
        reservation.circuits += 1
        self.counters["circuits_requested"] += 1
        return circuit

    def accept(self, circuit_id: int, secret: bytes, now: float) -> Circuit | RelayStatus:
        """The target accepts a pending circuit: the circuit, now live, or BAD_SECRET."""
        circuit = self.circuits.get(circuit_id)
        if (
            circuit is None
            or circuit.accepted
            or circuit.ended is not None
            or not hmac.compare_digest(circuit.secret, secret)
        ):
            return self._refuse(RelayStatus.BAD_SECRET)
        circuit.accepted = True
        circuit.started = now
        circuit.last_active = now
        self.counters["circuits_opened"] += 1
        return circuit

    def carried(self, circuit: Circuit, nbytes: int, now: float) -> bool:
        """``nbytes`` crossed ``circuit``; False when that took it past its byte
        limit (the circuit is ended, reason ``bytes``)."""
        circuit.bytes += nbytes
        circuit.last_active = now
        self.counters["bytes_relayed"] += nbytes
        if circuit.bytes > self.limits.circuit_bytes:
            self.end(circuit.circuit_id, "bytes")
            return False
        return True

    def end(self, circuit_id: int, reason: str) -> Circuit | None:
        """Forget a circuit (once); counted as ``ended.<reason>``."""
        circuit = self.circuits.pop(circuit_id, None)
        if circuit is None:
            return None
        circuit.ended = reason
        reservation = self.reservations.get(circuit.target)
        if reservation is not None and reservation.circuits > 0:
            reservation.circuits -= 1
        self.counters[f"ended.{reason}"] += 1
        return circuit

    # -- time ---------------------------------------------------------------------

    def expire(self, now: float) -> list[Circuit]:
        """Drop expired reservations; end circuits past a time limit (returned, so
        the shell closes their sockets). Reasons: ``not_accepted``, ``duration``, ``idle``."""
        for peer in [p for p, r in self.reservations.items() if r.expires <= now]:
            del self.reservations[peer]
            self.counters["reservations_expired"] += 1
        limits = self.limits
        ended: list[Circuit] = []
        for circuit in list(self.circuits.values()):
            reason = None
            if not circuit.accepted:
                if now >= circuit.created + limits.accept_timeout:
                    reason = "not_accepted"
            elif now >= circuit.started + limits.circuit_duration:
                reason = "duration"
            elif now >= circuit.last_active + limits.circuit_idle:
                reason = "idle"
            if reason is not None:
                done = self.end(circuit.circuit_id, reason)
                if done is not None:
                    ended.append(done)
        return ended

    def next_deadline(self) -> float | None:
        """When :meth:`expire` has something to do next (reservations included)."""
        limits = self.limits
        times = [r.expires for r in self.reservations.values()]
        for c in self.circuits.values():
            if not c.accepted:
                times.append(c.created + limits.accept_timeout)
            else:
                times.append(
                    min(c.started + limits.circuit_duration, c.last_active + limits.circuit_idle)
                )
        return min(times) if times else None

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        out["reservations"] = len(self.reservations)
        out["circuits_pending"] = sum(1 for c in self.circuits.values() if not c.accepted)
        out["circuits_live"] = sum(1 for c in self.circuits.values() if c.accepted)
        return out

    def _refuse(self, status: RelayStatus) -> RelayStatus:
        self.counters[f"refused.{status}"] += 1
        return status
