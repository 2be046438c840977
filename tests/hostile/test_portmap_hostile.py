"""A hostile host on the node's LAN answers its SSDP search with a LOCATION that
points somewhere else (here: a web server on a public lab host). The port mapper
must not fetch it (SSRF through UPnP discovery): it only follows a LOCATION on
the host that answered. Lab test (netns, root); fails without
``portmap_upnp.followable``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from p2pnode.sim.netlab import Lab
from tests.conftest import needs_lab

pytestmark = needs_lab

# Joins the SSDP group on the LAN and answers every M-SEARCH, once ready.
ROGUE_SSDP = """
import socket, struct, sys
target = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 1900))
group = struct.pack("4s4s", socket.inet_aton("239.255.255.250"), socket.inet_aton("0.0.0.0"))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
print("ready", flush=True)
while True:
    data, sender = s.recvfrom(2048)
    if not data.startswith(b"M-SEARCH"):
        continue
    answer = (
        "HTTP/1.1 200 OK\\r\\nCACHE-CONTROL: max-age=120\\r\\n"
        "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\\r\\n"
        "USN: uuid:00000000-0000-0000-0000-000000000001::urn:schemas-upnp-org:device:"
        "InternetGatewayDevice:1\\r\\nEXT:\\r\\nSERVER: x UPnP/1.1 y\\r\\n"
        f"LOCATION: http://{target}/rootDesc.xml\\r\\n\\r\\n"
    )
    s.sendto(answer.encode(), sender)
"""

# Counts the requests it gets (and answers 404); prints the count when told.
WEB = """
import http.server, sys, threading
hits = []
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        hits.append(self.path)
        self.send_response(404)
        self.end_headers()
    def log_message(self, *a):
        pass
server = http.server.HTTPServer(("0.0.0.0", 8080), H)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()
print(len(hits), flush=True)
"""

# The port mapper alone, UPnP only: one attempt, then its counters.
MAPPER = """
import asyncio, json
from p2pnode.nat.portmap import PortMapper
from p2pnode.nat.portmap_core import PortMapConfig

async def main():
    config = PortMapConfig(methods=("upnp",), discovery_timeout=1.5, request_timeout=1.0)
    mapper = PortMapper(config, 4001)
    mapper.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while not mapper.stats().get("attempts_failed") and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await mapper.close()
    print(json.dumps(mapper.stats()), flush=True)

asyncio.run(main())
"""


def test_an_ssdp_answer_pointing_elsewhere_is_not_fetched(lab: Lab, tmp_path: Path) -> None:
    net = lab.public_bridge("203.0.113.0/24")
    web_host = lab.host("web", on=net)
    router = lab.router("r", wan=net, lan="100.64.1.0/24", nat="eim")
    rogue = lab.host("rogue", behind=router)
    victim = lab.host("c", behind=router)

    web = lab.spawn(web_host, [sys.executable, "-c", WEB], stdin=-1)
    ssdp = lab.spawn(rogue, [sys.executable, "-c", ROGUE_SSDP, f"{web_host.address}:8080"])
    for proc in (web, ssdp):
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"  # bounded: prints or dies

    mapper = lab.run(victim, [sys.executable, "-c", MAPPER], timeout=30)
    stats = json.loads(mapper.stdout.splitlines()[-1])
    hits, _ = web.communicate("count\n", timeout=10)
    assert hits.strip() == "0", f"the node fetched the LOCATION a stranger gave it: {stats}"
    assert stats["attempts_failed"] == 1, stats
    assert stats["upnp_dropped_location"] >= 1, stats  # the rogue did answer
