"""The UPnP client's own parts (p2pnode/nat/portmap_upnp.py): which SSDP answers
it follows, and where it reads a reserved port."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from async_upnp_client.const import HttpResponse

from p2pnode.nat.portmap_upnp import _LastBodies, followable


@pytest.mark.parametrize(
    ("location", "sender", "ok"),
    [
        ("http://100.64.1.1:5000/rootDesc.xml", "100.64.1.1", True),
        ("http://100.64.1.1/rootDesc.xml", "100.64.1.1", True),
        # Someone on the LAN pointing the node at another host, or at anything.
        ("http://203.0.113.9:80/x.xml", "100.64.1.1", False),
        ("http://127.0.0.1:8080/admin", "100.64.1.1", False),
        ("file:///etc/passwd", "100.64.1.1", False),
        ("https://100.64.1.1/rootDesc.xml", "100.64.1.1", False),
        ("http://100.64.1.1:99999/rootDesc.xml", "100.64.1.1", False),
        ("http://100.64.1.1:5000/rootDesc.xml", "", False),
        ("", "100.64.1.1", False),
    ],
)
def test_only_the_answering_host_is_fetched(location: str, sender: str, ok: bool) -> None:
    assert followable(location, sender) is ok


def test_the_reserved_port_is_read_from_the_answer_body() -> None:
    """miniupnpd 2.3.1 answers NewReservedPort without declaring it; the library
    drops it, so it is read from the body (tests/integration/test_portmap_lab.py
    shows it against the real daemon)."""
    bodies = _LastBodies()
    action = SimpleNamespace(name="AddAnyPortMapping")
    body = (
        '<?xml version="1.0"?>\r\n<s:Envelope><s:Body><u:AddAnyPortMappingResponse '
        'xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:2"><NewReservedPort>40124'
        "</NewReservedPort></u:AddAnyPortMappingResponse></s:Body></s:Envelope>\r\n"
    )
    bodies.keep(action, HttpResponse(200, {}, body))  # type: ignore[arg-type]
    assert bodies.reserved_port() == 40124
    other = SimpleNamespace(name="GetExternalIPAddress")
    bodies.keep(other, HttpResponse(200, {}, "<NewReservedPort>1</NewReservedPort>"))  # type: ignore[arg-type]
    assert bodies.reserved_port() == 40124  # only AddAnyPortMapping answers count
    assert _LastBodies().reserved_port() is None
