"""A network lab built from Linux network namespaces (root only; see DESIGN.md,
"The network-namespace lab").

Every bridge lives in a namespace of its own ("switch"), and every veth is
created directly between two lab namespaces, so the root namespace's links,
routes and firewall are never touched. Deleting the lab's namespaces deletes
everything it made. Names carry the pid, so parallel or leftover runs never
collide.

    lab = Lab()
    net = lab.public_bridge("203.0.113.0/24")
    a = lab.host("a", on=net)
    r = lab.router("r", wan=net, lan="100.64.1.0/24", nat="eim")
    c = lab.host("c", behind=r)
    lab.run(c, [sys.executable, "-c", "..."])
    lab.close()
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Literal

NatKind = Literal["eim", "symmetric", "firewall"]

# Only these ranges (documentation and shared address space), and only inside
# namespaces the lab made.
ALLOWED = tuple(
    ipaddress.IPv4Network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "100.64.0.0/10")
)
COMMAND_TIMEOUT = 20.0


def missing_tools() -> list[str]:
    """What keeps the lab from running here (empty when it can)."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("not root")
    reasons += [f"no `{tool}`" for tool in ("ip", "nft") if shutil.which(tool) is None]
    return reasons


@dataclass
class Segment:
    """An IPv4 subnet with a bridge in the namespace ``ns``; hands out addresses."""

    ns: str
    bridge: str
    network: ipaddress.IPv4Network
    _hosts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # namespaces plugged into this segment, and the routed ("firewall") LANs
    # behind routers on it: every member gets a route to every such LAN
    members: list[str] = field(default_factory=list)
    routed: list[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]] = field(default_factory=list)

    def next_address(self) -> ipaddress.IPv4Address:
        index = next(self._hosts)
        if index >= self.network.num_addresses - 1:
            raise ValueError(f"{self.network} is full")
        return self.network.network_address + index


@dataclass
class Node:
    """A lab namespace: a host or a router. ``address`` is where others reach it
    (a router's WAN address)."""

    name: str
    ns: str
    address: ipaddress.IPv4Address
    lan: Segment | None = None


class Lab:
    def __init__(self) -> None:
        self.prefix = f"l{os.getpid()}"
        self._ids = itertools.count()
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[str]] = []

    # -- building --------------------------------------------------------

    def public_bridge(self, cidr: str) -> Segment:
        network = _allowed(cidr)
        ns = self._namespace("sw")
        self._ip(ns, "link", "add", "br0", "type", "bridge")
        self._ip(ns, "link", "set", "br0", "up")
        return Segment(ns, "br0", network)

    def host(self, name: str, *, on: Segment | None = None, behind: Node | None = None) -> Node:
        """A namespace with one interface ``eth0`` on a bridge, or on a router's
        LAN, with an address and a default route through the router."""
        if (on is None) == (behind is None):
            raise ValueError("a host is either on a bridge or behind a router")
        segment = on if on is not None else behind.lan if behind is not None else None
        if segment is None:
            raise ValueError(f"{behind} has no LAN")
        ns = self._namespace(name)
        address = segment.next_address()
        self._plug(ns, "eth0", segment, address)
        if behind is not None:
            gateway = segment.network.network_address + 1
            self._ip(ns, "route", "add", "default", "via", str(gateway))
        else:
            self._join_segment(ns, segment)
        return Node(name, ns, address)

    def router(
        self,
        name: str,
        *,
        wan: Segment,
        lan: str,
        nat: NatKind = "eim",
        drop_unsolicited: bool = True,
    ) -> Node:
        """A home router: ``wan`` on the public bridge, a bridge ``lan`` for the
        hosts behind it (it takes the LAN's first address), forwarding on, and
        nftables: ``masquerade`` (keeps ports: endpoint-independent mapping),
        ``masquerade random`` (symmetric) or no NAT ("firewall": routed LAN).
        ``drop_unsolicited`` drops new inbound connections on the WAN silently,
        as home routers do (DESIGN.md: without it hole punching mostly fails)."""
        network = _allowed(lan)
        ns = self._namespace(name)
        address = wan.next_address()
        self._plug(ns, "wan", wan, address)
        self._ip(ns, "link", "add", "lan", "type", "bridge")
        gateway = f"{network.network_address + 1}/{network.prefixlen}"
        self._ip(ns, "addr", "add", gateway, "dev", "lan")
        self._ip(ns, "link", "set", "lan", "up")
        # New namespaces start with forwarding off.
        self.run(ns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        segment = Segment(ns, "lan", network)
        segment.next_address()  # the router's own .1
        self.nft(ns, _ruleset(nat, drop_unsolicited))
        self._join_segment(ns, wan)
        if nat == "firewall":
            # a routed LAN: the rest of the public segment needs a route to it
            wan.routed.append((network, address))
            for member in wan.members:
                if member != ns:
                    self._ip(member, "route", "add", str(network), "via", str(address))
        return Node(name, ns, address, lan=segment)

    # -- running ---------------------------------------------------------

    def run(
        self,
        ns: Node | str,
        argv: list[str],
        *,
        timeout: float = COMMAND_TIMEOUT,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["ip", "netns", "exec", _ns(ns), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            why = f"({proc.returncode}): {proc.stderr.strip()}"
            raise RuntimeError(f"{_ns(ns)}: {argv} failed {why}")
        return proc

    def spawn(self, ns: Node | str, argv: list[str], **popen: object) -> subprocess.Popen[str]:
        """Start a process in a namespace; ``close()`` kills it."""
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        proc: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", _ns(ns), *argv], text=True, **popen
        )
        self.processes.append(proc)
        return proc

    def nft(self, ns: Node | str, ruleset: str) -> None:
        proc = subprocess.run(
            ["ip", "netns", "exec", _ns(ns), "nft", "-f", "-"],
            input=ruleset,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"nft in {_ns(ns)} failed: {proc.stderr.strip()}\n{ruleset}")

    # -- teardown --------------------------------------------------------

    def close(self) -> None:
        """Kill spawned processes and delete every namespace (their links and
        bridges go with them). Idempotent; keeps going past errors."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.communicate(timeout=5)
            except (subprocess.TimeoutExpired, ValueError):
                pass
        self.processes.clear()
        while self.namespaces:
            ns = self.namespaces.pop()
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=COMMAND_TIMEOUT)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------

    def _namespace(self, role: str) -> str:
        ns = f"{self.prefix}-{next(self._ids)}-{role}"
        add = ["ip", "netns", "add", ns]
        subprocess.run(add, check=True, capture_output=True, timeout=COMMAND_TIMEOUT)
        self.namespaces.append(ns)  # recorded at once: close() deletes it whatever happens next
        self._ip(ns, "link", "set", "lo", "up")
        return ns

    def _plug(self, ns: str, ifname: str, segment: Segment, address: ipaddress.IPv4Address) -> None:
        """A veth from ``ns`` (named ``ifname``) into the segment's bridge."""
        port = f"p{next(self._ids)}"
        # Both ends are born inside lab namespaces: nothing appears in the root one.
        veth = ["ip", "link", "add", ifname, "netns", ns, "type", "veth"]
        subprocess.run(
            [*veth, "peer", "name", port, "netns", segment.ns],
            check=True,
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
        )
        self._ip(segment.ns, "link", "set", port, "master", segment.bridge)
        self._ip(segment.ns, "link", "set", port, "up")
        self._ip(ns, "addr", "add", f"{address}/{segment.network.prefixlen}", "dev", ifname)
        self._ip(ns, "link", "set", ifname, "up")

    def _join_segment(self, ns: str, segment: Segment) -> None:
        segment.members.append(ns)
        for network, via in segment.routed:
            self._ip(ns, "route", "add", str(network), "via", str(via))

    def _ip(self, ns: str, *args: str) -> None:
        self.run(ns, ["ip", *args])


def _ns(node: Node | str) -> str:
    return node.ns if isinstance(node, Node) else node


def _allowed(cidr: str) -> ipaddress.IPv4Network:
    network = ipaddress.IPv4Network(cidr)
    if not any(network.subnet_of(r) for r in ALLOWED):
        raise ValueError(f"{cidr} is outside the lab's address ranges")
    return network


def _ruleset(nat: NatKind, drop_unsolicited: bool) -> str:
    masquerade = {"eim": "masquerade", "symmetric": "masquerade random", "firewall": ""}[nat]
    drop = 'iifname "wan" ct state new drop' if drop_unsolicited else ""
    return f"""
table ip lab {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        {f'oifname "wan" {masquerade}' if masquerade else ""}
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        {drop}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        {drop}
    }}
}}
"""
