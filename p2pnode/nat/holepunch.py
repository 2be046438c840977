"""Direct connection upgrade through a relay: the asyncio shell.

:class:`HolePuncher` answers the peer's hole-punch messages on a node's
:class:`~p2pnode.net.host.PeerHost` and, through :meth:`HolePuncher.upgrade`,
turns a relayed connection into a direct one (the protocol, its limits and
the address rules: ``holepunch_core``). A punched connection is adopted with
``via="punched"``; the pool prefers it, and the side that started the upgrade
closes the relayed connection once it is idle. On failure the relayed
connection stays.

TCP only: every transfer of p2pnode runs over TCP peer connections, so nothing
is punched over UDP (the DHT needs no hole: a NATed node is a DHT client, and
its requests' answers come back through the mapping the requests made).

Inputs from outside (until the NAT parts are wired together by the node):
``addresses()`` gives the addresses peers should open to (observed public IP
and our listening port), ``reachability()`` the verdict (a public node waits
for the peer's connection instead of punching), ``listen_port`` the port the
punch connects from.

Counters (in ``PeerHost.stats()``, prefix ``holepunch_``): ``upgrades``,
``rounds``, ``successes``, ``upgrades_failed``, ``round_failed_<reason>``,
``refused_<reason>`` (peer's requests refused), ``addr_rejected_<reason>``,
``relayed_closed``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Callable, Sequence
from typing import Literal, NoReturn

from p2pnode.endpoints import SocketFactory
from p2pnode.errors import (
    ConnectionClosed,
    HolePunchFailed,
    LimitExceeded,
    P2PError,
    ProtocolError,
    RemoteError,
    UsageError,
)
from p2pnode.nat.holepunch_core import (
    Action,
    Finished,
    HolePunchConfig,
    Open,
    PunchBudget,
    PunchInitiator,
    PunchResponder,
    SendConnect,
    SendSync,
)
from p2pnode.nat.holepunch_messages import (
    HOLEPUNCH_MESSAGES,
    PunchConnect,
    PunchConnectReply,
    PunchSync,
    PunchSyncAck,
)
from p2pnode.nat.punch_socket import PunchSettings, punch_any
from p2pnode.nat.types import Reachability, Via
from p2pnode.net.connection import PeerConnection
from p2pnode.net.dispatch import routes_of
from p2pnode.net.host import PeerHost
from p2pnode.tasks import TaskSet
from p2pnode.wire.messages import Message

log = logging.getLogger(__name__)

__all__ = ["HolePuncher"]

# How often a waiting side looks for the peer's connection, and (x20) the
# relayed connection for idleness: PeerHost has no event for either; the looks
# are cheap and bounded in number.
POLL_INTERVAL = 0.005
DEFAULT_CONFIG = HolePunchConfig()

_Event = tuple[Literal["reply", "failed", "opened"], int, object]


class HolePuncher:
    def __init__(
        self,
        host: PeerHost,
        *,
        listen_port: int | Callable[[], int],
        addresses: Callable[[], Sequence[tuple[str, int]]],
        reachability: Callable[[], Reachability] = lambda: Reachability.UNKNOWN,
        config: HolePunchConfig = DEFAULT_CONFIG,
        punch: PunchSettings | None = None,
        bind_host: str = "0.0.0.0",
        make_socket: SocketFactory = socket.socket,
    ) -> None:
        self.host = host
        self.config = config
        self.punch = punch if punch is not None else PunchSettings(timeout=config.open_timeout)
        self._listen_port = listen_port
        self._addresses = addresses
        self._reachability = reachability
        self._bind_host = bind_host
        self._make_socket = make_socket
        self.counters = host.counters
        self._budget = PunchBudget(config)
        self._responders: dict[bytes, PunchResponder] = {}
        self._upgrades: dict[bytes, asyncio.Task[PeerConnection | P2PError]] = {}
        self._tasks = TaskSet("holepunch")
        self._started = False

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Answer peers' hole-punch requests."""
        routes_of(self.host).route(HOLEPUNCH_MESSAGES, self._on_request)
        self._started = True

    async def close(self) -> None:
        if self._started:
            routes_of(self.host).unroute(HOLEPUNCH_MESSAGES)
            self._started = False
        for task in list(self._upgrades.values()):
            task.cancel()
        await self._tasks.close()

    def addresses(self) -> list[tuple[str, int]]:
        """The addresses we give peers to open to (observed IP, listening port)."""
        return list(self._addresses())

    def stats(self) -> dict[str, int]:
        out = {k: v for k, v in self.counters.items() if k.startswith("holepunch_")}
        out["holepunch_inflight"] = self._budget.inflight
        return out

    # -- upgrading -------------------------------------------------------------

    async def upgrade(self, peer: bytes) -> PeerConnection:
        """A direct connection to ``peer`` in place of our relayed one: punched
        (or, if one side is public, opened by the other). Concurrent calls for
        one peer share the upgrade. Raises HolePunchFailed (the relayed
        connection stays) or UsageError (no relayed connection to upgrade)."""
        if self._tasks.closed:
            raise UsageError("HolePuncher is closed")
        task = self._upgrades.get(peer)
        if task is None:
            spawned = self._tasks.spawn(self._upgrade_outcome(peer), "upgrade")
            assert spawned is not None
            task = spawned
            self._upgrades[peer] = task
            task.add_done_callback(lambda t: self._upgrade_done(peer, t))
        outcome = await asyncio.shield(task)
        if isinstance(outcome, P2PError):
            raise outcome
        return outcome

    def upgrade_soon(self, peer: bytes) -> None:
        """Start :meth:`upgrade` in the background (after a relayed dial)."""
        self._tasks.spawn(self._upgrade_quietly(peer), "upgrade-soon")

    async def _upgrade_quietly(self, peer: bytes) -> None:
        try:
            await self.upgrade(peer)
        except P2PError as exc:
            log.debug("hole punch to %s: %s", peer.hex()[:12], exc)

    def _upgrade_done(self, peer: bytes, task: asyncio.Task[PeerConnection | P2PError]) -> None:
        if self._upgrades.get(peer) is task:
            del self._upgrades[peer]

    async def _upgrade_outcome(self, peer: bytes) -> PeerConnection | P2PError:
        # a failed upgrade is an outcome, not a crash of the owned task
        try:
            return await self._upgrade(peer)
        except P2PError as exc:
            return exc

    async def _upgrade(self, peer: bytes) -> PeerConnection:
        direct = self._direct(peer)
        if direct is not None:
            return direct
        relayed = self._relayed(peer)
        if relayed is None:
            raise UsageError("no relayed connection to upgrade")
        self.counters["holepunch_upgrades"] += 1
        clock = self.host.clock
        core = PunchInitiator(self.config, self.addresses(), self._is_public())
        events: asyncio.Queue[_Event] = asyncio.Queue()
        subtasks = TaskSet("holepunch-round")
        try:
            outputs = core.start(clock.now())
            while True:  # bounded: each round ends by a timer, at most config.attempts rounds
                for out in outputs:
                    if isinstance(out, SendConnect):
                        self._count_round(peer, out.message.attempt)
                        subtasks.spawn(self._send(relayed, out.message, events), "connect")
                    elif isinstance(out, SendSync):
                        subtasks.spawn(self._send(relayed, out.message, events), "sync")
                    elif isinstance(out, Open):
                        subtasks.spawn(self._open_reporting(peer, out, events), "open")
                    elif isinstance(out, Finished):
                        self._count_rejected(core.rejected)
                        return self._finish(peer, out)
                outputs = await self._next_outputs(core, events)
        finally:
            self._budget.release(peer)
            await subtasks.close()

    async def _next_outputs(
        self, core: PunchInitiator, events: asyncio.Queue[_Event]
    ) -> list[Finished | SendConnect | SendSync | Open]:
        clock = self.host.clock
        timer = core.get_timer()
        try:
            if timer is None:
                event = await events.get()
            else:
                async with asyncio.timeout(max(0.0, timer - clock.now())):
                    event = await events.get()
        except TimeoutError:
            return list(core.handle_timer(clock.now()))
        kind, attempt, value = event
        now = clock.now()
        if kind == "reply":
            assert isinstance(value, PunchConnectReply)
            return list(core.on_reply(value, now))
        if kind == "failed":
            assert isinstance(value, str)
            return list(core.on_request_failed(attempt, value, now))
        if isinstance(value, PeerConnection):
            return list(core.on_open_result(attempt, True, "ok", now))
        assert isinstance(value, str)
        self.counters[f"holepunch_round_failed_{value}"] += 1
        return list(core.on_open_result(attempt, False, value, now))

    def _count_round(self, peer: bytes, attempt: int) -> None:
        self.counters["holepunch_rounds"] += 1
        try:
            self._budget.admit(peer, self.host.clock.now())
        except LimitExceeded:
            # our own upgrades share the budget: over it, the round still runs
            # (bounded by config.attempts) but is counted
            self.counters["holepunch_over_budget"] += 1

    def _finish(self, peer: bytes, result: Finished) -> PeerConnection:
        direct = self._direct(peer)
        if result.ok and direct is not None:
            self.counters["holepunch_successes"] += 1
            self._tasks.spawn(self._retire_relayed(peer), "retire-relayed")
            return direct
        self.counters["holepunch_upgrades_failed"] += 1
        reason = result.reason if not result.ok else "closed"
        raise HolePunchFailed(reason, f"no direct connection after {self.config.attempts} rounds")

    async def _send(
        self, conn: PeerConnection, msg: PunchConnect | PunchSync, events: asyncio.Queue[_Event]
    ) -> None:
        try:
            async with asyncio.timeout(self.config.reply_timeout):
                reply = await conn.request(msg)
        except TimeoutError:
            return  # the core's own timer ends the round
        except RemoteError as exc:
            self.counters["holepunch_peer_refused"] += 1
            why = "peer_busy" if exc.code == "busy" else "peer_refused"
            events.put_nowait(("failed", msg.attempt, why))
            return
        except P2PError:
            events.put_nowait(("failed", msg.attempt, "closed"))
            return
        if isinstance(msg, PunchConnect):
            if isinstance(reply, PunchConnectReply):
                events.put_nowait(("reply", msg.attempt, reply))
            else:
                events.put_nowait(("failed", msg.attempt, "bad_reply"))

    async def _open_reporting(self, peer: bytes, plan: Open, events: asyncio.Queue[_Event]) -> None:
        outcome: PeerConnection | str = "internal"  # if _open dies of a bug (logged)
        try:
            outcome = await self._open(peer, plan)
        except HolePunchFailed as exc:
            outcome = exc.reason
        finally:
            # always reported: the round waits for it (the core has no timer then)
            events.put_nowait(("opened", plan.attempt, outcome))

    # -- opening (both sides) ------------------------------------------------------

    async def _open(self, peer: bytes, plan: Open) -> PeerConnection:
        """One round's direct connection, or HolePunchFailed."""
        if plan.action is Action.AWAIT:
            return await self._await_direct(peer)
        port = self._listen_port() if callable(self._listen_port) else self._listen_port
        try:
            sock = await punch_any(
                (self._bind_host, port), plan.targets, self.punch, make_socket=self._make_socket
            )
        except HolePunchFailed as exc:
            if exc.reason == "address_in_use":
                # the peer's SYN reached our listener first: it is accepting
                return await self._await_direct(peer)
            raise
        try:
            return await self.host.adopt(
                sock, initiator=plan.noise_initiator, expected=peer, via=Via.PUNCHED
            )
        except P2PError as exc:
            raise HolePunchFailed("handshake", str(exc)) from None

    async def _await_direct(self, peer: bytes) -> PeerConnection:
        """Wait for a connection the peer opens to our listener (bounded). One
        that arrives now was made by the coordination (a reversal, or the
        peer's SYN winning the simultaneous open): it is marked punched."""
        for _ in range(math.ceil(self.config.open_timeout / POLL_INTERVAL)):
            conn = self._direct(peer)
            if conn is not None:
                if conn.dialed is None and conn.via == Via.DIRECT:
                    conn.via = Via.PUNCHED
                return conn
            await asyncio.sleep(POLL_INTERVAL)
        raise HolePunchFailed("timeout", "the peer's connection did not arrive")

    async def _retire_relayed(self, peer: bytes) -> None:
        """Close the relayed connections to ``peer`` once idle (bounded wait)."""
        looks = math.ceil(self.config.idle_close_after / (POLL_INTERVAL * 20))
        for conn in list(self.host.connections_to(peer)):
            if conn.via != Via.RELAYED:
                continue
            for _ in range(looks):
                if not conn.busy:
                    break
                await asyncio.sleep(POLL_INTERVAL * 20)
            if not conn.busy and conn.is_open:
                conn.close(ConnectionClosed("replaced by a punched connection"))
                self.counters["holepunch_relayed_closed"] += 1

    # -- answering (B's side) --------------------------------------------------------

    async def _on_request(self, remote: bytes, msg: Message) -> Message:
        now = self.host.clock.now()
        if isinstance(msg, PunchConnect):
            return self._on_connect(remote, msg, now)
        if isinstance(msg, PunchSync):
            return self._on_sync(remote, msg, now)
        raise ProtocolError(f"{type(msg).__name__} is not a request")

    def _on_connect(self, remote: bytes, msg: PunchConnect, now: float) -> PunchConnectReply:
        self._forget_expired(now)
        if self._relayed(remote) is None:
            self._refuse("not_relayed")
        if self._direct(remote) is not None:
            self._refuse("already_direct")
        try:
            self._budget.admit(remote, now)
        except LimitExceeded:
            self.counters["holepunch_refused_limit"] += 1
            raise
        responder = self._responders.get(remote)
        if responder is None:
            responder = PunchResponder(self.config, self.addresses(), self._is_public())
            self._responders[remote] = responder
        try:
            reply = responder.on_connect(msg, now)
        except ProtocolError:
            self._drop_responder(remote)
            self._refuse("no_usable_address")
        finally:
            self._count_rejected(responder.rejected)
        return reply

    def _on_sync(self, remote: bytes, msg: PunchSync, now: float) -> PunchSyncAck:
        responder = self._responders.get(remote)
        if responder is None:
            self._refuse("unexpected_sync")
        try:
            plan = responder.on_sync(msg, now)
        except ProtocolError:
            self._drop_responder(remote)
            self._refuse("unexpected_sync")
        self.counters["holepunch_rounds"] += 1
        self._tasks.spawn(self._respond_open(remote, plan), "respond-open")
        return PunchSyncAck()

    async def _respond_open(self, remote: bytes, plan: Open) -> None:
        try:
            await self._open(remote, plan)
        except HolePunchFailed as exc:
            self.counters[f"holepunch_round_failed_{exc.reason}"] += 1
        else:
            self.counters["holepunch_successes"] += 1
        finally:
            if self._responders.get(remote) is not None and self._responders[remote].expired(
                self.host.clock.now()
            ):
                self._drop_responder(remote)

    def _refuse(self, why: str) -> NoReturn:
        self.counters[f"holepunch_refused_{why}"] += 1
        raise ProtocolError(f"hole punch refused: {why.replace('_', ' ')}")

    def _drop_responder(self, peer: bytes) -> None:
        self._responders.pop(peer, None)
        self._budget.release(peer)

    def _forget_expired(self, now: float) -> None:
        for peer, responder in list(self._responders.items()):
            if responder.expired(now):
                self._drop_responder(peer)

    # -- helpers -----------------------------------------------------------

    def _is_public(self) -> bool:
        return self._reachability() is Reachability.PUBLIC

    def _relayed(self, peer: bytes) -> PeerConnection | None:
        for conn in self.host.connections_to(peer):
            if conn.via == Via.RELAYED:
                return conn
        return None

    def _direct(self, peer: bytes) -> PeerConnection | None:
        for conn in self.host.connections_to(peer):
            if conn.via != Via.RELAYED:
                return conn
        return None

    def _count_rejected(self, rejected: dict[str, int]) -> None:
        for why, n in rejected.items():
            self.counters[f"holepunch_addr_rejected_{why}"] += n
        rejected.clear()
