"""The asyncio shell around :class:`~p2pnode.dht.core.DhtCore`.

:class:`DhtProtocol` is an ``asyncio.DatagramProtocol`` that only moves bytes and
time: each datagram goes into the core with the clock's ``now``, whatever the core
wants sent goes to the transport, call outcomes resolve the callers' futures, and
one timer is armed at ``core.next_deadline()``. Of the transport it uses only
``sendto``, ``close``, ``is_closing`` and ``get_extra_info("sockname")``, so a
simulated network can stand in for the socket.

The ``call_*`` methods return typed results or ``None`` (no answer, a malformed
one, an unroutable address, or the DHT closed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from kademlia.node import Node

from p2pnode.clock import Clock
from p2pnode.dht.core import CallAnswered, CallFailed, DhtCore, Event
from p2pnode.dht.records import ProviderRecord
from p2pnode.dht.rpc_schema import FoundValue, IdentifyAnswer, Value, is_port, normalize_host
from p2pnode.dht.storage import ProviderStore, ValueStore
from p2pnode.dht.table import RoutingTable

log = logging.getLogger(__name__)


class DhtProtocol(asyncio.DatagramProtocol):
    def __init__(self, core: DhtCore, clock: Clock) -> None:
        self.core = core
        self.clock = clock
        self.transport: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._futures: dict[int, asyncio.Future[object]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._closing = False
        self._lost = asyncio.Event()
        # Told of the core's other events (observed addresses, dial-back nonces).
        self.listeners: list[Callable[[Event], None]] = []

    # -- what Discovery and tests look at --------------------------------------------

    @property
    def router(self) -> RoutingTable:
        return self.core.table

    @property
    def storage(self) -> ValueStore:
        return self.core.storage

    @property
    def providers(self) -> ProviderStore:
        return self.core.providers

    @property
    def srtt(self) -> float | None:
        return self.core.srtt

    @srtt.setter
    def srtt(self, value: float | None) -> None:
        self.core.srtt = value

    def snapshot(self) -> dict[str, int]:
        return self.core.snapshot()

    def last_seen(self, node_id: bytes) -> float | None:
        return self.core.last_seen(node_id)

    def failures(self, node_id: bytes) -> int:
        return self.core.failures(node_id)

    def get_refresh_ids(self) -> list[bytes]:
        return self.core.refresh_ids(self.clock.now())

    # -- transport -------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        sockname = transport.get_extra_info("sockname")
        if sockname and ":" in str(sockname[0]):
            self.core.ipv6_socket = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost.set()

    def error_received(self, exc: Exception) -> None:
        self.core.stats["socket_errors"] += 1
        log.debug("DHT socket error: %s", exc)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.core.receive_datagram(data, addr, self.clock.now())
        self._flush()

    def _flush(self) -> None:
        """Send what the core wants sent, settle calls, re-arm the timer."""
        core = self.core
        out = core.datagrams_to_send()
        if out and not self._closing and self.transport is not None:
            sendto = self.transport.sendto
            for data, target in out:
                sendto(data, target)
        for event in core.events():
            if isinstance(event, CallAnswered):
                self._settle(event.call_id, event.result)
            elif isinstance(event, CallFailed):
                self._settle(event.call_id, None)
            else:
                for listener in self.listeners:
                    listener(event)
        deadline = core.next_deadline()
        # An earlier timer stays: it wakes, finds nothing due, and re-arms.
        if deadline is not None and deadline < self._timer_at and self._loop is not None:
            if self._timer is not None:
                self._timer.cancel()
            delay = max(0.0, deadline - self.clock.now())
            self._timer = self._loop.call_later(delay, self._on_timer)
            self._timer_at = deadline

    def _settle(self, call_id: int, result: object) -> None:
        future = self._futures.pop(call_id, None)
        if future is not None and not future.done():
            future.set_result(result)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if self._closing:
            return
        self.core.handle_timer(self.clock.now())
        self._flush()

    async def close(self, timeout: float = 2.0) -> None:
        """End every call in flight (None) and close the transport."""
        if self._closing:
            return
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.core.close()
        self._flush()
        for future in self._futures.values():
            if not future.done():
                future.set_result(None)
        self._futures.clear()
        if self.transport is not None:
            self.transport.close()
            try:
                async with asyncio.timeout(timeout):
                    await self._lost.wait()
            except TimeoutError:
                log.debug("DHT transport did not report closing in %ss", timeout)

    # -- calls -----------------------------------------------------------------------

    async def _call(
        self,
        address: tuple[str, int],
        rpc: str,
        args: tuple[object, ...],
        node_id: bytes | None = None,
    ) -> object:
        """The parsed answer, or None (no valid answer, or closed)."""
        if self._closing or self.transport is None or self._loop is None:
            return None
        call_id = self.core.start_call(address, rpc, args, self.clock.now(), node_id=node_id)
        future: asyncio.Future[object] = self._loop.create_future()
        self._futures[call_id] = future
        self._flush()
        try:
            return await future
        except asyncio.CancelledError:
            # A cancelled call is forgotten: no timeout is counted against the node.
            self._futures.pop(call_id, None)
            self.core.cancel_call(call_id)
            raise

    async def ping_address(
        self, host: str, port: int, expected: bytes | None = None
    ) -> bytes | None:
        """Ping an address; the node id that answered, or None."""
        clean = normalize_host(host)
        if clean is None or not is_port(port):
            return None
        answer = await self._call((clean, port), "ping", (), expected)
        return answer if isinstance(answer, bytes) else None

    async def call_ping(self, node_to_ask: Node) -> bytes | None:
        return await self.ping_address(node_to_ask.ip, node_to_ask.port, node_to_ask.id)

    async def call_store(
        self, node_to_ask: Node, key: bytes, value: Value, token: bytes | None = None
    ) -> bool | None:
        """True stored, False refused, None no (valid) answer. Without a token this
        is a stock kademlia store (other p2pnode nodes refuse it)."""
        args: tuple[object, ...] = (key, value) if token is None else (key, value, token)
        answer = await self._call((node_to_ask.ip, node_to_ask.port), "store", args, node_to_ask.id)
        return answer if isinstance(answer, bool) else None

    async def call_identify(
        self, node_to_ask: Node, mode: str | None = None
    ) -> IdentifyAnswer | None:
        """The node's proof of its id, checked by the core (None: no valid proof).
        ``mode``: tell it ours (we switched: it proves us again)."""
        args: tuple[object, ...] = () if mode is None else (mode,)
        answer = await self._call(
            (node_to_ask.ip, node_to_ask.port), "identify", args, node_to_ask.id
        )
        return answer if isinstance(answer, IdentifyAnswer) else None

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> list[Node] | None:
        answer = await self._call(
            (node_to_ask.ip, node_to_ask.port), "find_node", (node_to_find.id,), node_to_ask.id
        )
        return answer if isinstance(answer, list) else None

    async def call_find_value(
        self, node_to_ask: Node, node_to_find: Node
    ) -> FoundValue | list[Node] | None:
        answer = await self._call(
            (node_to_ask.ip, node_to_ask.port), "find_value", (node_to_find.id,), node_to_ask.id
        )
        return answer if isinstance(answer, FoundValue | list) else None

    async def call_add_provider(
        self, node_to_ask: Node, key: bytes, record: ProviderRecord, token: bytes
    ) -> bool | None:
        answer = await self._call(
            (node_to_ask.ip, node_to_ask.port),
            "add_provider",
            (key, record.to_wire(), token),
            node_to_ask.id,
        )
        return answer if isinstance(answer, bool) else None

    async def call_get_providers(
        self, node_to_ask: Node, key: bytes
    ) -> tuple[list[ProviderRecord], list[Node], bytes] | None:
        """(verified records, closer nodes, a token for our writes to it), or None."""
        answer = await self._call(
            (node_to_ask.ip, node_to_ask.port), "get_providers", (key,), node_to_ask.id
        )
        if not isinstance(answer, tuple):
            return None
        return cast(tuple[list[ProviderRecord], list[Node], bytes], answer)
