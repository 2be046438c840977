"""Port mapping on the home router: the asyncio shell around
:class:`~p2pnode.nat.portmap_core.PortMapCore`.

At start a background task discovers a gateway, UPnP-IGD
(:mod:`~p2pnode.nat.portmap_upnp`) and PCP (:mod:`~p2pnode.nat.portmap_pcp`, or
NAT-PMP, :mod:`~p2pnode.nat.portmap_natpmp`, on a router that only speaks that)
at once, the first that answers wins, and maps the node's TCP and UDP port
(the same external port when the router allows, else what it gives). Start
never waits for it. The core says when to renew and when to try again; no
router is the normal case: logged once at info, counted, retried with backoff.
:meth:`PortMapper.close` removes the mappings (bounded in time).

``on_change(callback)``: called with the external (ip, port) of the TCP
mapping when it appears or changes, and with None when it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from p2pnode.errors import PortMappingError
from p2pnode.nat.portmap_core import (
    ActionKind,
    Lease,
    Method,
    PortMapConfig,
    PortMapCore,
    Proto,
    behind_another_nat,
)
from p2pnode.nat.portmap_natpmp import NatPmpGateway, PmpChannel, default_gateway
from p2pnode.nat.portmap_pcp import PcpGateway, UnsupportedVersion
from p2pnode.tasks import TaskSet

log = logging.getLogger(__name__)

Address = tuple[str, int]
ChangeCallback = Callable[[Address | None], None]


class Gateway(Protocol):
    method_name: str
    local_ip: str
    external_ip: str

    async def add(
        self, proto: Proto, internal_port: int, external_port: int, lifetime: int
    ) -> tuple[str, int, int]: ...

    async def remove(self, proto: Proto, internal_port: int, external_port: int) -> None: ...

    def close(self) -> None: ...


class PortMapper:
    def __init__(self, config: PortMapConfig, port: int) -> None:
        self.config = config
        self.port = port
        self._core = PortMapCore(config, port)
        self._counters: Counter[str] = Counter()
        self._gateway: Gateway | None = None
        self._method: Method | None = None
        self._callbacks: list[ChangeCallback] = []
        self._notified: Address | None = None
        self._tasks = TaskSet("portmap")
        self._logged_failure = False
        self.first_mapped_after: float | None = None  # seconds from start, for reports
        self._started_at = 0.0
        # Granted by an attempt still running (not yet in the core): removed too
        # if close() cancels the attempt.
        self._partial: list[Lease] = []

    # -- lifecycle -----------------------------------------------------------------

    def on_change(self, callback: ChangeCallback) -> None:
        """Call ``callback(address or None)`` when the mapped TCP address changes."""
        self._callbacks.append(callback)

    def start(self) -> None:
        """Start mapping in the background; returns at once."""
        self._started_at = asyncio.get_running_loop().time()
        self._tasks.spawn(self._run(), "run")

    async def close(self) -> None:
        """End the background work and remove the mappings (at most
        ``remove_timeout`` seconds)."""
        await self._tasks.close()
        leases = self._core.stop() + self._partial
        self._partial = []
        gateway, self._gateway = self._gateway, None
        if gateway is not None:
            try:
                async with asyncio.timeout(self.config.remove_timeout):
                    for lease in leases:
                        await self._remove(gateway, lease)
            except TimeoutError:
                self._counters["removals_timed_out"] += 1
                log.info("port mapping: the router did not confirm the removal in time")
            gateway.close()
        self._notify()

    async def _remove(self, gateway: Gateway, lease: Lease) -> None:
        try:
            await gateway.remove(lease.proto, lease.internal_port, lease.external_port)
        except PortMappingError as exc:
            self._counters["removals_failed"] += 1
            log.info("port mapping: cannot remove %s %s: %s", lease.proto, lease.external_port, exc)
            return
        self._counters["removals"] += 1
        log.debug("port mapping: removed %s %d", lease.proto, lease.external_port)

    # -- the loop --------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._core.start(loop.time())
        while True:
            for action in self._core.due(loop.time()):
                if action.kind is ActionKind.ATTEMPT:
                    await self._attempt()
                elif action.lease is not None:
                    await self._renew(action.lease)
            self._notify()
            deadline = self._core.next_deadline()
            if deadline is None:
                await asyncio.Event().wait()  # nothing planned: until close() cancels
            else:
                await asyncio.sleep(max(0.0, deadline - loop.time()))

    async def _attempt(self) -> None:
        loop = asyncio.get_running_loop()
        if self._gateway is not None:  # a new attempt after all leases were lost
            self._gateway.close()
            self._gateway = None
        found = await self._discover()
        if found is None:
            self._core.attempt_failed(loop.time())
            return
        method, gateway = found
        self._gateway, self._method = gateway, method
        leases = self._partial
        for proto in (Proto.TCP, Proto.UDP):
            try:
                ip, port, lifetime = await gateway.add(
                    proto, self.port, self.port, self.config.lease
                )
            except PortMappingError as exc:
                self._counters[f"map_failed_{proto}"] += 1
                log.info("port mapping: %s refused %s %d: %s", method, proto, self.port, exc)
                continue
            lease = Lease(proto, method, self.port, ip, port, lifetime, loop.time())
            leases.append(lease)
            log.info(
                "port mapping: %s %d -> %s:%d via %s (lease %s)",
                proto,
                self.port,
                ip,
                port,
                gateway.method_name,
                f"{lifetime} s" if lifetime else "permanent",
            )
        self._partial = []
        if not leases:
            gateway.close()
            self._gateway = None
            self._core.attempt_failed(loop.time())
            return
        if self.first_mapped_after is None:
            self.first_mapped_after = loop.time() - self._started_at
        if any(behind_another_nat(lease.external_ip) for lease in leases):
            log.info(
                "port mapping: the router's own address %s is private (a NAT behind a NAT):"
                " the mapping does not reach the internet",
                leases[0].external_ip,
            )
        self._core.attempt_done(loop.time(), leases)

    async def _discover(self) -> tuple[Method, Gateway] | None:
        """Ask UPnP and PCP/NAT-PMP at once; the first gateway that answers."""
        methods = self.config.methods
        openers = []
        if Method.UPNP in methods:
            openers.append(self._open_upnp())
        if Method.PCP in methods or Method.NATPMP in methods:
            openers.append(self._open_pmp())
        tasks = [asyncio.ensure_future(opener) for opener in openers]
        reasons: list[str] = []
        chosen: tuple[Method, Gateway] | None = None
        try:
            pending = set(tasks)
            bound = self.config.discovery_timeout + self.config.request_timeout
            async with asyncio.timeout(bound):
                while pending and chosen is None:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        exc = task.exception()
                        if exc is None and chosen is None:
                            chosen = task.result()
                        elif exc is None:
                            task.result()[1].close()
                        elif isinstance(exc, PortMappingError):
                            reasons.append(str(exc))
                        else:
                            raise exc
        except TimeoutError:
            reasons.append(f"discovery took over {bound} s")
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, PortMappingError):
                    _, gateway = await task
                    if chosen is None or gateway is not chosen[1]:
                        gateway.close()
        if chosen is None:
            self._counters["no_gateway"] += 1
            if not self._logged_failure:
                self._logged_failure = True
                why = "; ".join(reasons)
                log.info("port mapping: no router answered (%s); retrying later", why)
            else:
                log.debug("port mapping: no router answered (%s)", "; ".join(reasons))
            return None
        self._counters[f"gateway_{chosen[0]}"] += 1
        return chosen

    async def _open_upnp(self) -> tuple[Method, Gateway]:
        # Imported when used: async-upnp-client costs tens of ms to import, which
        # nodes on loopback (tests, simulations) need not pay.
        from p2pnode.nat.portmap_upnp import UpnpGateway

        gateway = await UpnpGateway.open(
            self.config.discovery_timeout, self.config.request_timeout, self._counters
        )
        return Method.UPNP, gateway

    async def _open_pmp(self) -> tuple[Method, Gateway]:
        """PCP, or NAT-PMP when the router only speaks that (or PCP is off)."""
        address = default_gateway()
        if address is None:
            raise PortMappingError("NAT-PMP/PCP: no default gateway")
        channel = await self._pmp_channel(address)
        if Method.PCP in self.config.methods:
            try:
                return Method.PCP, await PcpGateway.over(channel)
            except UnsupportedVersion:
                self._counters["pcp_unsupported"] += 1
                if Method.NATPMP not in self.config.methods:
                    channel.close()
                    raise
            except BaseException:
                channel.close()
                raise
        return Method.NATPMP, await NatPmpGateway.over(channel)

    async def _pmp_channel(self, address: str) -> PmpChannel:
        """The UDP channel to the gateway's port 5351 (tests point it elsewhere)."""
        return await PmpChannel.open(address, self.config.discovery_timeout, self._counters)

    async def _renew(self, lease: Lease) -> None:
        loop = asyncio.get_running_loop()
        gateway = self._gateway
        if gateway is None:
            self._core.renew_failed(loop.time(), lease.proto)
            return
        try:
            ip, port, lifetime = await gateway.add(
                lease.proto, lease.internal_port, lease.external_port, self.config.lease
            )
        except PortMappingError as exc:
            log.info("port mapping: renewing %s %d: %s", lease.proto, lease.external_port, exc)
            self._core.renew_failed(loop.time(), lease.proto)
            return
        now = loop.time()
        renewed = Lease(lease.proto, lease.method, lease.internal_port, ip, port, lifetime, now)
        log.debug("port mapping: renewed %s -> %s:%d (%d s)", lease.proto, ip, port, lifetime)
        self._core.renew_done(loop.time(), renewed)

    def _notify(self) -> None:
        address = self._core.external_address()
        if address == self._notified:
            return
        self._notified = address
        for callback in list(self._callbacks):
            callback(address)

    # -- views -----------------------------------------------------------------------

    @property
    def external_address(self) -> Address | None:
        return self._core.external_address()

    def stats(self) -> dict[str, int]:
        return dict(self._core.counters + self._counters)

    def status(self) -> dict[str, Any]:
        now = asyncio.get_running_loop().time()
        return {
            "enabled": True,
            "method": self._method.value if self._core.leases and self._method else None,
            "external": self._notified and f"{self._notified[0]}:{self._notified[1]}",
            # The router is itself behind a NAT: the mapping reaches its WAN only.
            "double_nat": bool(self._notified and behind_another_nat(self._notified[0])),
            "mappings": self._core.snapshot(now),
            "next_attempt_in": self._core.next_attempt_in(now),
            # Seconds from start to the first mapping (None: none yet).
            "mapped_after": None
            if self.first_mapped_after is None
            else round(self.first_mapped_after, 3),
        }
