"""UPnP-IGD port mapping through ``async-upnp-client``.

Library choice: ``async-upnp-client`` (Home Assistant's UPnP stack, asyncio and
aiohttp like the node, typed, released often). ``miniupnpc`` is a C extension
with blocking calls (a thread per call), ``upnpclient`` is blocking
(requests + lxml), ``aioupnp`` is asyncio but unmaintained since 2020. We use
the library for SSDP, the device description and SOAP; the IGD calls go
through the WANIPConnection service's actions directly, because its
``IgdDevice.async_add_port_mapping`` sends ``0.0.0.0`` as the remote host
(a filter on that source for some routers) and skips silently when the
action is missing.

Trust: an SSDP answer can come from anyone on the LAN; its LOCATION is only
followed when it points at the host that sent the answer (no fetching of
arbitrary URLs on a stranger's say-so).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import secrets
import socket
from collections import Counter
from typing import Any
from urllib.parse import urlparse

import aiohttp
from async_upnp_client.aiohttp import AiohttpRequester
from async_upnp_client.client import UpnpAction, UpnpService, default_on_post_call_action
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.const import HttpResponse
from async_upnp_client.exceptions import UpnpActionError, UpnpError
from async_upnp_client.search import SsdpSearchListener

from p2pnode.errors import PortMappingError
from p2pnode.nat.portmap_core import Proto

SEARCH_TARGET = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
SERVICES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
# UPnP error codes (IGD WANIPConnection spec).
CONFLICT = 718  # ConflictInMappingEntry: the port is someone else's
ONLY_PERMANENT = 725  # OnlyPermanentLeasesSupported
RESERVED_PORT = re.compile(r"<(?:[\w-]+:)?NewReservedPort>\s*(\d{1,5})\s*</")
MAX_BODY = 4096  # an AddAnyPortMapping answer is a few hundred bytes
CONFLICT_RETRIES = 3  # random ports tried on an IGDv1 router when ours is taken
SEARCH_INTERVAL = 1.0  # M-SEARCH again while waiting (UDP may be lost)
DESCRIPTION = "p2pnode"


def followable(location: str, sender: str) -> bool:
    """Whether an SSDP answer's LOCATION may be fetched: plain http to the very
    host that answered (an IGD serves its own description)."""
    try:
        url = urlparse(location)
        return url.scheme == "http" and bool(sender) and url.hostname == sender and url.port != 0
    except ValueError:  # a bad port
        return False


async def search(timeout: float, counters: Counter[str]) -> str:
    """The description URL of the first IGD that answers an SSDP search."""
    loop = asyncio.get_running_loop()
    found: asyncio.Future[str] = loop.create_future()

    def answer(headers: Any) -> None:
        location = str(headers.get("location", ""))
        sender = str(headers.get("_remote_addr", ("",))[0])
        if not followable(location, sender):
            counters["upnp_dropped_location"] += 1
            return
        if not found.done():
            found.set_result(location)

    listener = SsdpSearchListener(
        callback=answer, loop=loop, search_target=SEARCH_TARGET, timeout=1
    )
    try:
        await listener.async_start()
    except (OSError, UpnpError) as exc:
        raise PortMappingError(f"UPnP: cannot search: {exc}") from None
    try:
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            with contextlib.suppress(OSError):
                listener.async_search()
            done, _ = await asyncio.wait([found], timeout=min(SEARCH_INTERVAL, left))
            if done:
                return found.result()
    finally:
        listener.async_stop()
        found.cancel()
    raise PortMappingError(f"UPnP: no gateway answered in {timeout} s")


class _LastBodies:
    """Keeps the last AddAnyPortMapping answer: miniupnpd 2.3.1 answers with
    NewReservedPort, but its service description does not declare it, and the
    library (non-strict) drops undeclared answers. Read from the body then."""

    def __init__(self) -> None:
        self.add_any = ""

    def keep(self, action: UpnpAction, response: HttpResponse) -> HttpResponse:
        response = default_on_post_call_action(action, response)
        if action.name == "AddAnyPortMapping":
            self.add_any = str(response.body or "")[:MAX_BODY]
        return response

    def reserved_port(self) -> int | None:
        found = RESERVED_PORT.search(self.add_any)
        return int(found.group(1)) if found else None


def _local_ip_towards(host: str) -> str:
    """The address of ours the router sees (the interface routing to it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, 1900))  # UDP connect: no packet sent
        return str(sock.getsockname()[0])


class UpnpGateway:
    """An IGD's WANIPConnection (or WANPPPConnection) service."""

    method_name = "UPnP"

    def __init__(
        self, service: UpnpService, local_ip: str, timeout: float, counters: Counter[str]
    ) -> None:
        self._service = service
        self.local_ip = local_ip
        self._timeout = timeout
        self.counters = counters
        self.external_ip = ""
        self._permanent_only = False
        self._bodies = _LastBodies()

    @classmethod
    async def open(
        cls, discovery_timeout: float, request_timeout: float, counters: Counter[str]
    ) -> UpnpGateway:
        location = await search(discovery_timeout, counters)
        host = urlparse(location).hostname or ""
        requester = AiohttpRequester(timeout=max(1, round(request_timeout)))
        bodies = _LastBodies()
        factory = UpnpFactory(requester, non_strict=True, on_post_call_action=bodies.keep)
        try:
            device = await asyncio.wait_for(factory.async_create_device(location), request_timeout)
        except (UpnpError, TimeoutError, ValueError, KeyError, aiohttp.ClientError) as exc:
            # ValueError: defusedxml's refusals (entities, DTDs) among others.
            what = f"{type(exc).__name__}: {exc}"
            raise PortMappingError(f"UPnP: bad device description at {location}: {what}") from None
        by_type = {s.service_type: s for s in device.all_services}
        service = next((by_type[t] for t in SERVICES if t in by_type), None)
        if service is None or not service.has_action("AddPortMapping"):
            raise PortMappingError(f"UPnP: {location} offers no WAN connection service")
        try:
            local_ip = _local_ip_towards(host)
        except OSError as exc:
            raise PortMappingError(f"UPnP: no route to {host}: {exc}") from None
        gateway = cls(service, local_ip, request_timeout, counters)
        gateway._bodies = bodies
        gateway.external_ip = await gateway._external_ip()
        return gateway

    async def _call(self, action: str, **args: Any) -> Any:
        try:
            return await asyncio.wait_for(
                self._service.action(action).async_call(**args), self._timeout
            )
        except UpnpActionError as exc:
            raise PortMappingError(
                f"UPnP {action}: {exc.error_desc or exc} ({exc.error_code})", code=exc.error_code
            ) from None
        except (UpnpError, TimeoutError, KeyError, ValueError, aiohttp.ClientError) as exc:
            raise PortMappingError(f"UPnP {action}: {type(exc).__name__}: {exc}") from None

    async def _external_ip(self) -> str:
        reply = await self._call("GetExternalIPAddress")
        text = str(reply.get("NewExternalIPAddress") or "")
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise PortMappingError(f"UPnP: bad external address {text!r}") from None

    async def add(
        self, proto: Proto, internal_port: int, external_port: int, lifetime: int
    ) -> tuple[str, int, int]:
        """Map (or renew); the external address, port and lifetime granted. Tries
        the same port; when it is someone else's, AddAnyPortMapping (IGDv2) picks
        one, or (IGDv1) a few random ports are tried."""
        lease = 0 if self._permanent_only else lifetime
        args = {
            "NewRemoteHost": "",
            "NewExternalPort": external_port,
            "NewProtocol": proto.value.upper(),
            "NewInternalPort": internal_port,
            "NewInternalClient": self.local_ip,
            "NewEnabled": True,
            "NewPortMappingDescription": DESCRIPTION,
            "NewLeaseDuration": lease,
        }
        try:
            await self._call("AddPortMapping", **args)
        except PortMappingError as exc:
            if exc.code == ONLY_PERMANENT and lease:
                self._permanent_only = True
                return await self.add(proto, internal_port, external_port, lifetime)
            if exc.code != CONFLICT:
                raise
            self.counters["upnp_port_taken"] += 1
            external_port = await self._add_elsewhere(args)
        with contextlib.suppress(PortMappingError):
            self.external_ip = await self._external_ip()
        return self.external_ip, external_port, lease

    async def _add_elsewhere(self, args: dict[str, Any]) -> int:
        """Map on another external port; the one the router took."""
        if self._service.has_action("AddAnyPortMapping"):
            reply = await self._call("AddAnyPortMapping", **args)
            port = int(reply.get("NewReservedPort") or self._bodies.reserved_port() or 0)
            if not 0 < port < 65536:
                raise PortMappingError("UPnP AddAnyPortMapping: no port reserved")
            return port
        error = PortMappingError("UPnP: no free external port")
        for _ in range(CONFLICT_RETRIES):
            port = 1024 + secrets.randbelow(65536 - 1024)
            try:
                await self._call("AddPortMapping", **{**args, "NewExternalPort": port})
            except PortMappingError as exc:
                if exc.code != CONFLICT:
                    raise
                error = exc
                continue
            return port
        raise error

    async def remove(self, proto: Proto, internal_port: int, external_port: int) -> None:
        await self._call(
            "DeletePortMapping",
            NewRemoteHost="",
            NewExternalPort=external_port,
            NewProtocol=proto.value.upper(),
        )

    def close(self) -> None:
        """Nothing held: the requester opens a session per call."""
