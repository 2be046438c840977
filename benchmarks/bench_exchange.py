"""Resource exchange figures (a benchmark, not a test).

    python benchmarks/bench_exchange.py [--size-mib 512] [--providers 1,4] [--repeat 3]
        [--plaintext] [--no-fsync] [--window 8] [--dir /tmp]

In one run, on loopback, each side in its own process:
- two raw TCP baselines, each measured again beside every download (the machine
  may be shared: the best figure of the run is the one ratios use, which is the
  conservative choice): our own loop of blocking 1 MiB sends into recv_into (the
  highest figure here), and iperf3 with its defaults if installed (the usual
  "raw TCP" figure, ~2.5 GB/s on these machines per DESIGN.md);
- a plain file copy to the same disk (after one warm-up copy: a fresh VM pays
  for first-touched page-cache memory), for scale;
- hashing: `sha256sum` on the file next to p2pnode's share (manifest build);
- downloads of the file by one node from 1 provider, then from 4 (each a full
  p2pnode Node: DHT discovery, Noise-encrypted PeerHost, store), to disk, every
  piece verified and the file fsynced before the atomic rename; then the result is
  compared with the source. Printed: best of ``--repeat`` runs as a ratio to raw
  TCP (target >= 40%), every run's rate, the downloader's peak RSS, and the CPU
  seconds per GiB of the downloader and of the providers (on a 2-core machine
  their sum bounds the throughput); last, the CPU floor (benchmarks/cpu_floor.py):
  each step every byte must go through, timed alone, and the throughput those
  steps alone would allow on this many cores. The downloader logs its phases (providers,
  pieces, fsync+rename). BENCH_PROFILE=downloader,provider writes cProfile files
  to /tmp; BENCH_PERF=downloader,provider records those roles with ``perf record``
  (kernel and native frames, only while data moves) to /tmp/bench-perf-*.data.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cpu_floor
from cpu_floor import thread_cpu

MiB = 1024 * 1024


# --- roles (run in child processes) -----------------------------------------------


def _cpu_by_thread() -> dict[str, float]:
    """CPU seconds of the main thread and of all others (Linux /proc)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            name = "main" if int(task.name) == os.getpid() else "others"
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _cpu() -> float:
    """CPU seconds (user + system, all threads) this process used so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def role_tcp_sink() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
    conn, _ = srv.accept()
    cpu0 = thread_cpu()
    buf = bytearray(MiB)
    view = memoryview(buf)
    total = 0
    while True:
        n = conn.recv_into(view)
        if not n:
            break
        total += n
    conn.sendall(b"k")
    conn.close()
    print(json.dumps({"received": total, "cpu": thread_cpu() - cpu0}), flush=True)


async def _node_main(args: argparse.Namespace) -> None:
    from p2pnode import Node, NodeConfig
    from p2pnode.exchange.config import ExchangeConfig
    from p2pnode.exchange.manifest import resource_id_from_str, resource_id_to_str
    from p2pnode.net.config import NetLimits

    bootstrap = (("127.0.0.1", args.bootstrap),) if args.bootstrap else ()
    config = NodeConfig(
        home=Path(args.home),
        host="127.0.0.1",
        port=0,
        bootstrap=bootstrap,
        net=NetLimits(encrypt=not args.plaintext),
        exchange=ExchangeConfig(requests_per_peer=args.window, fsync=not args.no_fsync),
    )
    if args.role == "downloader":
        import logging

        logging.basicConfig(stream=sys.stderr, format="  [downloader] %(message)s")
        logging.getLogger("p2pnode.exchange.fetcher").setLevel(logging.INFO)
    node = Node(config)
    await node.start()
    try:
        if bootstrap:
            await node.wait_joined(timeout=30)
        if args.role == "provider":
            t0 = time.perf_counter()
            info = await node.exchange.share(Path(args.file))
            # Make sure the record reaches the DHT now that we have joined.
            rid = info.resource_id
            from p2pnode.exchange.manifest import dht_key

            await node.discovery.add_provider(dht_key(rid), node.port)
            print(
                json.dumps(
                    {
                        "port": node.port,
                        "id": resource_id_to_str(rid),
                        "share_seconds": time.perf_counter() - t0,
                    }
                ),
                flush=True,
            )
            before = _cpu()
            _perf_toggle(True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
            _perf_toggle(False)
            print(json.dumps({"serve_cpu": _cpu() - before}), flush=True)
        else:
            rid = resource_id_from_str(args.id)
            deadline = time.monotonic() + 30
            while True:
                found = await node.exchange.providers(rid)
                if len(found) >= args.want or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            t0 = time.perf_counter()
            cpu0 = _cpu()
            threads0 = _cpu_by_thread()
            _perf_toggle(True)
            info = await node.exchange.get(rid, Path(args.dest))
            _perf_toggle(False)
            cpu = _cpu() - cpu0
            threads = {k: v - threads0.get(k, 0.0) for k, v in _cpu_by_thread().items()}
            seconds = time.perf_counter() - t0
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(
                json.dumps(
                    {
                        "seconds": seconds,
                        "bytes": info.size,
                        "providers_found": len(found),
                        "peak_rss": peak,
                        "cpu": cpu,
                        "threads": {k: round(v, 3) for k, v in threads.items() if v > 0},
                    }
                ),
                flush=True,
            )
    finally:
        await node.stop()


# --- the parent -------------------------------------------------------------------


def _perf_wrap(argv: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """BENCH_PERF=downloader,provider: run those roles under ``perf record``,
    sampling only while they move data (the role toggles perf through the fifo
    named in its BENCH_PERF_CTL). Returns the command prefix and the child's env."""
    env = {k: v for k, v in os.environ.items() if k != "BENCH_PERF_CTL"}
    roles = os.environ.get("BENCH_PERF", "")
    role = argv[argv.index("--role") + 1] if "--role" in argv else ""
    if not role or role not in roles or shutil.which("perf") is None:
        return [], env
    tag = f"{role}-{time.monotonic_ns()}"
    ctl = Path(tempfile.gettempdir()) / f"bench-perf-{tag}.ctl"
    os.mkfifo(ctl)
    env["BENCH_PERF_CTL"] = str(ctl)
    out = Path(tempfile.gettempdir()) / f"bench-perf-{tag}.data"
    print(f"  [perf] {role} -> {out}", file=sys.stderr)
    return ["perf", "record", "-q", "-e", "cpu-clock", "-F", "2999", "-D", "-1",
            "--control", f"fifo:{ctl}", "-o", str(out), "--"], env  # fmt: skip


def _perf_toggle(on: bool) -> None:
    ctl = os.environ.get("BENCH_PERF_CTL")
    if ctl:
        with open(ctl, "w") as f:
            f.write("enable\n" if on else "disable\n")


def _spawn(*argv: str) -> subprocess.Popen[str]:
    prefix, env = _perf_wrap(argv)
    return subprocess.Popen(
        [*prefix, sys.executable, __file__, *argv],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _line(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"child {proc.args} exited with {proc.wait()}")
    return dict(json.loads(line))


RAW_CPU: dict[str, float] = {}  # the best raw run's CPU s/GiB: "send", "recv"


def raw_tcp(size: int) -> float:
    sink = _spawn("--role", "tcp-sink")
    port = int(str(_line(sink)["port"]))
    chunk = memoryview(os.urandom(MiB))
    sock = socket.create_connection(("127.0.0.1", port))
    cpu0 = thread_cpu()
    t0 = time.perf_counter()
    sent = 0
    while sent < size:
        sock.sendall(chunk)
        sent += len(chunk)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)
    seconds = time.perf_counter() - t0
    send_cpu = thread_cpu() - cpu0
    sock.close()
    recv_cpu = float(str(_line(sink)["cpu"]))
    sink.wait()
    if not RAW_CPU or seconds < RAW_CPU["seconds"]:
        gib = sent / 1024**3
        RAW_CPU.update(seconds=seconds, send=send_cpu / gib, recv=recv_cpu / gib)
    return sent / seconds


def iperf3_rate(seconds: int = 2) -> float | None:
    """iperf3 on loopback with its defaults (128 KiB writes), if installed: the
    usual "raw TCP" figure (DESIGN.md's ~2.5 GB/s, the one the issue quotes). Our
    own raw_tcp (1 MiB sends) is higher; both ratios are printed."""
    tool = shutil.which("iperf3")
    if tool is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [tool, "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            out = subprocess.run(
                [tool, "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
                capture_output=True,
                text=True,
            )
            if out.returncode == 0:
                return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 8
            time.sleep(0.1)  # the server was not listening yet
        return None
    finally:
        server.kill()
        server.wait()


def copy_rate(src: Path, dst: Path) -> float:
    """The file copied once to warm up (a fresh VM pays for first-touched page-cache
    memory), then again, timed: what writing this much to this disk costs."""
    shutil.copyfile(src, dst)
    dst.unlink()
    t0 = time.perf_counter()
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - t0
    dst.unlink()
    return src.stat().st_size / seconds


def sha256sum_seconds(path: Path) -> float | None:
    tool = shutil.which("sha256sum")
    if tool is None:
        return None
    t0 = time.perf_counter()
    subprocess.run([tool, str(path)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.digest()


def make_source(path: Path, size: int) -> None:
    """A file of ``size`` random bytes whose 4 MiB blocks (and pieces) all differ."""
    with open(path, "wb") as f:
        block = os.urandom(4 * MiB)
        for _ in range(size // len(block)):
            f.write(block[:1] + os.urandom(15) + block[16:])  # distinct pieces
        f.write(os.urandom(size % len(block)))


During = Callable[[int, Path], contextlib.AbstractContextManager[object]]


def download(
    base: Path, src: Path, providers: int, common: list[str], during: During | None = None
) -> tuple[dict[str, object], float]:
    """One download of ``src`` by a fresh node from ``providers`` fresh nodes.

    ``during(port, home)`` (of the first provider), if given, is entered just
    before the downloader starts and left once it has reported or failed:
    bench_hostile.py attacks the provider meanwhile.
    """
    base = Path(tempfile.mkdtemp(prefix=f"run-{providers}-", dir=base))
    procs: list[subprocess.Popen[str]] = []
    try:
        first: dict[str, object] | None = None
        share_seconds = 0.0
        for i in range(providers):
            argv = ["--role", "provider", "--home", str(base / f"p{providers}-{i}")]
            argv += ["--file", str(src), *common]
            if first is not None:
                argv += ["--bootstrap", str(first["port"])]
            proc = _spawn(*argv)
            procs.append(proc)
            info = _line(proc)
            if first is None:
                first = info
                share_seconds = float(str(info["share_seconds"]))
        assert first is not None
        dest = base / f"out-{providers}.bin"
        home = base / f"p{providers}-0"
        with during(int(str(first["port"])), home) if during else contextlib.nullcontext():
            leech = _spawn(
                "--role", "downloader", "--home", str(base / f"d{providers}"),
                "--bootstrap", str(first["port"]), "--id", str(first["id"]),
                "--dest", str(dest), "--want", str(providers), *common,
            )  # fmt: skip
            procs.append(leech)
            result = _line(leech)
            leech.wait()
        if file_sha256(dest) != file_sha256(src):
            raise RuntimeError("downloaded file differs from the source")
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()  # a folder: bench_small_files
        serve_cpu = 0.0
        for proc in procs[:-1]:
            assert proc.stdin is not None
            proc.stdin.close()
            serve_cpu += float(str(_line(proc)["serve_cpu"]))
        result["serve_cpu"] = serve_cpu
        return result, share_seconds
    finally:
        for proc in procs:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", default="main")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--providers", default="1,4")
    parser.add_argument("--plaintext", action="store_true", help="no encryption (comparison)")
    parser.add_argument("--window", type=int, default=8, help="requests in flight per peer")
    parser.add_argument("--no-fsync", action="store_true", help="skip the final fsync")
    parser.add_argument("--dir", default=None, help="where to put the files (default: /tmp)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (best is shown)")
    # child roles
    parser.add_argument("--home")
    parser.add_argument("--file")
    parser.add_argument("--bootstrap", type=int, default=0)
    parser.add_argument("--id")
    parser.add_argument("--dest")
    parser.add_argument("--want", type=int, default=1)
    args = parser.parse_args()
    if args.role == "tcp-sink":
        role_tcp_sink()
        return
    if args.role in ("provider", "downloader"):
        prof = os.environ.get("BENCH_PROFILE", "")
        if prof and args.role in prof:
            import cProfile

            cProfile.runctx(
                "asyncio.run(_node_main(args))",
                globals(),
                {"args": args, "asyncio": asyncio, "_node_main": _node_main},
                f"/tmp/bench-{args.role}-{os.getpid()}.prof",
            )
        else:
            asyncio.run(_node_main(args))
        return

    size = args.size_mib * MiB
    common = ["--window", str(args.window)] + (["--plaintext"] if args.plaintext else [])
    common += ["--no-fsync"] if args.no_fsync else []
    with tempfile.TemporaryDirectory(prefix="bench-exchange-", dir=args.dir) as tmp:
        base = Path(tmp)
        src = base / "source.bin"
        make_source(src, size)
        file_sha256(src)  # warm the page cache
        disk = copy_rate(src, base / "copy.bin")

        print(f"p2pnode exchange benchmark: {args.size_mib} MiB file, {os.cpu_count()} cores, "
              f"{'PLAINTEXT' if args.plaintext else 'encrypted (Noise)'} channel")  # fmt: skip
        tcp = raw_tcp(size)
        print(f"raw TCP loopback (blocking sockets):       {tcp / 1e9:6.2f} GB/s")
        iperf_rates = [r for r in [iperf3_rate()] if r is not None]
        if iperf_rates:
            print(f"iperf3 loopback (its defaults):            {iperf_rates[0] / 1e9:6.2f} GB/s")
        print(f"disk: copying the file (shutil.copyfile):  {disk / 1e9:6.2f} GB/s")

        sha = sha256sum_seconds(src)
        from p2pnode.exchange.manifest import build_manifest

        t0 = time.perf_counter()
        manifest, _ = build_manifest(src)
        ours = time.perf_counter() - t0
        shown = f"{sha:.2f} s" if sha is not None else "n/a"
        print(
            f"hash for share: p2pnode {ours:.2f} s ({size / ours / 1e9:.2f} GB/s, "
            f"{manifest.piece_count} pieces of {manifest.piece_size // 1024} KiB); "
            f"sha256sum {shown}" + (f" -> ratio {sha / ours:.2f}x" if sha else "")
        )
        raw_rates = [tcp]
        for n in [int(x) for x in args.providers.split(",") if x]:
            runs = []
            for _ in range(max(1, args.repeat)):
                tcp_now = raw_tcp(size)  # baselines next to each run: the box is shared
                raw_rates.append(tcp_now)
                iperf_rates += [r for r in [iperf3_rate(1)] if r is not None]
                result, share_seconds = download(base, src, n, common)
                runs.append((float(str(result["seconds"])), tcp_now, result, share_seconds))
            seconds, tcp_now, result, share_seconds = min(runs, key=lambda r: r[0])
            best_tcp = max(tcp, *(r[1] for r in runs))
            iperf = max(iperf_rates, default=None)
            rate = size / seconds
            peak = max(int(str(r[2]["peak_rss"])) for r in runs)
            all_rates = ", ".join(f"{size / r[0] / 1e9:.2f}" for r in runs)
            gib = size / 1024**3
            print(
                f"download from {n} provider(s): best {seconds:5.2f} s  {rate / 1e9:5.2f} GB/s "
                f"= {100 * rate / best_tcp:5.1f}% of raw TCP (best of this run, "
                f"{best_tcp / 1e9:.2f} GB/s; target >= 40%)"
                + (
                    f", {100 * rate / iperf:5.1f}% of iperf3 (best of this run, "
                    f"{iperf / 1e9:.2f} GB/s)"
                    if iperf
                    else ""
                )
                + f", {100 * rate / disk:5.1f}% of disk copy\n"
                f"    runs [{all_rates}] GB/s; downloader peak RSS {peak / MiB:.0f} MiB; "
                f"CPU per GiB: downloader {float(str(result['cpu'])) / gib:.2f} s, "
                f"provider(s) {float(str(result['serve_cpu'])) / gib:.2f} s; "
                f"share in node {share_seconds:.2f} s\n"
                f"    downloader CPU s by thread (best run): {result.get('threads')}"
            )
        if not args.plaintext:
            steps = cpu_floor.measure(src)
            print(cpu_floor.report(steps, RAW_CPU["send"], RAW_CPU["recv"], max(raw_rates)))


if __name__ == "__main__":
    main()
