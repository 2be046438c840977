"""Process runner: each node is a real ``p2pnode start`` subprocess on 127.0.0.1
with its own home and port, driven through its control API (aiohttp).

- Children run in their own session (a Ctrl-C in the terminal reaches only the
  simulator, which then stops them) and, on Linux, get SIGKILL if the simulator
  itself dies (PR_SET_PDEATHSIG), so no node outlives a run.
- Kill = SIGKILL (abrupt: nothing saved, control.json left behind); a restart
  runs the same command again in the same home.
- Peak RSS per node: psutil on the child, sampled twice a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import aiohttp
import psutil

from p2pnode.home import CONTROL_FILE, TOKEN_FILE
from p2pnode.identity import peer_id_to_str
from p2pnode.sim.engine import Cluster, LookupOutcome, NodeFailure, SimNode, Traffic, Unsupported
from p2pnode.sim.inprocess import net_bytes, raise_fd_limit
from p2pnode.sim.netlab import Lab, NatKind, missing_tools
from p2pnode.sim.scenario import ScenarioConfig, plan_placement

log = logging.getLogger(__name__)

POLL = 0.05
# --nat: the lab's public addresses, and the port every node listens on (each
# has a namespace of its own)
LAB_PUBLIC = "203.0.113.0/24"
LAB_PORT = 4001
STOP_GRACE = 5.0
PR_SET_PDEATHSIG = 1
# The control endpoint a peer lookup needs (not in the API yet: see the report).
FIND_PEER_PATHS = ("/v1/dht/find_peer?id={peer}", "/v1/peers/find?id={peer}")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ControlError(NodeFailure):
    pass


class ProcessNode(SimNode):
    def __init__(self, index: int, workdir: Path, cluster: ProcessCluster) -> None:
        super().__init__(index, workdir)
        self._cluster = cluster
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0
        self._url = ""
        self._token = ""
        self._joined = False
        self._log: Any = None
        # In the lab, the node's loopback is its namespace's own: the control
        # API is reached through its Unix socket instead.
        self._socket: str | None = None
        self._unix_session: aiohttp.ClientSession | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, bootstrap: list[tuple[str, int]], port: int = 0) -> None:
        for d in (self.home, self.files, self.downloads):
            d.mkdir(parents=True, exist_ok=True)
        # A SIGKILLed node leaves its control file behind: never read a stale one.
        with contextlib.suppress(FileNotFoundError):
            (self.home / CONTROL_FILE).unlink()
        lab = self._cluster.lab
        netns = self._cluster.netns.get(self.index) if lab is not None else None
        prefix = ["ip", "netns", "exec", netns] if netns is not None else []
        args = [
            *prefix,
            sys.executable,
            "-m",
            "p2pnode",
            "start",
            "--home",
            str(self.home),
            "--host",
            "0.0.0.0" if netns is not None else "127.0.0.1",
            "--port",
            str(port or (LAB_PORT if netns is not None else 0)),
            "--log-level",
            "warning",
        ]
        for host, p in bootstrap:
            args += ["--bootstrap", f"{host}:{p}"]
        if self._log is None:
            self._log = (self.workdir / "node.log").open("ab")
        self._log.write(f"--- start {' '.join(args)}\n".encode())
        self._log.flush()
        self.proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self.pid = self.proc.pid
        self._cluster.pids.add(self.pid)
        self.running = True
        self._joined = False
        try:
            await self._wait_control()
            info = await self._call("GET", "/v1/id")
        except BaseException:
            await self.kill()
            raise
        self.node_id = bytes.fromhex(info["node_id"])
        self.port = int(info["port"])

    async def _wait_control(self) -> None:
        deadline = time.monotonic() + self._cluster.config.start_timeout
        assert self.proc is not None
        while True:
            if self.proc.returncode is not None:
                raise NodeFailure(
                    f"start: the node exited with {self.proc.returncode}: {self._log_tail()}"
                )
            try:
                info = json.loads((self.home / CONTROL_FILE).read_text())
                token = (self.home / TOKEN_FILE).read_text().strip()
                if int(info["pid"]) == self.pid:
                    self._url, self._token = str(info["url"]), token
                    self._socket = info.get("socket") if self._cluster.lab is not None else None
                    return
            except (OSError, ValueError, KeyError, TypeError):
                pass
            if time.monotonic() > deadline:
                raise NodeFailure(
                    f"start: no control API after {self._cluster.config.start_timeout} s"
                )
            await asyncio.sleep(POLL)

    def _log_tail(self) -> str:
        try:
            lines = (self.workdir / "node.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-3:])

    async def joined(self) -> bool:
        if not self._joined:
            status = await self._call("GET", "/v1/status")
            self._joined = bool(status.get("joined"))
        return self._joined

    async def kill(self) -> None:
        if self.proc is None:
            return
        self.running = False
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self._cluster.pids.discard(self.pid)

    async def stop(self) -> None:
        if self.proc is None:
            return
        self.running = False
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGKILL)
                await self.proc.wait()
        self._cluster.pids.discard(self.pid)
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- control API -------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def _http(self) -> aiohttp.ClientSession:
        if self._socket is None:
            return self._cluster.http()
        if self._unix_session is None or self._unix_session.closed:
            self._unix_session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self._socket),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
        return self._unix_session

    async def close_http(self) -> None:
        if self._unix_session is not None:
            await self._unix_session.close()
            self._unix_session = None

    async def _call(
        self, method: str, path: str, body: Any = None, *, missing_ok: bool = False
    ) -> Any:
        if not self.running:
            raise NodeFailure("down: node not running")
        session = self._http()
        try:
            async with session.request(
                method, self._url + path, json=body, headers=self._headers()
            ) as resp:
                text = await resp.text()
                if resp.status == 404 and missing_ok and not text.startswith("{"):
                    raise Unsupported(f"{method} {path.split('?')[0]} is not in the control API")
                try:
                    data = json.loads(text)
                except ValueError:
                    raise ControlError(f"api: HTTP {resp.status}: {text[:200]}") from None
                if resp.status >= 400:
                    kind = data.get("kind", "error") if isinstance(data, dict) else "error"
                    msg = data.get("error", text) if isinstance(data, dict) else text
                    raise ControlError(f"{_category(kind)}: {kind}: {msg}")
                return data
        except aiohttp.ClientError as exc:
            raise NodeFailure(f"api: {type(exc).__name__}: {exc}") from None

    async def share(self, path: Path) -> str:
        data = await self._call("POST", "/v1/share", {"path": str(path)})
        return str(data["id"])

    async def fetch(self, rid: str, dest: Path) -> Path:
        if not self.running:
            raise NodeFailure("down: node not running")
        session = self._http()
        final: dict[str, Any] | None = None
        body = {"id": rid, "dest": str(dest)}
        try:
            async with session.post(
                self._url + "/v1/get", json=body, headers=self._headers()
            ) as resp:
                if resp.status >= 400:
                    raise ControlError(f"api: HTTP {resp.status}: {(await resp.text())[:200]}")
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("event") in ("done", "error"):
                        final = event
        except aiohttp.ClientError as exc:
            raise NodeFailure(f"api: {type(exc).__name__}: {exc}") from None
        if final is None:
            raise NodeFailure("fetch: the stream ended without a result")
        if final["event"] == "error":
            kind = str(final.get("kind", "error"))
            raise NodeFailure(f"{_category(kind)}: {kind}: {final.get('error')}")
        path = final.get("resource", {}).get("path")
        return Path(path) if path else dest

    async def dht_put(self, key: str, value: str) -> bool:
        # the plain kademlia value, as the in-process runner puts (not a signed record)
        body = {"key": key, "value": value, "kind": "plain"}
        data = await self._call("POST", "/v1/dht/put", body)
        return bool(data.get("stored"))

    async def dht_get(self, key: str) -> str | None:
        from urllib.parse import quote

        try:
            data = await self._call("GET", f"/v1/dht/get?key={quote(key)}&plain=1")
        except ControlError as exc:
            if "NotFoundError" in str(exc):
                return None
            raise
        value = data.get("value")
        return None if value is None else str(value)

    async def find_peer(self, node_id: bytes) -> LookupOutcome:
        peer = peer_id_to_str(node_id)
        before = await self._find_node_sent()
        paths = self._cluster.find_peer_paths
        last: Unsupported | None = None
        for template in list(paths):
            try:
                data = await self._call("GET", template.format(peer=peer), missing_ok=True)
            except Unsupported as exc:
                last = exc
                if template in paths:  # concurrent lookups may have dropped it already
                    paths.remove(template)
                continue
            except ControlError as exc:
                if "NotFoundError" in str(exc):
                    return LookupOutcome(False, rpcs=await self._rpcs_since(before))
                raise
            port = data.get("port")
            if port is None and isinstance(data.get("address"), str):
                port = data["address"].rsplit(":", 1)[-1]
            found = bool(data.get("found", True)) and port is not None
            return LookupOutcome(
                found,
                int(port) if port is not None else None,
                rpcs=await self._rpcs_since(before),
                hops=data.get("hops"),
            )
        raise last or Unsupported("no peer lookup endpoint in the control API")

    async def _find_node_sent(self) -> int:
        status = await self._call("GET", "/v1/status")
        return int(status.get("dht", {}).get("rpc_sent.find_node", 0))

    async def _rpcs_since(self, before: int) -> float:
        return float(await self._find_node_sent() - before)

    async def traffic(self) -> Traffic:
        status = await self._call("GET", "/v1/status")
        dht = status.get("dht", {}) or {}
        net = status.get("net", {}) or {}
        net_sent, net_received = net_bytes(net)
        dht_sent, dht_received = net_bytes(dht)
        return Traffic(
            dht_bytes_sent=dht_sent,
            dht_bytes_received=dht_received,
            net_bytes_sent=net_sent,
            net_bytes_received=net_received,
            routing_table_size=int(status.get("routing_table_size", 0)),
            dht=dht,
            net=net,
        )


def _category(kind: str) -> str:
    return {
        "NotFoundError": "not-found",
        "P2PTimeoutError": "timeout",
        "UsageError": "usage",
        "ProtocolError": "protocol",
    }.get(kind, "error")


class ProcessCluster(Cluster):
    mode = "processes"
    unsupported_why = (
        "the control API has no peer lookup endpoint, e.g. GET /v1/dht/find_peer?id=<peer id>; "
        "without it lookup figures, hops and time to converge are not measured"
    )
    rpc_source = (
        "RPCs per lookup: delta of the source node's rpc_sent.find_node counter "
        "(GET /v1/status before and after; one lookup at a time per source)"
    )

    def __init__(self, workdir: Path, config: ScenarioConfig) -> None:
        super().__init__(workdir)
        self.config = config
        self.pids: set[int] = set()
        self._session: aiohttp.ClientSession | None = None
        self._procs: dict[int, psutil.Process] = {}
        self.find_peer_paths = list(FIND_PEER_PATHS)
        # --nat: the lab, each node's namespace and the address peers reach it at
        self.lab: Lab | None = None
        self.netns: dict[int, str] = {}
        self.placement = plan_placement(config)
        self._lab_addresses: dict[int, str] = {}

    def _make_node(self, index: int, workdir: Path) -> SimNode:
        node = ProcessNode(index, workdir, self)
        if index in self._lab_addresses:
            node.host = self._lab_addresses[index]
        return node

    async def setup(self) -> None:
        raise_fd_limit(1024 + 8 * self.config.nodes)
        if self.config.nat_fractions():
            await asyncio.to_thread(self._build_lab)

    def _build_lab(self) -> None:
        """One public bridge; a public node is a host on it, any other sits alone
        behind a home router of its kind (its own LAN in 100.64.0.0/10)."""
        missing = missing_tools()
        if missing:
            raise NodeFailure(f"--nat needs the network-namespace lab: {', '.join(missing)}")
        self.lab = lab = Lab()
        net = lab.public_bridge(LAB_PUBLIC)
        for index, kind in enumerate(self.placement):
            if kind == "public":
                host = lab.host(f"n{index}", on=net)
                self._lab_addresses[index] = str(host.address)
            else:
                nat = cast(NatKind, kind)
                router = lab.router(f"r{index}", wan=net, lan=lab.next_lan(nat), nat=nat)
                host = lab.host(f"n{index}", behind=router)
                # where peers would reach it: its router (if they can at all)
                self._lab_addresses[index] = str(router.address)
            self.netns[index] = host.ns
        log.info("lab: %s", dict(Counter(self.placement)))

    def http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=False),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
        return self._session

    def rss(self) -> tuple[int, dict[int, int]]:
        per: dict[int, int] = {}
        for index, node in self.nodes.items():
            if not isinstance(node, ProcessNode) or not node.running or not node.pid:
                continue
            proc = self._procs.get(node.pid)
            try:
                if proc is None:
                    proc = self._procs[node.pid] = psutil.Process(node.pid)
                per[index] = int(proc.memory_info().rss)
            except psutil.Error:
                self._procs.pop(node.pid, None)
        return sum(per.values()), per

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self.kill_now()
            if self._session is not None:
                await self._session.close()
                self._session = None
            for node in self.nodes.values():
                if isinstance(node, ProcessNode):
                    await node.close_http()
            if self.lab is not None:
                await asyncio.to_thread(self.lab.close)
                self.lab = None

    def kill_now(self) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            self.pids.discard(pid)
