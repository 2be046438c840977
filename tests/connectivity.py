"""The connectivity matrix (issue 12): real `p2pnode start` processes in the
network-namespace lab, a provider and a downloader behind each kind of router,
every downloader getting every provider's file through the DHT only; for each
pair, how the connection was made and how long to the first byte.

Used by tests/integration/test_connectivity_matrix_lab.py and
benchmarks/bench_connectivity.py. Nodes are driven through their control
sockets (<home>/api.sock): their loopback is their namespace's own.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from p2pnode.config import NO_PORT_MAPPING_ENV
from p2pnode.sim.netlab import Lab, NatKind, Node, missing_upnp
from tests.cli_helpers import CLI, cli_env

PORT = 4001
# "public": on the bridge; "upnp": behind an eim router running miniupnpd
# (UPnP-IGD, PCP, NAT-PMP), when it is installed.
KINDS = ("public", "upnp", "eim", "symmetric", "firewall")


def kinds_here() -> tuple[str, ...]:
    return KINDS if not missing_upnp() else tuple(k for k in KINDS if k != "upnp")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@dataclass
class LabNode:
    """A `p2pnode start` in a lab namespace."""

    name: str
    kind: str
    host: Node
    home: Path
    reach: str  # the address peers would dial (the router's, behind one)
    info: dict[str, Any] = field(default_factory=dict)

    def _control(self) -> tuple[str, str, str]:
        control = json.loads((self.home / "control.json").read_text())
        token = (self.home / "api.token").read_text().strip()
        return str(control["socket"]), str(control["url"]), token

    def request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        sock, url, token = self._control()
        conn = UnixHTTPConnection(sock, timeout)
        try:
            conn.request(method, path, *_body(body, url, token))
            resp = conn.getresponse()
            data = json.loads(resp.read() or b"null")
            if resp.status >= 400:
                raise AssertionError(f"{self.name}: {method} {path}: {resp.status} {data}")
            return data
        finally:
            conn.close()

    def stream(self, path: str, body: Any, timeout: float = 60) -> Iterator[dict[str, Any]]:
        sock, url, token = self._control()
        conn = UnixHTTPConnection(sock, timeout)
        try:
            conn.request("POST", path, *_body(body, url, token))
            resp = conn.getresponse()
            for line in resp:
                if line.strip():
                    yield cast(dict[str, Any], json.loads(line))
        finally:
            conn.close()

    def get_timed(self, rid: str, dest: Path, timeout: float = 60) -> GetResult:
        """Download ``rid``: the final event and the seconds to the first
        byte (first progress with bytes done) and to the end."""
        started = time.monotonic()
        first: float | None = None
        final: dict[str, Any] = {"event": "error", "error": "the stream ended early"}
        for event in self.stream("/v1/get", {"id": rid, "dest": str(dest)}, timeout):
            if event["event"] == "progress" and event.get("done_bytes") and first is None:
                first = time.monotonic() - started
            elif event["event"] in ("done", "error"):
                final = event
        total = time.monotonic() - started
        if first is None and final["event"] == "done":
            first = total  # it all came before the first progress line
        return GetResult(final["event"] == "done", str(final.get("error", "")), first, total)

    def connection_to(self, peer_id: str) -> list[dict[str, Any]]:
        conns = self.request("GET", "/v1/connections")["connections"]
        return [c for c in conns if c["peer_id"] == peer_id]


@dataclass
class GetResult:
    ok: bool
    error: str
    first_byte: float | None
    total: float


def _body(body: Any, url: str, token: str) -> tuple[bytes | None, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}", "Host": url.removeprefix("http://")}
    if body is None:
        return None, headers
    headers["Content-Type"] = "application/json"
    return json.dumps(body).encode(), headers


class Matrix:
    """A lab with a public seed and, per kind, one provider and one downloader."""

    def __init__(
        self,
        lab: Lab,
        workdir: Path,
        kinds: Sequence[str] | None = None,
        downloaders: Sequence[str] | None = None,
    ) -> None:
        """``kinds``: the providers' (and by default the downloaders') kinds."""
        kinds = kinds_here() if kinds is None else kinds
        downloaders = kinds if downloaders is None else downloaders
        self.lab = lab
        self.workdir = workdir
        self.net = lab.public_bridge("203.0.113.0/24")
        self.seed = self._place("seed", "public")
        self.providers = {k: self._place(f"p-{k}", k) for k in kinds}
        self.downloaders = {k: self._place(f"d-{k}", k) for k in downloaders}

    def _place(self, name: str, kind: str) -> LabNode:
        if kind == "public":
            host = self.lab.host(name, on=self.net)
            reach = str(host.address)
        else:
            nat = cast(NatKind, "eim" if kind == "upnp" else kind)
            lan = self.lab.next_lan(nat)
            router = self.lab.router(f"r-{name}", wan=self.net, lan=lan, nat=nat)
            if kind == "upnp":
                self.lab.upnp(router, stun=self.seed.host)
            host = self.lab.host(name, behind=router)
            reach = str(router.address)
        home = self.workdir / name
        home.mkdir(parents=True)
        return LabNode(name, kind, host, home, reach)

    def nodes(self) -> list[LabNode]:
        return [self.seed, *self.providers.values(), *self.downloaders.values()]

    def start(self, *extra: str, only: Mapping[str, Sequence[str]] | None = None) -> None:
        """Start the seed, then everyone else bootstrapping from it; ``only``: more
        arguments for some nodes, by name."""
        only = only or {}
        self._start(self.seed, *extra, *only.get(self.seed.name, ()))
        boot = f"{self.seed.reach}:{PORT}"
        for node in self.nodes()[1:]:
            self._start(node, "--bootstrap", boot, *extra, *only.get(node.name, ()))

    def _start(self, node: LabNode, *extra: str) -> None:
        argv = [*CLI, "start", "--home", str(node.home), "--port", str(PORT), *extra]
        env = cli_env()
        env.pop(NO_PORT_MAPPING_ENV, None)  # in the lab, port mapping talks to lab routers only
        log = (node.home / "node.log").open("w")
        proc = self.lab.spawn(node.host, argv, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # bounded: the control socket or an exit
            if proc.poll() is not None:
                raise AssertionError(f"{node.name} exited: {(node.home / 'node.log').read_text()}")
            if (node.home / "control.json").exists() and (node.home / "api.sock").exists():
                try:
                    node.info = node.request("GET", "/v1/id")
                    return
                except (OSError, AssertionError, ValueError):
                    pass
            time.sleep(0.05)
        raise AssertionError(f"{node.name} did not start")

    def wait_settled(self, timeout: float = 40) -> dict[str, float]:
        """Until every node has a reachability verdict and every private one a
        relay reservation (bounded); the seconds each took, from now."""
        started = time.monotonic()
        settled: dict[str, float] = {}
        while time.monotonic() - started < timeout:
            for node in self.nodes():
                if node.name in settled:
                    continue
                status = node.request("GET", "/v1/status")
                verdict = status.get("reachability")
                held = status.get("relay", {}).get("reservations", [])
                if verdict == "public" or (verdict == "private" and held):
                    settled[node.name] = time.monotonic() - started
            if len(settled) == len(self.nodes()):
                return settled
            time.sleep(0.2)
        missing = [n.name for n in self.nodes() if n.name not in settled]
        raise AssertionError(f"not settled after {timeout} s: {missing}")

    def wait_announced(self, ids: dict[tuple[str, str], str], timeout: float = 20) -> None:
        """Until each downloader finds each private provider's record with its
        relay addresses (holders keep them once they have checked the relay, a
        moment after the first announcement: see issue 12's closing note)."""
        deadline = time.monotonic() + timeout
        for (p_kind, d_kind), rid in ids.items():
            provider = self.providers[p_kind]
            status = provider.request("GET", "/v1/status")
            if status.get("reachability") != "private":
                continue
            downloader = self.downloaders[d_kind]
            while True:  # bounded by the deadline
                found = downloader.request("GET", f"/v1/providers/{rid}")["providers"]
                if any(p["relays"] for p in found):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{d_kind} finds {p_kind}'s record without relays")
                time.sleep(0.2)

    def share_all(self, size: int) -> dict[tuple[str, str], str]:
        """Each provider shares one file per downloader, so that no pair's
        download can come from an earlier downloader (a finished download is
        served too); resource ids by (provider kind, downloader kind)."""
        ids = {}
        for p_kind, node in self.providers.items():
            for d_kind in self.downloaders:
                path = node.home / f"for-{d_kind}.bin"
                path.write_bytes(os.urandom(size))
                rid = node.request("POST", "/v1/share", {"path": str(path)})["id"]
                ids[(p_kind, d_kind)] = str(rid)
        return ids
