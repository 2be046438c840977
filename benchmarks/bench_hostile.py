"""A normal download while hostile peers flood the provider (a benchmark, not a test).

    python benchmarks/bench_hostile.py [--size-mib 256] [--attacks udp,tcp-garbage,...]
        [--tcp-threads 4] [--rate 0] [--attacker-ip 127.0.0.2] [--handshakes 100]
    python benchmarks/bench_hostile.py --attacks dht-overwrite,dht-provider-spam,dht-sybil,\
        dht-spoofed-provider,dht-store-flood [--dht-size-mib 16]

The figures of the security issue, in one run, on loopback, each party in its own
process:

- raw TCP throughput (``bench_exchange.raw_tcp``), at the start and at the end;
- handshake + first Ping on a fresh connection (``bench_net.measure_handshake``);
- a clean download (``bench_exchange.download``: a provider node and a downloader
  node, DHT lookup, Noise-encrypted pieces, every piece and the whole file verified)
  encrypted (``--clean-runs`` times), then plaintext, then once per attack, then
  encrypted again. The best clean encrypted run is the baseline of the slowdowns
  (the conservative choice);
- each attack is an attacker process (or several, for ``all``) blasting the
  *provider*, as fast as it can (or ``--rate`` operations/s), from just before the
  downloader starts until it has reported:

  ``udp``                random datagrams of random sizes (some too short, some over
                         max_datagram) and well-formed but invalid kademlia RPCs
                         (unknown names, bad arguments, unsolicited answers) at the
                         DHT port;
  ``tcp-garbage``        connections that send random bytes instead of a handshake;
  ``tcp-half-handshake`` connections that send a valid Noise msg1 (replayed), read
                         msg2 (the node has done its DH work) and reset;
  ``tcp-oversized``      full handshakes followed by a frame header over max_frame;
  ``tcp-junk-frames``    full handshakes, then well-sealed frames carrying junk:
                         undecodable payloads, bad envelopes, unknown message types,
                         requests with bad fields, unexpected answers (the attacker
                         reads and discards the node's error replies);
  ``all``                every attacker above at once (not in the default list);

  and the budget attacks (issue 11), each holding connections rather than churning:

  ``tcp-silent``         256 TCP sockets from 127.0.3.1-8 (32 each) that send nothing,
                         reopened as the node closes them;
  ``tcp-announced``      256 authenticated connections (from 127.0.20-27.1), each
                         sending a header announcing a 4 MiB frame and 4 bytes of it;
  ``tcp-slow-reader``    64 authenticated connections (from 127.0.40-43.1) that
                         pipeline 64 GetPiece of the file being downloaded and read
                         nothing (a 4 KiB receive buffer).

  For these the provider's RSS is sampled during the window (peak) and after the
  attackers have gone (after), beside its configured ``memory_budget``.

  and the DHT attacks of issue 10 (``dht-overwrite``, ``dht-provider-spam``,
  ``dht-sybil``, ``dht-spoofed-provider``, ``dht-store-flood``; not in the default
  list): each on a fresh network of five nodes on 127.0.1.1 .. 127.0.5.1, with an
  honest operation (a signed record read back, a download, a put) timed before and
  after the attack; a table of their own (see benchmarks/hostile_dht.py). With only
  dht-* attacks given, the download rows above are skipped.

  What the node absorbed is read from the provider's own counters (control API
  ``GET /v1/status``: "dht", "net", "exchange"), before and after the attack
  window; the rate is that difference over the window. What the attacker sent is
  shown beside it (for UDP the kernel drops what does not fit the socket buffer).

Columns: ``download`` is the downloader's ``Exchange.get`` (provider lookup,
manifest, pieces, fsync + rename, then announcing itself as a provider: the
``[downloader]`` log lines above the table split the first parts); ``window`` is
the whole attack, from the downloader's start (it joins the DHT through the
attacked provider and looks it up) to its report; ``prov CPU`` is the provider's
CPU seconds while serving; "cut" connections were closed by the node for cause
(handshake failure or timeout, oversized frame, bad chunk), "refused" ones at
accept (per-IP or total connection limit).

The attackers' source address is ``--attacker-ip`` (127.0.0.2 by default: another
loopback address, so that they do not share the honest downloader's per-IP
connection limit; use 127.0.0.1 to measure that case). Note that the DHT does not
rate limit loopback sources by default (``DhtConfig.rate_limit_loopback``), so the
UDP figures are without the per-IP token bucket. On a 2-core machine the attacker
competes with both nodes for CPU: the provider's CPU seconds (from its start to its
stop) are printed beside the slowdown, as the part of the cost the node pays itself.

Every loop is bounded: attackers stop when told, when their stdin closes, after
``--attack-max-seconds`` or ``MAX_OPS`` operations; a download is killed after
``--download-timeout``. Exit status 1 if a download under attack failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_exchange  # benchmarks/ is sys.path[0] when this file is run
import bench_net
import hostile_dht
import psutil

from p2pnode.errors import P2PError

MiB = 1024 * 1024
ATTACKS = ("udp", "tcp-garbage", "tcp-half-handshake", "tcp-oversized", "tcp-junk-frames")
HOLDING = ("tcp-silent", "tcp-announced", "tcp-slow-reader")  # one worker, many sockets
HOLD_COUNTS = {"tcp-silent": 256, "tcp-announced": 256, "tcp-slow-reader": 64}
MAX_OPS = 50_000_000  # per attacker worker, besides the time bounds
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux
LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends a RST: no TIME_WAIT pile-up
SOCK_TIMEOUT = 5.0
CONNECT_TIMEOUT = 0.05


# --- attacker (child process) ------------------------------------------------------


@dataclass
class Tally:
    ops: int = 0  # datagrams, connections or frames sent
    connections: int = 0
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ops: int = 0, connections: int = 0, errors: int = 0) -> None:
        with self.lock:
            self.ops += ops
            self.connections += connections
            self.errors += errors


class Pace:
    """``rate`` operations per second over all workers (0 = as fast as possible)."""

    def __init__(self, rate: float, workers: int) -> None:
        self.rate = rate / max(1, workers)
        self.start = time.monotonic()

    def wait(self, done: int, stop: threading.Event) -> None:
        if self.rate > 0:
            ahead = done / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                stop.wait(min(ahead, 1.0))  # the pacing is the attack, not a sync


def udp_pool(rng: random.Random, count: int) -> list[bytes]:
    """Junk datagrams: random bytes and well-formed but invalid kademlia RPCs."""
    from p2pnode.dht import codec

    def mid() -> bytes:
        return os.urandom(codec.MSG_ID_LEN)

    def nid() -> bytes:
        return os.urandom(20)

    makers: list[Callable[[], bytes]] = [
        lambda: os.urandom(rng.randint(1, 1400)),  # random bytes
        lambda: os.urandom(rng.randint(1, 21)),  # too short for a header
        lambda: os.urandom(rng.randint(8193, 9000)),  # over max_datagram
        lambda: b"\x00" + mid() + os.urandom(rng.randint(1, 300)),  # request of junk
        lambda: b"\x01" + mid() + codec.pack([nid()]),  # answer to nothing we asked
        lambda: codec.encode_request(mid(), "frobnicate", [nid()]),  # unknown rpc
        lambda: codec.encode_request(mid(), "find_node", [nid()[:7], nid()]),  # short id
        lambda: codec.encode_request(mid(), "store", [nid(), nid(), os.urandom(5000)]),
        lambda: codec.encode_request(mid(), "ping", []),  # wrong arity
        lambda: codec.encode_request(mid(), "get_providers", [nid(), "not a key"]),
        lambda: codec.encode_request(mid(), "add_provider", [nid(), nid(), 70000]),  # port
        lambda: codec.encode_request(mid(), "find_value", [nid(), [nid()] * 600]),  # array
    ]
    return [makers[i % len(makers)]() for i in range(count)]


def junk_frame_payloads(rng: random.Random, count: int) -> list[bytes]:
    """Frame payloads a node must drop or refuse without closing the connection."""
    import msgpack  # type: ignore[import-untyped,unused-ignore]

    from p2pnode.exchange.messages import GetPiece
    from p2pnode.wire.messages import Pong, encode_envelope_bytes, response

    def rid() -> int:
        return rng.randrange(0, 2**32)

    makers: list[Callable[[], bytes]] = [
        lambda: os.urandom(rng.randint(1, 512)),  # undecodable
        lambda: msgpack.packb([7, rid(), 1]),  # bad envelope kind
        lambda: msgpack.packb([0, rid(), 9999, b"x"]),  # unknown message type
        lambda: msgpack.packb([0, rid(), GetPiece.TYPE_CODE, "not an id", -1]),  # bad fields
        lambda: encode_envelope_bytes(response(rid(), Pong())),  # answer to nothing
    ]
    return [makers[i % len(makers)]() for i in range(count)]


class Attacker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.target = ("127.0.0.1", args.target_port)
        self.stop = threading.Event()
        self.deadline = time.monotonic() + args.attack_max_seconds
        self.tally = Tally()
        self.rng = random.Random(args.seed)
        self.encrypt = True  # the attacks run against encrypted nodes only

    def running(self, ops: int) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline and ops < MAX_OPS

    # -- UDP --------------------------------------------------------------------------

    def udp(self, pool: list[bytes], pace: Pace) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((self.args.attacker_ip, 0))
        sent = 0
        batch = 256
        try:
            while self.running(sent):
                errors = 0
                start = sent % len(pool)
                for data in pool[start : start + batch]:
                    try:
                        sock.sendto(data, self.target)
                    except OSError:  # ENOBUFS, ECONNREFUSED (ICMP of an earlier one)
                        errors += 1
                self.tally.add(ops=batch, errors=errors)
                sent += batch
                pace.wait(sent, self.stop)
        finally:
            sock.close()

    # -- TCP --------------------------------------------------------------------------

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.args.attacker_ip, 0))
            # A SYN dropped by a full accept queue is resent after 1 s: give up at
            # once and dial again instead, so the queue stays full.
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(self.target)
            sock.settimeout(SOCK_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        self.tally.add(connections=1)
        return sock

    def handshake(self, sock: socket.socket, creds: Any) -> Any:
        from p2pnode.net.session import Session

        session = Session(creds, initiator=True, encrypt=self.encrypt, max_frame=4 * MiB)
        session.initiate()
        sock.sendall(b"".join(session.take_outgoing()))
        for _ in range(64):  # a handshake is 2 messages from the responder
            if session.established:
                return session
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            session.receive_data(data)
            out = session.take_outgoing()
            if out:
                sock.sendall(b"".join(out))
        raise ConnectionError("handshake did not finish")

    def tcp_loop(self, kind: str, pace: Pace) -> None:
        from p2pnode.identity import Identity
        from p2pnode.net.session import Credentials, Session

        creds = Credentials.create(Identity.generate())
        garbage = [os.urandom(self.rng.randint(1, 4096)) for _ in range(64)]
        probe = Session(creds, initiator=True, encrypt=self.encrypt, max_frame=4 * MiB)
        probe.initiate()
        msg1 = b"".join(probe.take_outgoing())  # replayed: the node cannot tell
        payloads = junk_frame_payloads(self.rng, 500) if kind == "tcp-junk-frames" else []
        done = 0
        while self.running(done):
            try:
                sock = self.connect()
            except TimeoutError:
                self.tally.add(errors=1)  # SYN dropped: the accept queue is full
                continue
            except OSError:
                self.tally.add(errors=1)
                self.stop.wait(0.01)  # refused: the node is gone
                continue
            try:
                if kind == "tcp-garbage":
                    sock.sendall(garbage[done % len(garbage)])
                    done += 1
                elif kind == "tcp-half-handshake":
                    sock.sendall(msg1)
                    sock.recv(65536)  # msg2: the node did its part
                    done += 1
                elif kind == "tcp-oversized":
                    session = self.handshake(sock, creds)
                    sock.sendall(b"".join(session.seal([], 0xFFFFFFFF)))  # header only
                    with contextlib.suppress(OSError):
                        sock.recv(1)  # wait for the node's reset
                    done += 1
                else:
                    done += self.junk_frames(sock, creds, payloads, pace, done)
                self.tally.add(ops=0 if kind == "tcp-junk-frames" else 1)
            except (OSError, P2PError):  # reset, timeout, handshake refused
                self.tally.add(errors=1)
            finally:
                sock.close()
            if kind != "tcp-junk-frames":
                pace.wait(done, self.stop)

    def junk_frames(
        self, sock: socket.socket, creds: Any, payloads: list[bytes], pace: Pace, done: int
    ) -> int:
        """Send junk frames on one connection until it closes or we stop; frames sent."""
        session = self.handshake(sock, creds)
        drained = threading.Event()

        def drain() -> None:  # read (and drop) the node's error replies
            with contextlib.suppress(OSError):
                for _ in range(MAX_OPS):
                    if not sock.recv(1 << 20):
                        break
            drained.set()

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        sent = 0
        batch = 32
        try:
            while self.running(done + sent) and not drained.is_set():
                out: list[Any] = []
                for i in range(batch):
                    data = payloads[(sent + i) % len(payloads)]
                    out.extend(session.seal([data], len(data)))
                sock.sendall(b"".join(out))
                sent += batch
                self.tally.add(ops=batch)
                pace.wait(done + sent, self.stop)
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            reader.join(SOCK_TIMEOUT)
        return sent

    # -- holding attacks (budgets) ----------------------------------------------------

    def _source(self, kind: str, i: int) -> str:
        if kind == "tcp-silent":
            return f"127.0.3.{1 + i % 8}"
        if kind == "tcp-announced":
            return f"127.0.{20 + i % 8}.1"
        return f"127.0.{40 + i % 4}.1"

    def _open(self, kind: str, i: int, creds: Any) -> socket.socket:
        from p2pnode.exchange.manifest import resource_id_from_str
        from p2pnode.exchange.messages import GetPiece
        from p2pnode.net.session import CHUNK_HEADER
        from p2pnode.wire.frame import frame_header
        from p2pnode.wire.messages import encode_envelope, request

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            if kind == "tcp-slow-reader":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.bind((self._source(kind, i), 0))
            sock.settimeout(SOCK_TIMEOUT)
            sock.connect(self.target)
            self.tally.add(connections=1)
            if kind == "tcp-silent":
                return sock
            session = self.handshake(sock, creds)
            assert session._enc is not None
            if kind == "tcp-announced":
                body = session._enc.encrypt(frame_header(4 * MiB) + b"abcd")
                sock.sendall(CHUNK_HEADER.pack(len(body)) + body)
            else:
                rid = resource_id_from_str(self.args.rid)
                out: list[Any] = []
                for n in range(64):
                    parts = encode_envelope(request(n + 1, GetPiece(rid, n)))
                    data = b"".join(bytes(p) for p in parts)
                    out.extend(session.seal([data], len(data)))
                sock.sendall(b"".join(bytes(c) for c in out))
            return sock
        except BaseException:
            sock.close()
            raise

    def hold_loop(self, kind: str, pace: Pace) -> None:
        """Keep HOLD_COUNTS[kind] connections open; reopen those the node closes."""
        import select

        from p2pnode.identity import Identity
        from p2pnode.net.session import Credentials

        creds = Credentials.create(Identity.generate())
        slots: list[socket.socket | None] = [None] * HOLD_COUNTS[kind]
        rounds = 0
        try:
            while self.running(rounds):
                rounds += 1
                for i, sock in enumerate(slots):
                    if sock is None and self.running(rounds):
                        try:
                            slots[i] = self._open(kind, i, creds)
                            self.tally.add(ops=1)
                        except (OSError, P2PError):
                            self.tally.add(errors=1)
                live = [s for s in slots if s is not None]
                if not live:
                    self.stop.wait(0.05)
                    continue
                # a readable socket was closed (or answered: slow readers read nothing)
                readable, _, _ = select.select(live, [], [], 0.2)
                for sock in readable:
                    if kind == "tcp-slow-reader":
                        continue  # it never reads; the node closes it in time
                    try:
                        gone = not sock.recv(65536, socket.MSG_PEEK)
                    except OSError:
                        gone = True
                    if gone:
                        sock.close()
                        slots[slots.index(sock)] = None
                if kind == "tcp-slow-reader":
                    for i, sock in enumerate(slots):
                        if sock is not None and sock.fileno() != -1:
                            with contextlib.suppress(OSError):
                                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                                    sock.close()
                                    slots[i] = None
        finally:
            for sock in slots:
                if sock is not None:
                    sock.close()

    # -- the process ------------------------------------------------------------------

    def run(self) -> None:
        kind = self.args.kind
        workers = 1 if kind == "udp" or kind in HOLDING else self.args.tcp_threads
        pace = Pace(self.args.rate, workers)
        pool = udp_pool(self.rng, 4096) if kind == "udp" else []
        if kind != "udp":
            import p2pnode.net.session  # noqa: F401  (imported before the clock starts)
        print(json.dumps({"ready": True}), flush=True)
        if sys.stdin.readline().strip() != "go":
            return
        threading.Thread(target=self._stop_on_eof, daemon=True).start()
        cpu0 = bench_exchange._cpu()
        t0 = time.monotonic()
        pace.start = t0
        threads = [
            threading.Thread(
                target=self._guard,
                args=(self.udp, pool, pace)
                if kind == "udp"
                else (self.hold_loop if kind in HOLDING else self.tcp_loop, kind, pace),
            )
            for _ in range(workers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - t0
        report = {
            "ops": self.tally.ops,
            "connections": self.tally.connections,
            "errors": self.tally.errors,
            "seconds": seconds,
            "cpu": bench_exchange._cpu() - cpu0,
        }
        print(json.dumps(report), flush=True)

    def _guard(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        finally:
            self.stop.set()  # a worker that dies (a bug) ends the attack, visibly short

    def _stop_on_eof(self) -> None:
        sys.stdin.read()
        self.stop.set()


# --- the parent --------------------------------------------------------------------


def _spawn_attacker(
    kind: str, port: int, args: argparse.Namespace, rid: str | None
) -> subprocess.Popen[str]:
    argv = [
        "--role", "attack", "--kind", kind, "--target-port", str(port),
        "--attacker-ip", args.attacker_ip, "--tcp-threads", str(args.tcp_threads),
        "--rate", str(args.rate), "--attack-max-seconds", str(args.attack_max_seconds),
        "--seed", str(random.randrange(2**31)), "--rid", rid or "-",
    ]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, __file__, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def _provider_process() -> psutil.Process | None:
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if "provider" in child.cmdline():
                return child
    return None


def _rss(proc: psutil.Process | None) -> int:
    if proc is None:
        return 0
    with contextlib.suppress(psutil.Error):
        return int(proc.memory_info().rss)
    return 0


def _shared_id(home: Path) -> str:
    from p2pnode.control.client import ControlClient

    listing = ControlClient(home, timeout=30).call("GET", "/v1/ls")
    return str(listing["resources"][0]["id"])


def _status(home: Path) -> dict[str, Any]:
    from p2pnode.control.client import ControlClient

    return dict(ControlClient(home, timeout=30).call("GET", "/v1/status"))


def _flat(status: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in ("dht", "net", "exchange"):
        for key, value in (status.get(part) or {}).items():
            if isinstance(value, int | float):
                out[f"{part}.{key}"] = int(value)
    return out


@dataclass
class Case:
    label: str
    kinds: tuple[str, ...]
    plaintext: bool = False
    ok: bool = False
    error: str = ""
    seconds: float = 0.0  # the downloader's own timing of get()
    window: float = 0.0  # the attack window (downloader start to its report)
    provider_cpu: float = 0.0
    timed_out: bool = False
    deltas: dict[str, int] = field(default_factory=dict)
    attackers: list[dict[str, Any]] = field(default_factory=list)
    rss_before: int = 0  # the provider's, just before the attack
    rss_peak: int = 0  # sampled during the window
    rss_after: int = 0  # once the attackers have gone

    def delta(self, *names: str) -> int:
        return sum(self.deltas.get(n, 0) for n in names)


class Harness:
    def __init__(self, args: argparse.Namespace, base: Path, src: Path) -> None:
        self.args = args
        self.base = base
        self.src = src

    def run(self, case: Case) -> Case:
        common = ["--window", str(self.args.window)]
        common += ["--plaintext"] if case.plaintext else []
        common += ["--no-fsync"] if self.args.no_fsync else []
        try:
            result, _ = bench_exchange.download(
                self.base, self.src, 1, common, during=lambda p, h: self._during(case, p, h)
            )
        except (RuntimeError, OSError, ValueError, KeyError, P2PError) as exc:
            case.error = _explain(exc, case, self.args.download_timeout)
            return case
        case.ok = True
        case.seconds = float(str(result["seconds"]))
        case.provider_cpu = float(str(result["serve_cpu"]))
        return case

    @contextlib.contextmanager
    def _during(self, case: Case, port: int, home: Path) -> Iterator[None]:
        rid = _shared_id(home) if "tcp-slow-reader" in case.kinds else None
        procs = [_spawn_attacker(k, port, self.args, rid) for k in case.kinds]
        provider = _provider_process()
        sampling = threading.Event()
        sampler = threading.Thread(target=self._sample_rss, args=(case, provider, sampling))
        case.rss_before = _rss(provider)
        sampler.start()
        watchdog = threading.Timer(self.args.download_timeout, self._kill_downloader, (case,))
        try:
            for proc in procs:
                bench_exchange._line(proc)  # ready
            before = _flat(_status(home))
            t0 = time.monotonic()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            watchdog.start()
            try:
                yield
            finally:
                watchdog.cancel()
                with contextlib.suppress(OSError, RuntimeError, ValueError, P2PError):
                    after = _flat(_status(home))
                    case.deltas = {k: v - before.get(k, 0) for k, v in after.items()}
                # (the attack goes on while the node answers: the later time is the
                # conservative one for the rates)
                case.window = time.monotonic() - t0
        finally:
            for proc in procs:
                assert proc.stdin is not None
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            for proc in procs:
                with contextlib.suppress(RuntimeError, ValueError):
                    case.attackers.append(bench_exchange._line(proc))
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            sampling.set()
            sampler.join()
            if procs:
                # the node notices the resets, drops the connections and their buffers
                # and, a second later, gives the freed heap back (net.heap_trims)
                with contextlib.suppress(OSError, RuntimeError, ValueError, P2PError):
                    trims = _flat(_status(home)).get("net.heap_trims", 0)
                    for _ in range(50):
                        now = _flat(_status(home))
                        if now.get("net.connections_inbound", 0) <= 1:
                            break
                        time.sleep(0.1)
                    for _ in range(30):
                        if _flat(_status(home)).get("net.heap_trims", 0) > trims:
                            break
                        time.sleep(0.1)
                case.rss_after = _rss(provider)

    @staticmethod
    def _sample_rss(case: Case, provider: psutil.Process | None, stop: threading.Event) -> None:
        while not stop.wait(0.05):
            case.rss_peak = max(case.rss_peak, _rss(provider))

    def _kill_downloader(self, case: Case) -> None:
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                if "downloader" in child.cmdline():
                    case.timed_out = True
                    child.kill()


def _explain(exc: Exception, case: Case, timeout: float) -> str:
    text = str(exc)
    if case.timed_out:
        return f"no result within --download-timeout {timeout:g} s (downloader killed)"
    if text.startswith("child ") and " exited with " in text:
        role = next((r for r in ("downloader", "provider") if f"'{r}'" in text), "a child")
        return f"the {role} exited with status {text.rsplit(' ', 1)[-1]} (traceback above)"
    return text[:300]


# --- report ----------------------------------------------------------------------------

TCP_CONNS = (
    "net.connections_accepted",
    "net.rejected_per_ip",
    "net.rejected_max_connections",
    "net.rejected_per_subnet",
    "net.rejected_handshakes_per_subnet",
)
TCP_DROPPED = (
    "net.handshake_failures",
    "net.handshake_timeouts",
    "net.oversized_frames",
    "net.tampered_chunks",
    "net.protocol_errors",
    "net.closed_slow_reader",
    "net.evicted_handshakes",
)
JUNK_FRAMES = ("net.bad_messages", "net.unknown_messages", "net.unexpected_responses")
SHOWN_PREFIXES = (
    "dht.rpc_received.",  # honest requests answered
    "exchange.pieces_served",
    "exchange.rejected_busy",
    "exchange.rejected_memory",
    "net.memory_peak",
    "dht.dropped.",
    "dht.datagrams_received",
    "dht.socket_errors",
    *TCP_CONNS,
    *TCP_DROPPED,
    *JUNK_FRAMES,
)


def absorbed(case: Case) -> str:
    w = max(case.window, 1e-9)
    parts = []
    udp = case.delta("dht.datagrams_received")
    dropped = sum(v for k, v in case.deltas.items() if k.startswith("dht.dropped."))
    if dropped > 100:
        parts.append(f"{udp / w:,.0f} datagrams/s ({dropped / w:,.0f} dropped as junk)")
    conns = case.delta(*TCP_CONNS)
    if conns > 5:
        cut = case.delta(*TCP_DROPPED) / w
        refused = case.delta(*TCP_CONNS[1:]) / w
        parts.append(f"{conns / w:,.0f} conns/s ({cut:,.0f} cut, {refused:,.0f} refused)")
    frames = case.delta(*JUNK_FRAMES)
    if frames > 100:
        parts.append(f"{frames / w:,.0f} junk frames/s")
    return "; ".join(parts) or "-"


def sent(case: Case) -> str:
    if not case.attackers:
        return "-"
    ops = sum(int(a["ops"]) for a in case.attackers)
    secs = max(float(a["seconds"]) for a in case.attackers)
    cpu = sum(float(a["cpu"]) for a in case.attackers)
    return f"{ops / max(secs, 1e-9):,.0f}/s, {cpu:.1f} CPU s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="also: all (at once)")
    parser.add_argument("--tcp-threads", type=int, default=4, help="per TCP attacker")
    parser.add_argument("--rate", type=float, default=0, help="ops/s per attacker (0 = max)")
    parser.add_argument("--attacker-ip", default="127.0.0.2", help="attackers' source address")
    parser.add_argument("--handshakes", type=int, default=100, help="bench_net samples")
    parser.add_argument("--clean-runs", type=int, default=2, help="clean runs before attacks")
    parser.add_argument("--window", type=int, default=8, help="requests in flight per peer")
    parser.add_argument("--no-fsync", action="store_true", help="skip the final fsync")
    parser.add_argument("--dir", default=None, help="where to put the files (default: /tmp)")
    parser.add_argument("--download-timeout", type=float, default=45.0)
    parser.add_argument("--attack-max-seconds", type=float, default=120.0)
    parser.add_argument("--dht-size-mib", type=int, default=16, help="file of the dht-* rows")
    # attacker role
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--target-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rid", default="-", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "attack":
        Attacker(args).run()
        return

    kinds = [k for k in args.attacks.split(",") if k]
    unknown = set(kinds) - {*ATTACKS, *HOLDING, *hostile_dht.DHT_ATTACKS, "all"}
    if unknown:
        parser.error(f"unknown attack(s): {', '.join(sorted(unknown))}")
    dht_kinds = [k for k in kinds if k in hostile_dht.DHT_ATTACKS]
    download_kinds = [k for k in kinds if k not in hostile_dht.DHT_ATTACKS]
    t_start = time.monotonic()
    failed: list[str] = []
    if download_kinds or not dht_kinds:
        failed += run_downloads(args, download_kinds)
    if dht_kinds:
        with tempfile.TemporaryDirectory(prefix="bench-hostile-dht-", dir=args.dir) as tmp:
            dht_cases = hostile_dht.run(args, Path(tmp), dht_kinds)
        hostile_dht.print_report(dht_cases)
        failed += [c.label for c in dht_cases if not c.ok]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\ntotal {time.monotonic() - t_start:.0f} s; load average {load} at the end")
    if failed:
        print(f"FAILED (a download, or an honest DHT operation): {', '.join(failed)}")
        sys.exit(1)


def run_downloads(args: argparse.Namespace, kinds: list[str]) -> list[str]:
    """The download rows (clean runs and the network attacks); the failed labels."""
    size = args.size_mib * MiB
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"p2pnode under hostile load: {args.size_mib} MiB download, {os.cpu_count()} cores, "
        f"node on 127.0.0.1, attackers from {args.attacker_ip}; load average {load} at start"
    )
    with tempfile.TemporaryDirectory(prefix="bench-hostile-", dir=args.dir) as tmp:
        base = Path(tmp)
        src = base / "source.bin"
        bench_exchange.make_source(src, size)
        bench_exchange.file_sha256(src)  # warm the page cache
        tcp = [bench_exchange.raw_tcp(size)]
        hs = sorted(bench_net.measure_handshake(args.handshakes))

        harness = Harness(args, base, src)
        cases = [harness.run(Case("clean, encrypted", ())) for _ in range(args.clean_runs)]
        cases.append(harness.run(Case("clean, PLAINTEXT", (), plaintext=True)))
        for kind in kinds:
            case = Case(kind, tuple(ATTACKS) if kind == "all" else (kind,))
            cases.append(harness.run(case))
        cases.append(harness.run(Case("clean, encrypted (again)", ())))
        tcp.append(bench_exchange.raw_tcp(size))

    clean = [c for c in cases if not c.kinds and not c.plaintext and c.ok]
    base_s = min((c.seconds for c in clean), default=0.0)
    print(
        f"raw TCP loopback (blocking sockets): {max(tcp) / 1e9:.2f} GB/s "
        f"(runs {', '.join(f'{t / 1e9:.2f}' for t in tcp)})"
    )
    print(
        f"handshake + first Ping, fresh host, encrypted (bench_net): median "
        f"{statistics.median(hs) * 1e3:.2f} ms, p90 {hs[int(len(hs) * 0.9)] * 1e3:.2f} ms "
        f"({len(hs)} samples, no attack)"
    )
    print(
        f"download baseline: best clean encrypted run, {base_s:.2f} s = "
        f"{size / max(base_s, 1e-9) / 1e9:.2f} GB/s\n"
    )
    head = (
        f"{'case':24s} {'download':>8s} {'GB/s':>5s} {'% TCP':>5s} {'slower':>6s} "
        f"{'ok':>3s} {'window':>6s} {'prov CPU':>8s}  absorbed by the provider (its counters)"
        f"  | attacker sent"
    )
    print(head)
    print("-" * len(head))
    for c in cases:
        if c.ok:
            rate = size / c.seconds
            figures = (
                f"{c.seconds:7.2f}s {rate / 1e9:5.2f} {100 * rate / max(tcp):4.1f}%"
                f" {c.seconds / max(base_s, 1e-9):5.2f}x {'yes':>3s} {c.window:5.1f}s"
                f" {c.provider_cpu:7.2f}s"
            )
        else:
            figures = f"{'FAILED':>8s} {'-':>5s} {'-':>5s} {'-':>6s} {'no':>3s}"
            figures += f" {c.window:5.1f}s {'-':>8s}"
        print(f"{c.label:24s} {figures}  {absorbed(c)}  | {sent(c)}")
        if not c.ok:
            print(f"{'':24s} ^ {c.error}")
    pieces = max((c.delta("exchange.pieces_served") for c in clean), default=0)
    print(
        "\ncounters moved during each attack window (provider, /v1/status; a clean "
        f"download is {pieces:,} pieces served):"
    )
    for c in cases:
        if not c.kinds:
            continue
        moved = {
            k: v
            for k, v in sorted(c.deltas.items())
            if v and k.startswith(SHOWN_PREFIXES) and not k.endswith("_open")
        }
        errors = sum(int(a["errors"]) for a in c.attackers)
        shown = ", ".join(f"{k} {v:,}" for k, v in moved.items())
        print(f"  {c.label}: {shown or '-'}; attacker socket errors {errors:,}")
    held = [c for c in cases if c.kinds and c.rss_peak]
    if held:
        from p2pnode.net.config import NetLimits

        budget = NetLimits().memory_budget
        print(f"\nprovider RSS (MiB; configured memory_budget {budget / MiB:.0f} MiB):")
        for c in held:
            print(
                f"  {c.label:24s} before {c.rss_before / MiB:6.0f}  peak {c.rss_peak / MiB:6.0f}"
                f"  after {c.rss_after / MiB:6.0f}"
            )
    return [c.label for c in cases if not c.ok]


if __name__ == "__main__":
    main()
