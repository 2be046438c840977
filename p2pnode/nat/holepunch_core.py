"""Direct connection upgrade through a relay (DCUtR-style): the pure part.

No sockets, no asyncio: inputs are messages, results and ``now``; outputs are
what to send and when to open. The shell (``holepunch.py``) moves them.

The exchange, over an existing (relayed) connection between A, which dialed it,
and B::

    A -> B  PunchConnect(attempt, A's addresses, A public?)    A notes the time
    B -> A  PunchConnectReply(attempt, B's addresses, B public?)
            A: rtt = now - sent
    A -> B  PunchSync(attempt)            B opens at once when it arrives
            A opens rtt/2 after sending, about when B's open leaves B

"Opens" depends on who is public (:func:`plan`): neither -> both connect at
once from their listening ports (TCP simultaneous open); one public -> it waits
and the other connects (connection reversal). The side that connects by
itself is the Noise initiator; in a simultaneous open, A is. Up to
``attempts`` rounds; then the relayed connection stays.

Rules for what a peer sends (it may be lying, or aiming us at a third party):
an address is used only if it parses (IP literal and port, no names), is not
unspecified/multicast/broadcast/reserved, not one of ours, not loopback unless
we are on loopback ourselves, and not a non-global (private, shared) address
unless one of ours is in the same /16 (v4) or /48 (v6) (documentation ranges
pass: they route nowhere outside a lab); at most ``max_targets`` per attempt,
duplicates once. So a peer can make us send at most ``attempts * max_targets``
SYNs per upgrade it is part of, and the shell's :class:`PunchBudget` bounds
the upgrades per peer and in all.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from p2pnode.errors import LimitExceeded, ProtocolError
from p2pnode.nat.holepunch_config import HolePunchConfig
from p2pnode.nat.holepunch_messages import (
    PunchConnect,
    PunchConnectReply,
    PunchSync,
    pack_addr,
    unpack_addr,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Action(enum.StrEnum):
    SIMULTANEOUS = "simultaneous"  # both connect from their listening ports
    CONNECT = "connect"  # we connect; the (public) peer waits
    AWAIT = "await"  # we are public: the peer connects to us


def plan(dialed_relay: bool, self_public: bool, peer_public: bool) -> tuple[Action, bool]:
    """What this side does, and whether it is the Noise initiator. A public side
    never punches: its listener would accept the peer's SYN as an ordinary
    inbound connection (Noise responder), so it waits for that instead."""
    if self_public and not peer_public:
        return Action.AWAIT, False
    if peer_public and not self_public:
        return Action.CONNECT, True
    if self_public and peer_public:  # odd (why relayed?): A connects, B waits
        return (Action.CONNECT, True) if dialed_relay else (Action.AWAIT, False)
    return Action.SIMULTANEOUS, dialed_relay


def own_ips(addrs: Iterable[tuple[str, int]]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for host, _ in addrs:
        try:
            out.append(_plain(ipaddress.ip_address(host)))
        except ValueError:
            continue
    return out


def usable_targets(
    packed: Sequence[bytes],
    own: Sequence[tuple[str, int]],
    max_targets: int,
) -> tuple[list[tuple[str, int]], Counter[str]]:
    """The peer's addresses we may open to (module rules), and why the rest were not."""
    mine = own_ips(own)
    own_set = {(_plain(ipaddress.ip_address(h)), p) for h, p in own if _is_ip(h)}
    targets: list[tuple[str, int]] = []
    rejected: Counter[str] = Counter()
    for data in packed:
        parsed = unpack_addr(data)
        if parsed is None:
            rejected["malformed"] += 1
            continue
        ip, port = _plain(parsed[0]), parsed[1]
        why = _reject_reason(ip, port, mine, own_set)
        if why is not None:
            rejected[why] += 1
            continue
        target = (str(ip), port)
        if target in targets:
            rejected["duplicate"] += 1
        elif len(targets) >= max_targets:
            rejected["too_many"] += 1
        else:
            targets.append(target)
    return targets, rejected


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _plain(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _reject_reason(
    ip: IPAddress, port: int, mine: Sequence[IPAddress], own_set: set[tuple[IPAddress, int]]
) -> str | None:
    if port == 0:
        return "bad_port"
    if (ip, port) in own_set:
        return "ours"
    if ip.is_loopback:  # before is_reserved, which ::1 also is
        return None if any(m.is_loopback for m in mine) else "loopback"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return "bad_ip"
    if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
        return "bad_ip"
    if ip.is_link_local:
        return "link_local"
    if not ip.is_global and not _documentation(ip) and not any(_same_site(ip, m) for m in mine):
        return "not_global"
    return None


# The documentation ranges route nowhere on the internet, so a SYN aimed there
# reaches no third party; network-namespace labs (p2pnode/sim/netlab.py) use
# them as their public addresses.
DOCUMENTATION = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)


def _documentation(ip: IPAddress) -> bool:
    return any(ip.version == net.version and ip in net for net in DOCUMENTATION)


def _same_site(ip: IPAddress, mine: IPAddress) -> bool:
    if ip.version != mine.version or mine.is_loopback:
        return False
    prefix = 16 if ip.version == 4 else 48
    net = ipaddress.ip_network(f"{mine}/{prefix}", strict=False)
    return ip in net


# -- outputs ------------------------------------------------------------------


@dataclass(frozen=True)
class SendConnect:
    message: PunchConnect


@dataclass(frozen=True)
class SendSync:
    message: PunchSync


@dataclass(frozen=True)
class Open:
    """Open the direct connection now: ``action`` to ``targets``."""

    attempt: int
    action: Action
    targets: tuple[tuple[str, int], ...]
    noise_initiator: bool


@dataclass(frozen=True)
class Finished:
    ok: bool
    reason: str  # "ok" or why the last round failed


Output = SendConnect | SendSync | Open | Finished


class InitiatorState(enum.StrEnum):
    CONNECTING = "connecting"  # Connect sent, reply awaited
    SYNCING = "syncing"  # Sync sent, waiting rtt/2
    OPENING = "opening"  # Open handed to the shell
    PAUSED = "paused"  # between rounds
    DONE = "done"


@dataclass
class PunchInitiator:
    """A's side of one upgrade (A dialed the relayed connection)."""

    config: HolePunchConfig
    own: Sequence[tuple[str, int]]
    public: bool
    attempt: int = 0
    state: InitiatorState = InitiatorState.PAUSED
    rtt: float | None = None
    rejected: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _sent_at: float = 0.0
    _timer: float | None = None
    _pending_open: Open | None = None

    def start(self, now: float) -> list[Output]:
        return self._next_round(now)

    def get_timer(self) -> float | None:
        return self._timer

    def handle_timer(self, now: float) -> list[Output]:
        if self._timer is None or now < self._timer:
            return []
        self._timer = None
        if self.state is InitiatorState.CONNECTING:
            return self._round_failed("no_reply", now)
        if self.state is InitiatorState.SYNCING:
            self.state = InitiatorState.OPENING
            assert self._pending_open is not None
            return [self._pending_open]
        if self.state is InitiatorState.PAUSED:
            return self._next_round(now)
        return []

    def on_reply(self, reply: PunchConnectReply, now: float) -> list[Output]:
        if self.state is not InitiatorState.CONNECTING or reply.attempt != self.attempt:
            self.rejected["stale_reply"] += 1
            return []
        self.rtt = max(0.0, now - self._sent_at)
        action, initiator = plan(True, self.public, reply.public)
        targets: list[tuple[str, int]] = []
        if action is not Action.AWAIT:
            targets, rejected = usable_targets(reply.addrs, self.own, self.config.max_targets)
            self.rejected.update(rejected)
            if not targets:
                return self._round_failed("no_usable_address", now, retry=False)
        self._pending_open = Open(self.attempt, action, tuple(targets), initiator)
        self.state = InitiatorState.SYNCING
        self._timer = now + self.rtt / 2
        return [SendSync(PunchSync(self.attempt))]

    def on_request_failed(self, attempt: int, reason: str, now: float) -> list[Output]:
        """The Connect or Sync request failed: the peer refused, or the relayed
        connection closed. Final: another round would meet the same answer."""
        if attempt != self.attempt or self.state is InitiatorState.DONE:
            return []
        if self.state is InitiatorState.OPENING:
            return []  # the Sync's answer is not needed once we opened
        return self._round_failed(reason, now, retry=False)

    def on_open_result(self, attempt: int, ok: bool, reason: str, now: float) -> list[Output]:
        if attempt != self.attempt or self.state is not InitiatorState.OPENING:
            return []
        if ok:
            self.state = InitiatorState.DONE
            return [Finished(True, "ok")]
        return self._round_failed(reason, now)

    def _next_round(self, now: float) -> list[Output]:
        self.attempt += 1
        self.state = InitiatorState.CONNECTING
        self._sent_at = now
        self._timer = now + self.config.reply_timeout
        addrs = tuple(pack_addr(h, p) for h, p in self.own if _is_ip(h))
        return [SendConnect(PunchConnect(self.attempt, addrs[:8], self.public))]

    def _round_failed(self, reason: str, now: float, *, retry: bool = True) -> list[Output]:
        self.failures.append(reason)
        self._pending_open = None
        if retry and self.attempt < self.config.attempts:
            self.state = InitiatorState.PAUSED
            self._timer = now + self.config.retry_delay
            return []
        self.state = InitiatorState.DONE
        self._timer = None
        return [Finished(False, reason)]


@dataclass
class PunchResponder:
    """B's side: answers Connects and opens on Sync. One per peer, one round at a time."""

    config: HolePunchConfig
    own: Sequence[tuple[str, int]]
    public: bool
    rejected: Counter[str] = field(default_factory=Counter)
    _round: Open | None = None
    _expires: float = 0.0

    def on_connect(self, msg: PunchConnect, now: float) -> PunchConnectReply:
        action, initiator = plan(False, self.public, msg.public)
        targets: list[tuple[str, int]] = []
        if action is not Action.AWAIT:
            targets, rejected = usable_targets(msg.addrs, self.own, self.config.max_targets)
            self.rejected.update(rejected)
            if not targets:
                raise ProtocolError("no usable address to open to")
        self._round = Open(msg.attempt, action, tuple(targets), initiator)
        self._expires = now + self.config.sync_timeout
        addrs = tuple(pack_addr(h, p) for h, p in self.own if _is_ip(h))
        return PunchConnectReply(msg.attempt, addrs[:8], self.public)

    def on_sync(self, msg: PunchSync, now: float) -> Open:
        round_ = self._round
        if round_ is None or round_.attempt != msg.attempt:
            raise ProtocolError("PunchSync without its PunchConnect")
        self._round = None
        if now > self._expires:
            raise ProtocolError("PunchSync too late")
        return round_

    def expired(self, now: float) -> bool:
        return self._round is None or now > self._expires


@dataclass
class PunchBudget:
    """How many rounds peers may start with us: ``per_peer_rounds`` per peer per
    ``peer_window``, and ``max_inflight`` peers at once. Pure; times are inputs."""

    config: HolePunchConfig
    _rounds: dict[bytes, deque[float]] = field(default_factory=dict)
    _inflight: set[bytes] = field(default_factory=set)

    def admit(self, peer: bytes, now: float) -> None:
        """Count a round with ``peer``; LimitExceeded when over a limit."""
        self._forget(now)
        if peer not in self._inflight and len(self._inflight) >= self.config.max_inflight:
            raise LimitExceeded("too many hole punches at once")
        rounds = self._rounds.setdefault(peer, deque())
        if len(rounds) >= self.config.per_peer_rounds:
            raise LimitExceeded("too many hole-punch rounds from this peer")
        rounds.append(now)
        self._inflight.add(peer)

    def release(self, peer: bytes) -> None:
        self._inflight.discard(peer)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _forget(self, now: float) -> None:
        horizon = now - self.config.peer_window
        for peer in list(self._rounds):
            rounds = self._rounds[peer]
            while rounds and rounds[0] <= horizon:
                rounds.popleft()
            if not rounds:
                del self._rounds[peer]
