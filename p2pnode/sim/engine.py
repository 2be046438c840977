"""Runs a Scenario against a cluster of nodes and measures it.

The engine does not know how a node runs: a ``Cluster`` makes ``SimNode``
handles (an in-process ``Node`` or a ``p2pnode start`` subprocess driven over
the control API) and the engine only calls their async methods. So the same
scenario, the same scheduling and the same measurements apply in both modes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

from p2pnode.sim.scenario import Op, Scenario, probe_pairs
from p2pnode.sim.stats import Measurements, NodeSample, OpResult

log = logging.getLogger(__name__)

T = TypeVar("T")
RSS_SAMPLE_INTERVAL = 0.5
JOIN_POLL = 0.05
# Values the simulated adversaries forge start with this text, so a get that
# returned one is counted as "forged accepted", apart from other wrong values.
FORGED_MARK = "forged-by-sybil:"


class NodeFailure(Exception):
    """An operation on a node failed; the message says how (first word = category)."""


class Unsupported(Exception):
    """The runner cannot do this operation (e.g. no control API endpoint for it)."""


@dataclass
class LookupOutcome:
    found: bool
    port: int | None = None
    rpcs: float | None = None
    host: str | None = None  # where the found contact is (None: not reported)
    hops: float | None = None


@dataclass
class Traffic:
    """What a node has sent and received so far in its current life."""

    dht_bytes_sent: int = 0
    dht_bytes_received: int = 0
    net_bytes_sent: int = 0
    net_bytes_received: int = 0
    routing_table_size: int = 0
    dht: dict[str, Any] | None = None
    net: dict[str, Any] | None = None


class SimNode(ABC):
    """A handle on one simulated node, in either mode."""

    def __init__(self, index: int, workdir: Path) -> None:
        self.index = index
        self.workdir = workdir
        self.home = workdir / "home"
        self.files = workdir / "files"
        self.downloads = workdir / "downloads"
        self.node_id: bytes | None = None
        self.host = "127.0.0.1"  # the address its peers reach it at
        self.port = 0
        self._running = False
        self.alive_set: set[int] | None = None  # the cluster's, kept up to date

    @property
    def running(self) -> bool:
        return self._running

    @running.setter
    def running(self, value: bool) -> None:
        # The cluster keeps the set of running nodes, so counting them is not O(N).
        self._running = value
        if self.alive_set is not None:
            if value:
                self.alive_set.add(self.index)
            else:
                self.alive_set.discard(self.index)

    @abstractmethod
    async def start(self, bootstrap: list[tuple[str, int]], port: int = 0) -> None:
        """Start the node (it joins in the background); sets node_id, port, running."""

    @abstractmethod
    async def joined(self) -> bool:
        """Whether the node has joined the network (or is the first one)."""

    @abstractmethod
    async def kill(self) -> None:
        """Stop the node abruptly: no goodbye, no saving of state."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop the node cleanly (end of the run)."""

    @abstractmethod
    async def share(self, path: Path) -> str:
        """Share a file; the resource id string."""

    @abstractmethod
    async def fetch(self, rid: str, dest: Path) -> Path:
        """Download a resource to ``dest``; the path of the downloaded file."""

    @abstractmethod
    async def dht_put(self, key: str, value: str) -> bool: ...

    @abstractmethod
    async def dht_get(self, key: str) -> str | None: ...

    @abstractmethod
    async def find_peer(self, node_id: bytes) -> LookupOutcome: ...

    @abstractmethod
    async def traffic(self) -> Traffic:
        """Counters of the current life (reset by a restart)."""

    async def dht_put_record(self, name: str, value: str) -> str:
        """Publish a signed (mutable) record; its address (``<peer id>/<name>``)."""
        raise Unsupported("signed records")

    async def dht_get_record(self, address: str) -> str | None:
        """The verified value of the record at ``address``, or None."""
        raise Unsupported("signed records")

    async def find_provider_ids(self, rid: str) -> list[tuple[bytes, str]]:
        """find_providers only: (node id, host) of each provider record found."""
        raise Unsupported("provider lookups")

    async def write_file(self, path: Path, data: bytes) -> str:
        """Put a file to share where the node can read it; its SHA-256 hex."""
        return await asyncio.to_thread(_write_content, path, data)

    async def file_digest(self, path: Path) -> str:
        """SHA-256 hex of a file the node downloaded."""
        return await asyncio.to_thread(_sha256_file, path)


class Cluster(ABC):
    """Makes nodes of one mode, and knows the memory they use."""

    mode = ""
    rpc_source = ""
    unsupported_why = ""
    stop_batch = 0  # on close, stop this many nodes at a time (0: all at once)

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes: dict[int, SimNode] = {}
        self.running: set[int] = set()

    def node(self, index: int) -> SimNode:
        if index not in self.nodes:
            node = self._make_node(index, self.workdir / f"n{index:05d}")
            node.alive_set = self.running
            if node.running:
                self.running.add(index)
            self.nodes[index] = node
        return self.nodes[index]

    @abstractmethod
    def _make_node(self, index: int, workdir: Path) -> SimNode: ...

    async def setup(self) -> None:  # noqa: B027 - optional hook
        """Before the first node starts."""

    @abstractmethod
    def rss(self) -> tuple[int, dict[int, int]]:
        """Current RSS: (total of the nodes' processes, per node where known)."""

    async def close(self) -> None:
        """Stop every node that still runs; idempotent, safe after a Ctrl-C."""
        running = [n for n in self.nodes.values() if n.running]
        batch = self.stop_batch or max(len(running), 1)
        for i in range(0, len(running), batch):
            await asyncio.gather(
                *(n.stop() for n in running[i : i + batch]), return_exceptions=True
            )

    def kill_now(self) -> None:  # noqa: B027 - optional hook
        """Last resort, synchronous: kill what can be killed (second Ctrl-C)."""


class OneProcessCluster(Cluster):
    """Nodes that all live in this process: their memory is the process's."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self._proc = psutil.Process()

    def rss(self) -> tuple[int, dict[int, int]]:
        try:
            return int(self._proc.memory_info().rss), {}
        except psutil.Error:
            return 0, {}


class Counters:
    """Live counters for the progress line."""

    def __init__(self) -> None:
        self.up = 0
        self.joined = 0
        self.failed_starts = 0
        self.phase = "starting"
        self.done: dict[str, list[int]] = {}  # kind -> [ok, failed]
        self.inflight = 0

    def record(self, r: OpResult) -> None:
        if r.skipped:
            return
        row = self.done.setdefault(r.kind, [0, 0])
        row[0 if r.ok else 1] += 1

    def line(self, elapsed: float, total_nodes: int) -> str:
        def pair(kind: str) -> str:
            ok, bad = self.done.get(kind, [0, 0])
            return f"{ok}" + (f"/{bad}!" if bad else "")

        lookups = [
            a + b
            for a, b in zip(
                self.done.get("lookup", [0, 0]), self.done.get("probe", [0, 0]), strict=True
            )
        ]
        fails = sum(v[1] for k, v in self.done.items() if k not in ("kill",))
        return (
            f"[{elapsed:6.1f}s] {self.phase:<9} nodes up {self.up}/{total_nodes} "
            f"joined {self.joined} | lookups {lookups[0]} | dht put {pair('put')} "
            f"get {pair('get')} | transfers {pair('fetch')} (shared {pair('share')}) | "
            f"in flight {self.inflight} | failures {fails + self.failed_starts}"
        )


class Simulation:
    def __init__(
        self,
        scenario: Scenario,
        cluster: Cluster,
        *,
        progress: bool = True,
        progress_interval: float = 1.0,
    ) -> None:
        self.scenario = scenario
        self.config = scenario.config
        self.cluster = cluster
        self.m = Measurements(rpc_source=cluster.rpc_source)
        self.counters = Counters()
        self._progress = progress
        self._progress_interval = progress_interval
        self._t0 = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sem = asyncio.Semaphore(self.config.max_inflight)
        self._lookup_locks: dict[int, asyncio.Lock] = {}
        self._samples: dict[int, NodeSample] = {
            i: NodeSample(index=i) for i in range(self.config.nodes)
        }
        self._shared: dict[int, asyncio.Future[tuple[str, str] | None]] = {}
        self._put: dict[int, asyncio.Future[bool]] = {}
        self._record_put: dict[int, asyncio.Future[str | None]] = {}
        self._adversaries = scenario.adversaries
        self._by_id: dict[bytes, int] = {}  # node id -> index, for provider records
        self._rss_peak_nodes: dict[int, int] = {}
        self._unsupported: set[str] = set()
        # Calls in flight on each node, cancelled when the node is killed.
        self._node_calls: dict[int, set[asyncio.Future[Any]]] = {}

    # -- clock -----------------------------------------------------------------------

    def now(self) -> float:
        # The loop's clock: real time in the socket modes, simulated time in virtual mode.
        return asyncio.get_running_loop().time() - self._t0

    async def _sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    # -- the run ---------------------------------------------------------------------

    async def run(self) -> Measurements:
        """Run every phase; on cancellation (Ctrl-C) stop early with partial figures.
        Nodes are stopped by ``close``, which the caller must await (also on errors)."""
        self._t0 = asyncio.get_running_loop().time()
        self.m.started_at = time.time()
        rss, _ = self.cluster.rss()
        self.m.rss_baseline = rss
        await self.cluster.setup()
        helpers = [asyncio.create_task(self._sample_rss(), name="sim-rss")]
        if self._progress:
            helpers.append(asyncio.create_task(self._show_progress(), name="sim-progress"))
        try:
            await self._join_phase()
            await self._converge_phase()
            await self._workload_phase()
            self.counters.phase = "sampling"
            await self._final_samples()
        except asyncio.CancelledError:
            self.m.interrupted = True
            raise
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            self.m.total_time = self.now()
            self.m.nodes = [self._samples[i] for i in sorted(self._samples)]
            for i, peak in self._rss_peak_nodes.items():
                self.m.nodes[i].rss_peak = peak
            for kind in sorted(self._unsupported):
                self.m.notes.append(
                    f"{kind}: not supported by the {self.cluster.mode} runner"
                    + (f" ({self.cluster.unsupported_why})" if self.cluster.unsupported_why else "")
                )
            if self._progress:
                self._print_progress(final=True)
        return self.m

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.cluster.close()

    # -- bookkeeping -----------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _record(self, r: OpResult) -> OpResult:
        self.m.ops.append(r)
        self.counters.record(r)
        return r

    def _alive(self) -> list[int]:
        return sorted(self.cluster.running)

    def _alive_honest(self) -> list[int]:
        return sorted(self.cluster.running - self._adversaries)

    def _n_alive(self) -> int:
        return len(self.cluster.running)

    def _mark_alive(self) -> None:
        n = self._n_alive()
        self.counters.up = n
        if not self.m.alive or self.m.alive[-1][1] != n:
            self.m.alive.append((self.now(), n))

    # -- phases ----------------------------------------------------------------------

    async def _join_phase(self) -> None:
        self.counters.phase = "joining"
        plans = self.scenario.nodes
        checkpoints = set(self.scenario.checkpoints)
        join_sem = asyncio.Semaphore(self.config.join_concurrency)
        pending: list[asyncio.Task[bool]] = []
        shift = 0.0  # time spent in probe rounds, which pause the join schedule
        t_join = self.now()
        for plan in plans:
            await self._sleep_until(t_join + plan.join_at + shift)
            if plan.is_seed:
                # Joiners need a seed's port: start seeds one after the other.
                await asyncio.gather(*pending)
                await self._start_node(plan.index, plan.bootstrap, "join")
            else:
                await join_sem.acquire()
                task = self._spawn(
                    self._start_node(plan.index, plan.bootstrap, "join", release=join_sem),
                    f"start-{plan.index}",
                )
                pending.append(task)
            size = plan.index + 1
            if size in checkpoints and self.config.probe_lookups:
                await asyncio.gather(*pending)
                t = self.now()
                self.counters.phase = f"probe@{size}"
                await self._probe_round(f"size-{size}", "join")
                self.counters.phase = "joining"
                shift += self.now() - t
                self.m.probe_pause = shift
        await asyncio.gather(*pending)
        self.m.bootstrap_time = self.now()
        log.info("all %d nodes started and joined in %.2f s", len(plans), self.m.bootstrap_time)

    async def _start_node(
        self,
        index: int,
        bootstrap: tuple[int, ...],
        phase: str,
        *,
        release: asyncio.Semaphore | None = None,
        port: int = 0,
    ) -> bool:
        node = self.cluster.node(index)
        addrs = [
            (self.cluster.nodes[b].host, self.cluster.nodes[b].port)
            for b in bootstrap
            if b in self.cluster.nodes and self.cluster.nodes[b].port
        ]
        started = self.now()
        ok, error = False, ""
        try:
            await asyncio.wait_for(node.start(addrs, port), self.config.start_timeout)
            self._mark_alive()
            deadline = self.now() + self.config.start_timeout
            while not await node.joined():
                if self.now() > deadline:
                    raise NodeFailure(f"join: not joined after {self.config.start_timeout} s")
                await asyncio.sleep(JOIN_POLL)
            ok = True
            self.counters.joined += 1
        except Exception as exc:
            # Counted in the report with its category; one node must not end the run.
            error = _describe(exc) if not _unexpected(exc) else _crash(exc)
            log.warning("node %d failed to start/join: %s", index, error, exc_info=_unexpected(exc))
            if phase == "join":
                self.m.join_failures += 1
                self.counters.failed_starts += 1
            if node.running:
                with contextlib.suppress(Exception):
                    await node.kill()
                self._mark_alive()
        finally:
            if release is not None:
                release.release()
        kind = "start" if phase == "join" else "restart"
        self._record(
            OpResult(
                kind,
                index,
                -1,
                started,
                self.now(),
                ok,
                error,
                phase=phase,
                network_size=self._n_alive(),
            )
        )
        return ok

    async def _converge_phase(self) -> None:
        self.counters.phase = "converge"
        if self.config.probe_lookups == 0 or len(self._alive_honest()) < 2:
            self.m.converge_time = self.m.bootstrap_time
            return
        deadline = self.now() + self.config.converge_timeout
        round_no = 0
        while self.now() < deadline:
            round_no += 1
            results = await self._probe_round(f"converge-{round_no}", "converge")
            if results and all(r.ok for r in results):
                self.m.converge_time = self.now()
                break
            if "lookup" in self._unsupported:
                break
        self.m.converge_rounds = round_no

    async def _probe_round(self, label: str, phase: str) -> list[OpResult]:
        alive = self._alive_honest()  # honest requesters and targets only
        pairs = probe_pairs(self.config, label, alive, self.config.probe_lookups)
        tasks = [
            self._spawn(self._lookup(src, dst, "probe", phase), f"probe-{label}-{i}")
            for i, (src, dst) in enumerate(pairs)
        ]
        return [r for r in await asyncio.gather(*tasks) if not r.skipped]

    async def _workload_phase(self) -> None:
        self.counters.phase = "workload"
        w0 = self.now()
        self.m.workload_started = w0
        loop = asyncio.get_running_loop()
        for r in range(len(self.scenario.resources)):
            self._shared[r] = loop.create_future()
        for v in range(len(self.scenario.values)):
            self._put[v] = loop.create_future()
        for v in range(len(self.scenario.records)):
            self._record_put[v] = loop.create_future()
        tasks = []
        for i, op in enumerate(self.scenario.ops):
            await self._sleep_until(w0 + op.at)
            if op.kind in ("kill", "restart"):
                tasks.append(self._spawn(self._churn(op), f"{op.kind}-{i}"))
            else:
                tasks.append(self._spawn(self._guarded(op), f"{op.kind}-{i}"))
        end = w0 + self.config.duration
        await self._sleep_until(end)
        self.counters.phase = "draining"
        late: set[asyncio.Task[Any]] = set()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.config.drain_timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        if late:
            self.m.notes.append(
                f"{len(late)} operation(s) still running after the drain "
                f"timeout ({self.config.drain_timeout} s) were cancelled"
            )
        for shared in self._shared.values():
            if not shared.done():
                shared.set_result(None)
        for put in self._put.values():
            if not put.done():
                put.set_result(False)
        for record in self._record_put.values():
            if not record.done():
                record.set_result(None)
        self.m.workload_ended = self.now()

    async def _guarded(self, op: Op) -> OpResult | None:
        async with self._sem:
            self.counters.inflight += 1
            try:
                return await self._run_op(op)
            finally:
                self.counters.inflight -= 1

    async def _run_op(self, op: Op) -> OpResult | None:
        if op.kind == "share":
            return await self._share(op)
        if op.kind == "fetch":
            return await self._fetch(op)
        if op.kind == "put":
            return await self._dht_put(op)
        if op.kind == "get":
            return await self._dht_get(op)
        if op.kind == "lookup":
            return await self._lookup(op.node, op.arg, "lookup", "workload")
        if op.kind == "put_record":
            return await self._record_put_op(op)
        if op.kind == "get_record":
            return await self._record_get_op(op)
        if op.kind == "providers":
            return await self._providers_op(op)
        raise AssertionError(op.kind)

    def _skip(self, kind: str, node: int, arg: int, why: str, phase: str = "workload") -> OpResult:
        t = self.now()
        return self._record(
            OpResult(
                kind,
                node,
                arg,
                t,
                t,
                False,
                why,
                phase=phase,
                network_size=self._n_alive(),
                skipped=True,
            )
        )

    async def _timed(
        self,
        op_kind: str,
        node: int,
        arg: int,
        timeout: float,
        call: Callable[[], Awaitable[T]],
        *,
        phase: str = "workload",
    ) -> tuple[OpResult, T | None]:
        started = self.now()
        size = self._n_alive()
        value: T | None = None
        ok, error = True, ""
        inner: asyncio.Future[T] = asyncio.ensure_future(call())
        calls = self._node_calls.setdefault(node, set())
        calls.add(inner)
        me = asyncio.current_task()
        try:
            value = await asyncio.wait_for(inner, timeout)
        except asyncio.CancelledError:
            if me is None or me.cancelling() or not inner.cancelled():
                self._record(
                    OpResult(op_kind, node, arg, started, self.now(), False,
                             "cancelled: still running when the run ended", phase=phase,
                             network_size=size)
                )  # fmt: skip
                raise
            # Not us: the node was killed under this call, as a process dies mid-request.
            ok, error = False, "down: the node was killed during the operation"
        except TimeoutError:
            ok, error = False, f"timeout: no result in {timeout} s"
        except Unsupported as exc:
            ok, error = False, f"unsupported: {exc}"
            self._unsupported.add("lookup" if op_kind == "probe" else op_kind)
        except (NodeFailure, OSError) as exc:
            ok, error = False, _describe(exc)
        except Exception as exc:  # the node under test misbehaved: record it as a finding
            ok, error = False, f"crash: {type(exc).__name__}: {exc}"
            log.error("%s on node %d raised %s", op_kind, node, type(exc).__name__, exc_info=exc)
        finally:
            calls.discard(inner)
        r = OpResult(op_kind, node, arg, started, self.now(), ok, error, phase=phase,
                     network_size=size)  # fmt: skip
        return r, value

    async def _await_dependency(self, op: Op, future: asyncio.Future[T]) -> T:
        try:
            return await future
        except asyncio.CancelledError:
            self._skip(op.kind, op.node, op.arg, "cancelled: waited for its dependency")
            raise

    # -- operations ------------------------------------------------------------------

    async def _share(self, op: Op) -> OpResult:
        node = self.cluster.node(op.node)
        future = self._shared[op.arg]
        if not node.running:
            future.set_result(None)
            return self._skip(op.kind, op.node, op.arg, "down: sharer not running")
        plan = self.scenario.resources[op.arg]
        path = node.files / plan.name
        digest = await node.write_file(path, plan.content())
        r, rid = await self._timed(
            "share", op.node, op.arg, self.config.dht_timeout, lambda: node.share(path)
        )
        r.nbytes = plan.size
        future.set_result((rid, digest) if r.ok and rid else None)
        return self._record(r)

    async def _fetch(self, op: Op) -> OpResult:
        shared = await self._await_dependency(op, self._shared[op.arg])
        node = self.cluster.node(op.node)
        if shared is None:
            return self._skip(op.kind, op.node, op.arg, "no-source: the share failed or never ran")
        if not node.running:
            return self._skip(op.kind, op.node, op.arg, "down: fetcher not running")
        rid, digest = shared
        plan = self.scenario.resources[op.arg]
        dest = node.downloads / plan.name
        r, got = await self._timed(
            "fetch", op.node, op.arg, self.config.download_timeout, lambda: node.fetch(rid, dest)
        )
        if r.ok and got is not None:
            actual = await node.file_digest(got)
            r.verified = actual == digest
            r.nbytes = plan.size
            if not r.verified:
                r.ok, r.error = False, "verification: downloaded bytes differ from shared ones"
        return self._record(r)

    async def _dht_put(self, op: Op) -> OpResult:
        node = self.cluster.node(op.node)
        future = self._put[op.arg]
        if not node.running:
            future.set_result(False)
            return self._skip(op.kind, op.node, op.arg, "down: putter not running")
        plan = self.scenario.values[op.arg]
        r, stored = await self._timed(
            "put",
            op.node,
            op.arg,
            self.config.dht_timeout,
            lambda: node.dht_put(plan.key, plan.value),
        )
        if r.ok and not stored:
            r.ok, r.error = False, "not-stored: no peer stored the value"
        future.set_result(r.ok)
        return self._record(r)

    async def _dht_get(self, op: Op) -> OpResult:
        put_ok = await self._await_dependency(op, self._put[op.arg])
        node = self.cluster.node(op.node)
        if not put_ok:
            return self._skip(op.kind, op.node, op.arg, "no-source: the put failed or never ran")
        if not node.running:
            return self._skip(op.kind, op.node, op.arg, "down: getter not running")
        plan = self.scenario.values[op.arg]
        r, value = await self._timed(
            "get", op.node, op.arg, self.config.dht_timeout, lambda: node.dht_get(plan.key)
        )
        if r.ok and value != plan.value:
            r.ok = False
            if value is None:
                r.error = "not-found: no value"
            elif value.startswith(FORGED_MARK):
                r.error = "forged: a value forged by an adversary was accepted"
            else:
                r.error = "wrong-value: value differs"
        return self._record(r)

    async def _record_put_op(self, op: Op) -> OpResult:
        """Put the first version of a record, then the latest: a holder that kept the
        first one can replay it (a stale record, validly signed)."""
        node = self.cluster.node(op.node)
        future = self._record_put[op.arg]
        if not node.running:
            future.set_result(None)
            return self._skip(op.kind, op.node, op.arg, "down: putter not running")
        plan = self.scenario.records[op.arg]

        async def both() -> str:
            await node.dht_put_record(plan.name, plan.first)
            return await node.dht_put_record(plan.name, plan.latest)

        r, address = await self._timed(
            "put_record", op.node, op.arg, 2 * self.config.dht_timeout, both
        )
        future.set_result(address if r.ok and address else None)
        return self._record(r)

    async def _record_get_op(self, op: Op) -> OpResult:
        address = await self._await_dependency(op, self._record_put[op.arg])
        node = self.cluster.node(op.node)
        if address is None:
            return self._skip(op.kind, op.node, op.arg, "no-source: the put failed or never ran")
        if not node.running:
            return self._skip(op.kind, op.node, op.arg, "down: getter not running")
        plan = self.scenario.records[op.arg]
        r, value = await self._timed(
            "get_record",
            op.node,
            op.arg,
            self.config.dht_timeout,
            lambda: node.dht_get_record(address),
        )
        if r.ok and value != plan.latest:
            r.ok = False
            if value is None:
                r.error = "not-found: no record"
            elif value == plan.first:
                r.error = "stale: an older version of the record was accepted"
            elif value.startswith(FORGED_MARK):
                r.error = "forged: a record forged by an adversary was accepted"
            else:
                r.error = "wrong-value: value differs"
        if r.error.startswith("unsupported"):
            r.skipped = True
        return self._record(r)

    async def _providers_op(self, op: Op) -> OpResult:
        """find_providers alone: ok if a record names an honest node at its address."""
        shared = await self._await_dependency(op, self._shared[op.arg])
        node = self.cluster.node(op.node)
        if shared is None:
            return self._skip(op.kind, op.node, op.arg, "no-source: the share failed or never ran")
        if not node.running:
            return self._skip(op.kind, op.node, op.arg, "down: requester not running")
        rid, _ = shared
        r, found = await self._timed(
            "providers",
            op.node,
            op.arg,
            self.config.dht_timeout,
            lambda: node.find_provider_ids(rid),
        )
        if r.ok and found is not None:
            honest = sum(1 for node_id, host in found if self._honest_at(node_id, host))
            if not found:
                r.ok, r.error = False, "no-providers: none found"
            elif not honest:
                r.ok = False
                r.error = f"only-fake: {len(found)} record(s), none from an honest provider"
        if r.error.startswith("unsupported"):
            r.skipped = True
        return self._record(r)

    def _honest_at(self, node_id: bytes, host: str) -> bool:
        """Whether (node id, host) is an honest node at its own address."""
        if len(self._by_id) != len(self.cluster.nodes):
            self._by_id = {n.node_id: i for i, n in self.cluster.nodes.items() if n.node_id}
        index = self._by_id.get(node_id)
        if index is None or index in self._adversaries:
            return False
        return self.cluster.nodes[index].host == host

    async def _lookup(self, source: int, target: int, kind: str, phase: str) -> OpResult:
        src = self.cluster.node(source)
        dst = self.cluster.node(target)
        if "lookup" in self._unsupported:
            return self._skip(kind, source, target, "unsupported: no peer lookup", phase)
        if not src.running or not dst.running or dst.node_id is None:
            return self._skip(kind, source, target, "down: source or target not running", phase)
        target_id, target_port, target_host = dst.node_id, dst.port, dst.host
        lock = self._lookup_locks.setdefault(source, asyncio.Lock())
        try:
            await lock.acquire()
        except asyncio.CancelledError:
            self._skip(kind, source, target, "cancelled: waited for the source's lock", phase)
            raise
        try:  # one lookup at a time per source: RPC deltas stay attributable
            r, outcome = await self._timed(
                kind,
                source,
                target,
                self.config.lookup_timeout,
                lambda: src.find_peer(target_id),
                phase=phase,
            )
        finally:
            lock.release()
        if outcome is not None:
            r.rpcs, r.hops = outcome.rpcs, outcome.hops
            if r.ok and not outcome.found:
                r.ok, r.error = False, "not-found: lookup ended without the target"
            elif r.ok and outcome.host is not None and outcome.host != target_host:
                # Another node answered under the target's id (an impersonation).
                r.ok, r.error = False, f"impersonated: found at {outcome.host}, not {target_host}"
            elif r.ok and outcome.port != target_port:
                r.ok, r.error = False, f"stale: found port {outcome.port}, not {target_port}"
        if r.error.startswith("unsupported"):
            r.skipped = True
        return self._record(r)

    async def _churn(self, op: Op) -> None:
        node = self.cluster.node(op.node)
        if op.kind == "kill":
            if not node.running:
                self._skip(op.kind, op.node, op.arg, "down: already stopped")
                return
            await self._sample_life(op.node)
            started = self.now()
            for call in list(self._node_calls.get(op.node, ())):
                call.cancel()
            await node.kill()
            self._mark_alive()
            self._record(
                OpResult(
                    "kill", op.node, -1, started, self.now(), True, network_size=self._n_alive()
                )
            )
            return
        if node.running:
            self._skip(op.kind, op.node, op.arg, "up: already running")
            return
        self._samples[op.node].restarts += 1
        plan = self.scenario.nodes[op.node]
        # Come back on the same port, as a restarted server would; 0 if it is taken.
        await self._start_node(op.node, plan.bootstrap, "restart", port=node.port)

    # -- samples ---------------------------------------------------------------------

    async def _sample_life(self, index: int) -> None:
        """Add a node's counters of its current life to its totals (before a kill)."""
        node = self.cluster.node(index)
        try:
            t = await asyncio.wait_for(node.traffic(), 5.0)
        except (NodeFailure, OSError, TimeoutError, Unsupported) as exc:
            log.info("no traffic sample from node %d: %s", index, exc)
            return
        s = self._samples[index]
        s.dht_bytes_sent += t.dht_bytes_sent
        s.net_bytes_sent += t.net_bytes_sent
        s.bytes_sent += t.dht_bytes_sent + t.net_bytes_sent
        s.bytes_received += t.dht_bytes_received + t.net_bytes_received
        s.routing_table_size = t.routing_table_size
        s.dht_stats = _add_counters(s.dht_stats, t.dht or {})
        s.net_stats = _add_counters(s.net_stats, t.net or {})

    async def _final_samples(self) -> None:
        alive = self._alive()
        await asyncio.gather(*(self._sample_life(i) for i in alive))
        for i, s in self._samples.items():
            s.alive_at_end = i in alive

    async def _sample_rss(self) -> None:
        while True:
            total, per_node = self.cluster.rss()
            self.m.rss_peak_total = max(self.m.rss_peak_total, total)
            for i, v in per_node.items():
                if v > self._rss_peak_nodes.get(i, 0):
                    self._rss_peak_nodes[i] = v
            await asyncio.sleep(RSS_SAMPLE_INTERVAL)

    # -- progress --------------------------------------------------------------------

    async def _show_progress(self) -> None:
        # Redrawn in place on a terminal; a line every few seconds into a file or pipe.
        interval = self._progress_interval * (1 if sys.stderr.isatty() else 5)
        while True:
            await asyncio.sleep(interval)
            self._print_progress()

    def _print_progress(self, final: bool = False) -> None:
        line = self.counters.line(self.now(), self.config.nodes)
        wall = getattr(asyncio.get_running_loop(), "wall_time", None)
        if wall is not None:  # virtual time: the line's clock is simulated
            line += f" | wall {wall():.0f}s"
        if sys.stderr.isatty():
            width = shutil.get_terminal_size((120, 20)).columns - 1
            sys.stderr.write("\r" + line[:width].ljust(width) + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout: " + (str(exc) or "no answer in time")
    text = str(exc) or type(exc).__name__
    if isinstance(exc, NodeFailure):
        return text
    return f"{type(exc).__name__}: {text}"


def _unexpected(exc: BaseException) -> bool:
    return not isinstance(exc, NodeFailure | OSError | TimeoutError)


def _crash(exc: BaseException) -> str:
    return f"crash: {type(exc).__name__}: {exc}"


def _add_counters(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            prev = out.get(k, 0)
            out[k] = (prev if isinstance(prev, int | float) else 0) + v
        else:
            out[k] = v
    return out


def _write_content(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
