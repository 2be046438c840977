"""Which SSDP answers the UPnP client follows (p2pnode/nat/portmap_upnp.py)."""

from __future__ import annotations

import pytest

from p2pnode.nat.portmap_upnp import followable


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
