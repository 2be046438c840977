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
    upnpd = lab.upnp(r, stun=a)   # miniupnpd on r: UPnP-IGD, PCP, NAT-PMP
    upnpd.mapped_ports()          # {("tcp", 4001), ...}: its DNAT rules
    lab.close()
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

NatKind = Literal["eim", "symmetric", "firewall"]

# Only these ranges (documentation and shared address space), and only inside
# namespaces the lab made.
ALLOWED = tuple(
    ipaddress.IPv4Network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "100.64.0.0/10")
)
COMMAND_TIMEOUT = 20.0


STUN_PORT = 3478
# miniupnpd's chains (DESIGN.md: Debian's nft init script is broken, so the lab
# makes them): the forward accepts and the DNAT/SNAT rules of its mappings. Debian's
# 2.3.1 writes its rules with the inet family: chains in `ip` tables fail (ENOENT).
UPNP_FILTER_CHAIN = "miniupnpd"
UPNP_NAT_CHAINS = ("prerouting_miniupnpd", "postrouting_miniupnpd")
UPNP_READY = "Listening for NAT-PMP"
UPNP_START_TIMEOUT = 15.0


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
        self.stun_hosts: set[str] = set()  # namespaces running the lab's STUN responder
        self._nat_lans = itertools.count(1)
        self._routed_lans = itertools.count(0)
        self.upnpds: list[Upnpd] = []

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

    def upnp(
        self,
        router: Node,
        *,
        stun: Node,
        upnp: bool = True,
        natpmp: bool = True,
        min_lifetime: int = 120,
        max_lifetime: int = 86400,
        igd_v1: bool = False,
    ) -> Upnpd:
        """Run miniupnpd (UPnP-IGD and/or NAT-PMP/PCP) on ``router``, with the
        workarounds DESIGN.md lists: its nft chains made here, a STUN responder on
        the public host ``stun`` (it refuses to map a reserved WAN address
        otherwise), foreground, ready at its "Listening for NAT-PMP" line.
        ``close()`` stops it and flushes its chains. Leases are clamped to
        ``min_lifetime``..``max_lifetime`` seconds. ``igd_v1``: describe itself
        as an IGDv1 router (no AddAnyPortMapping)."""
        return _lab_upnp(
            self,
            router,
            stun=stun,
            upnp=upnp,
            natpmp=natpmp,
            min_lifetime=min_lifetime,
            max_lifetime=max_lifetime,
            igd_v1=igd_v1,
        )

    def next_lan(self, nat: NatKind) -> str:
        """A fresh LAN for a router: behind a NAT, a /24 of 100.64.0.0/10 (as
        carrier and home NATs use); behind a firewall (routed, no NAT), a /28 of
        the documentation ranges, as a firewalled host has a public address."""
        if nat != "firewall":
            index = next(self._nat_lans)
            if index >= 64 * 256:
                raise ValueError("the lab has no more NATed LANs")
            return f"100.{64 + index // 256}.{index % 256}.0/24"
        index = next(self._routed_lans)
        if index >= 32:
            raise ValueError("the lab has no more routed LANs (32 /28s)")
        base = "198.51.100" if index < 16 else "192.0.2"
        return f"{base}.{16 * (index % 16)}/28"

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
        while self.upnpds:
            self.upnpds.pop().stop()
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


# -- UPnP-IGD / NAT-PMP routers (miniupnpd) ------------------------------------------


def missing_upnp() -> list[str]:
    """What keeps ``Lab.upnp`` from running here (empty when it can)."""
    if shutil.which("miniupnpd") is None and not Path("/usr/sbin/miniupnpd").exists():
        return ["no `miniupnpd` (apt-get install miniupnpd)"]
    return []


# A minimal RFC 5389 binding responder (test code only): miniupnpd asks it for its
# external address (ext_perform_stun) and refuses to map without an answer.
# Answers each Binding Request with MAPPED-ADDRESS and XOR-MAPPED-ADDRESS.
STUN_RESPONDER = """
import socket, struct, sys
COOKIE = 0x2112A442
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, (ip, port) = s.recvfrom(2048)
    if len(data) < 20:
        continue
    kind, length, cookie = struct.unpack("!HHI", data[:8])
    if kind != 0x0001:
        continue
    tid = data[8:20]
    addr = socket.inet_aton(ip)
    xaddr = bytes(a ^ b for a, b in zip(addr, struct.pack("!I", COOKIE)))
    mapped = struct.pack("!HHBBH", 0x0001, 8, 0, 1, port) + addr
    xor = struct.pack("!HHBBH", 0x0020, 8, 0, 1, port ^ (COOKIE >> 16)) + xaddr
    body = mapped + xor
    s.sendto(struct.pack("!HHI", 0x0101, len(body), cookie) + tid + body, (ip, port))
"""


@dataclass
class Upnpd:
    """miniupnpd running on a lab router (``Lab.upnp``)."""

    lab: Lab
    router: Node
    proc: subprocess.Popen[str]
    workdir: Path

    @property
    def log_file(self) -> Path:
        return self.workdir / "miniupnpd.log"

    def log(self) -> str:
        """What miniupnpd printed so far (it logs every request with -d)."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def rules(self) -> str:
        """miniupnpd's chains as nft lists them: one line per rule of a mapping."""
        out = []
        for family, table, chain in (
            ("inet", "filter", UPNP_FILTER_CHAIN),
            ("inet", "nat", UPNP_NAT_CHAINS[0]),
            ("inet", "nat", UPNP_NAT_CHAINS[1]),
        ):
            listed = self.lab.run(self.router, ["nft", "list", "chain", family, table, chain])
            out.append(listed.stdout)
        return "\n".join(out)

    def mapped_ports(self) -> set[tuple[str, int]]:
        """(protocol, external port) of every DNAT rule miniupnpd holds."""
        found = set()
        # e.g. `iif "wan" @nh,72,8 0x6 th dport 4001 dnat ip to 100.64.1.2:4001`
        # (the protocol is matched as a raw byte: 0x6 TCP, 0x11 UDP).
        names = {"0x6": "tcp", "0x11": "udp", "tcp": "tcp", "udp": "udp"}
        for line in self.rules().splitlines():
            words = line.split()
            if "dnat" in words and "dport" in words:
                proto = next((names[w] for w in words if w in names), "?")
                found.add((proto, int(words[words.index("dport") + 1])))
        return found

    def stop(self) -> None:
        """Stop miniupnpd and flush its chains (it leaves its DNAT rules behind on
        SIGTERM). Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        flush = [
            f"flush chain inet filter {UPNP_FILTER_CHAIN}",
            *(f"flush chain inet nat {chain}" for chain in UPNP_NAT_CHAINS),
        ]
        for command in flush:
            self.lab.run(self.router, ["nft", command], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _lab_upnp(
    lab: Lab,
    router: Node,
    *,
    stun: Node,
    upnp: bool = True,
    natpmp: bool = True,
    min_lifetime: int = 120,
    max_lifetime: int = 86400,
    igd_v1: bool = False,
) -> Upnpd:
    if router.lan is None:
        raise ValueError(f"{router.name} is not a router")
    if missing_upnp():
        raise RuntimeError(missing_upnp()[0])
    if stun.ns not in lab.stun_hosts:  # one responder per host serves every router
        stun_proc = lab.spawn(stun, [sys.executable, "-c", STUN_RESPONDER, str(STUN_PORT)])
        assert stun_proc.stdout is not None
        line = stun_proc.stdout.readline()  # bounded: the script prints "ready" or dies
        if line.strip() != "ready":
            raise RuntimeError(f"STUN responder did not start: {line!r}")
        lab.stun_hosts.add(stun.ns)
    # The chains miniupnpd fills; and mapped (DNATed) inbound passes the router's
    # drop of unsolicited inbound, as a home router lets its forwards through.
    lab.nft(
        router,
        f"""
table inet filter {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        jump {UPNP_FILTER_CHAIN}
    }}
    chain {UPNP_FILTER_CHAIN} {{
    }}
}}
table inet nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        jump {UPNP_NAT_CHAINS[0]}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat - 1; policy accept;
        jump {UPNP_NAT_CHAINS[1]}
    }}
    chain {UPNP_NAT_CHAINS[0]} {{
    }}
    chain {UPNP_NAT_CHAINS[1]} {{
    }}
}}
insert rule ip lab forward ct status dnat accept
""",
    )
    # SSDP answers go to 239.255.255.250: the router has no default route.
    lab.run(router, ["ip", "route", "add", "239.255.255.250/32", "dev", "lan"], check=False)
    workdir = Path(f"/tmp/{lab.prefix}-{next(lab._ids)}-upnpd")
    workdir.mkdir(mode=0o700)
    lan = router.lan.network
    conf = workdir / "miniupnpd.conf"
    conf.write_text(
        "\n".join(
            [
                "ext_ifname=wan",
                "listening_ip=lan",
                "http_port=0",
                f"enable_natpmp={'yes' if natpmp else 'no'}",
                f"enable_upnp={'yes' if upnp else 'no'}",
                "ext_perform_stun=yes",
                f"ext_stun_host={stun.address}",
                f"ext_stun_port={STUN_PORT}",
                f"min_lifetime={min_lifetime}",
                f"max_lifetime={max_lifetime}",
                "secure_mode=yes",
                "system_uptime=no",
                f"force_igd_desc_v1={'yes' if igd_v1 else 'no'}",
                f"uuid={uuid.uuid4()}",
                "upnp_table_name=filter",
                "upnp_nat_table_name=nat",
                f"upnp_forward_chain={UPNP_FILTER_CHAIN}",
                f"upnp_nat_chain={UPNP_NAT_CHAINS[0]}",
                f"upnp_nat_postrouting_chain={UPNP_NAT_CHAINS[1]}",
                f"allow 1024-65535 {lan} 1024-65535",
                "deny 0-65535 0.0.0.0/0 0-65535",
                "",
            ]
        )
    )
    argv = ["miniupnpd", "-d", "-4", "-f", str(conf), "-P", str(workdir / "pid")]
    # Its log goes to a file: a pipe nobody reads would block it once full.
    with (workdir / "miniupnpd.log").open("w") as log_file:
        proc = lab.spawn(router, argv, stdout=subprocess.DEVNULL, stderr=log_file)
    daemon = Upnpd(lab, router, proc, workdir)
    lab.upnpds.append(daemon)
    ready = UPNP_READY if natpmp else "HTTP listening"
    deadline = time.monotonic() + UPNP_START_TIMEOUT
    # Bounded: miniupnpd prints its ready line, or exits, within seconds.
    while ready not in daemon.log():
        if proc.poll() is not None or time.monotonic() > deadline:
            daemon.stop()
            raise RuntimeError(f"miniupnpd did not start:\n{daemon.log()}")
        time.sleep(0.02)
    return daemon


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
