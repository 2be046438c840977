"""The UPnP-IGD client and the port mapper against a fake IGD on 127.0.0.1
(aiohttp, port 0): the behaviours of routers that miniupnpd in the lab does not
show (permanent leases only, IGDv1 with the port taken, a broken description).
SSDP is skipped: ``portmap_upnp.search`` is pointed at the fake."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from p2pnode.nat import portmap_upnp
from p2pnode.nat.portmap import PortMapper
from p2pnode.nat.portmap_core import Method, PortMapConfig
from tests.helpers import eventually

WANIP = "urn:schemas-upnp-org:service:WANIPConnection:1"

DESCRIPTION = f"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
  <specVersion><major>1</major><minor>0</minor></specVersion>
  <device>
    <deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
    <friendlyName>fake</friendlyName><manufacturer>x</manufacturer><modelName>x</modelName>
    <UDN>uuid:00000000-0000-0000-0000-000000000002</UDN>
    <serviceList><service>
      <serviceType>{WANIP}</serviceType>
      <serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
      <SCPDURL>/scpd.xml</SCPDURL><controlURL>/ctl</controlURL><eventSubURL>/evt</eventSubURL>
    </service></serviceList>
  </device>
</root>"""


def _action(name: str, args: list[tuple[str, str, str]]) -> str:
    listed = "".join(
        f"<argument><name>{arg}</name><direction>{direction}</direction>"
        f"<relatedStateVariable>{var}</relatedStateVariable></argument>"
        for arg, direction, var in args
    )
    return f"<action><name>{name}</name><argumentList>{listed}</argumentList></action>"


_MAPPING_ARGS = [
    ("NewRemoteHost", "in", "RemoteHost"),
    ("NewExternalPort", "in", "ExternalPort"),
    ("NewProtocol", "in", "PortMappingProtocol"),
]
_VARIABLES = {
    "ExternalIPAddress": "string",
    "RemoteHost": "string",
    "ExternalPort": "ui2",
    "PortMappingProtocol": "string",
    "InternalPort": "ui2",
    "InternalClient": "string",
    "PortMappingEnabled": "boolean",
    "PortMappingDescription": "string",
    "PortMappingLeaseDuration": "ui4",
}
SCPD = (
    '<?xml version="1.0"?><scpd xmlns="urn:schemas-upnp-org:service-1-0">'
    "<specVersion><major>1</major><minor>0</minor></specVersion><actionList>"
    + _action("GetExternalIPAddress", [("NewExternalIPAddress", "out", "ExternalIPAddress")])
    + _action(
        "AddPortMapping",
        [
            *_MAPPING_ARGS,
            ("NewInternalPort", "in", "InternalPort"),
            ("NewInternalClient", "in", "InternalClient"),
            ("NewEnabled", "in", "PortMappingEnabled"),
            ("NewPortMappingDescription", "in", "PortMappingDescription"),
            ("NewLeaseDuration", "in", "PortMappingLeaseDuration"),
        ],
    )
    + _action("DeletePortMapping", _MAPPING_ARGS)
    + "</actionList><serviceStateTable>"
    + "".join(
        f'<stateVariable sendEvents="no"><name>{name}</name><dataType>{kind}</dataType>'
        "</stateVariable>"
        for name, kind in _VARIABLES.items()
    )
    + "</serviceStateTable></scpd>"
)


def _fault(code: int, text: str) -> web.Response:
    body = (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
        "<s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>"
        '<detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>{text}</errorDescription>"
        "</UPnPError></detail></s:Fault></s:Body></s:Envelope>"
    )
    return web.Response(status=500, text=body, content_type="text/xml")


def _answer(action: str, args: str = "") -> web.Response:
    body = (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
        f'<s:Body><u:{action}Response xmlns:u="{WANIP}">{args}</u:{action}Response>'
        "</s:Body></s:Envelope>"
    )
    return web.Response(text=body, content_type="text/xml")


@dataclass
class FakeIgd:
    """``permanent_only``: refuses leases (725). ``taken``: external ports that
    belong to someone else (718). ``broken``: the description is not XML."""

    permanent_only: bool = False
    taken: set[int] = field(default_factory=set)
    broken: bool = False
    mappings: dict[tuple[str, int], int] = field(default_factory=dict)  # -> lease
    calls: list[str] = field(default_factory=list)

    async def description(self, request: web.Request) -> web.Response:
        text = "<root><unclosed>" if self.broken else DESCRIPTION
        return web.Response(text=text, content_type="text/xml")

    async def scpd(self, request: web.Request) -> web.Response:
        return web.Response(text=SCPD, content_type="text/xml")

    async def control(self, request: web.Request) -> web.Response:
        action = request.headers["SOAPAction"].strip('"').rpartition("#")[2]
        body = await request.text()
        self.calls.append(action)

        def arg(name: str) -> str:
            found = re.search(rf"<{name}>([^<]*)</{name}>", body)
            return found.group(1) if found else ""

        if action == "GetExternalIPAddress":
            return _answer(action, "<NewExternalIPAddress>198.51.100.7</NewExternalIPAddress>")
        key = (arg("NewProtocol"), int(arg("NewExternalPort")))
        if action == "DeletePortMapping":
            if self.mappings.pop(key, None) is None:
                return _fault(714, "NoSuchEntryInArray")
            return _answer(action)
        lease = int(arg("NewLeaseDuration"))
        if self.permanent_only and lease:
            return _fault(725, "OnlyPermanentLeasesSupported")
        if key[1] in self.taken:
            return _fault(718, "ConflictInMappingEntry")
        self.mappings[key] = lease
        return _answer(action)


@pytest.fixture
async def igd(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeIgd]:
    fake = FakeIgd()
    app = web.Application()
    app.router.add_get("/rootDesc.xml", fake.description)
    app.router.add_get("/scpd.xml", fake.scpd)
    app.router.add_post("/ctl", fake.control)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    async def found(timeout: float, counters: object) -> str:
        return f"http://127.0.0.1:{port}/rootDesc.xml"

    monkeypatch.setattr(portmap_upnp, "search", found)
    yield fake
    await runner.cleanup()


def upnp_mapper(lease: int = 3600) -> PortMapper:
    return PortMapper(PortMapConfig(methods=(Method.UPNP,), lease=lease), 4001)


async def test_a_router_with_permanent_leases_only(igd: FakeIgd) -> None:
    igd.permanent_only = True
    mapper = upnp_mapper(lease=1)
    mapper.start()
    try:
        await eventually(lambda: len(mapper.status()["mappings"]) == 2, timeout=10)
        assert [m["lease_remaining"] for m in mapper.status()["mappings"]] == [None, None]
        assert igd.mappings == {("TCP", 4001): 0, ("UDP", 4001): 0}
        assert mapper.external_address == ("198.51.100.7", 4001)
    finally:
        await mapper.close()
    # Never renewed (a 1 s lease would have been), removed at close all the same.
    assert "renewals" not in mapper.stats()
    assert igd.mappings == {}
    assert mapper.stats()["removals"] == 2


async def test_an_igdv1_router_with_our_port_taken_gets_another(igd: FakeIgd) -> None:
    igd.taken = {4001}
    mapper = upnp_mapper()
    mapper.start()
    try:
        await eventually(lambda: len(mapper.status()["mappings"]) == 2, timeout=10)
        address = mapper.external_address
        assert address is not None and address[1] != 4001
        assert {port for _, port in igd.mappings} - {4001}
    finally:
        await mapper.close()
    assert mapper.stats()["upnp_port_taken"] == 2
    assert igd.mappings == {}


async def test_a_broken_description_is_a_failed_attempt(igd: FakeIgd) -> None:
    igd.broken = True
    mapper = upnp_mapper()
    mapper.start()
    try:
        await eventually(lambda: mapper.stats().get("attempts_failed") == 1, timeout=10)
    finally:
        await mapper.close()
    assert mapper.status()["mappings"] == []
    assert igd.calls == []
