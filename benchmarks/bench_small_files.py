"""Many small files (a benchmark, not a test).

    python benchmarks/bench_small_files.py [--files 10000] [--repeat 2] [--dir /tmp]
        [--no-libtorrent] [--durability]

Generates, with a fixed seed, a folder of ``--files`` files of 2-5 KB in 100
subfolders (~31 MiB for 10,000), then in the same run, alternating, measures:

- ``get`` end to end between two p2pnode nodes on loopback, each in its own
  process (bench_exchange.download: DHT lookup, manifest, pieces, fsync, rename),
  against libtorrent (its PyPI wheel, seeder and downloader in two processes,
  TCP only, default settings otherwise: note it does not fsync);
- ``share`` of the folder (in a node: scan, hash, store rows) against a BLAKE3
  hash of every file's bytes (``b3sum`` if installed, else the blake3 module);
- a local copy (``get`` of an id that is already here) against ``cp -r``.

Prints every run and the ratios of the best runs. ``--durability`` instead times
the ways to make a fresh copy of the tree durable (exchange/durable.py's choice).
Figures are noisy on a shared machine: run it twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench_exchange

SEED = 15


def make_tree(root: Path, files: int) -> int:
    """``files`` files of 2-5 KB spread over 100 subfolders; returns total bytes."""
    rng = random.Random(SEED)
    total = 0
    folders = [root / f"d{k:03d}" for k in range(100)]
    for folder in folders:
        folder.mkdir(parents=True)
    for i in range(files):
        size = rng.randint(2000, 5000)
        (folders[i % 100] / f"f{i:05d}.bin").write_bytes(rng.randbytes(size))
        total += size
    return total


def tree_digest(path: Path) -> bytes:
    """A digest of a folder's relative paths and contents (for comparing copies)."""
    from blake3 import blake3

    h = blake3()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            h.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                h.update(f.read())
    return h.digest()


def blake3_seconds(root: Path) -> tuple[float, str]:
    """Hash every file's bytes: b3sum if installed, else the blake3 module."""
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    tool = shutil.which("b3sum")
    t0 = time.perf_counter()
    if tool is not None:
        subprocess.run([tool, *files], check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0, "b3sum"
    from blake3 import blake3

    def one(path: str) -> bytes:
        with open(path, "rb") as f:
            return blake3(f.read()).digest()

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(one, files, chunksize=256))
    return time.perf_counter() - t0, "blake3 module"


# --- libtorrent (child processes) ----------------------------------------------


def _lt_session(lt: object) -> object:
    settings = {
        "listen_interfaces": "127.0.0.1:0",
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_incoming_utp": False,
        "enable_outgoing_utp": False,
        "alert_mask": 0,
    }
    return lt.session(settings)  # type: ignore[attr-defined]


def role_lt_seeder(torrent: str, save: str) -> None:
    import libtorrent as lt

    ses = _lt_session(lt)
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(torrent)
    atp.save_path = save
    atp.flags |= lt.torrent_flags.seed_mode
    ses.add_torrent(atp)  # type: ignore[attr-defined]
    print(json.dumps({"port": ses.listen_port()}), flush=True)  # type: ignore[attr-defined]
    sys.stdin.read()  # until the parent is done


def role_lt_downloader(torrent: str, save: str, port: int) -> None:
    import libtorrent as lt

    ses = _lt_session(lt)
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(torrent)
    atp.save_path = save
    t0 = time.perf_counter()
    handle = ses.add_torrent(atp)  # type: ignore[attr-defined]
    handle.connect_peer(("127.0.0.1", port))
    deadline = time.monotonic() + 120
    while not handle.status().is_seeding:
        if time.monotonic() > deadline:
            raise SystemExit("libtorrent download timed out")
        time.sleep(0.005)  # polling a C++ session: nothing to await
    seconds = time.perf_counter() - t0
    handle.flush_cache()
    print(json.dumps({"seconds": seconds}), flush=True)


def make_torrent(src: Path, out: Path) -> None:
    import libtorrent as lt

    fs = lt.file_storage()
    lt.add_files(fs, str(src))
    ct = lt.create_torrent(fs)
    lt.set_piece_hashes(ct, str(src.parent))
    out.write_bytes(lt.bencode(ct.generate()))


def libtorrent_get(base: Path, src: Path, torrent: Path) -> float:
    dest = Path(tempfile.mkdtemp(prefix="lt-", dir=base))
    me = str(Path(__file__))
    seeder = subprocess.Popen(
        [sys.executable, me, "--role", "lt-seeder", "--torrent", str(torrent), "--save",
         str(src.parent)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = int(str(bench_exchange._line(seeder)["port"]))
        out = subprocess.run(
            [sys.executable, me, "--role", "lt-downloader", "--torrent", str(torrent),
             "--save", str(dest), "--port", str(port)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        seconds = float(json.loads(out.stdout.splitlines()[-1])["seconds"])
        if tree_digest(dest / src.name) != tree_digest(src):
            raise RuntimeError("libtorrent's copy differs from the source")
        return seconds
    finally:
        assert seeder.stdin is not None
        seeder.stdin.close()
        seeder.wait(timeout=30)
        shutil.rmtree(dest, ignore_errors=True)


# --- p2pnode ---------------------------------------------------------------------


def p2pnode_get(base: Path, src: Path) -> tuple[float, float]:
    """bench_exchange.download with a folder: (get seconds, share seconds in the node)."""
    real = bench_exchange.file_sha256
    bench_exchange.file_sha256 = tree_digest  # the folder is compared as a tree
    try:
        result, share_seconds = bench_exchange.download(base, src, 1, ["--window", "8"])
    finally:
        bench_exchange.file_sha256 = real
    return float(str(result["seconds"])), share_seconds


async def _share_and_copy(home: Path, src: Path, dest: Path) -> tuple[float, float]:
    from p2pnode import Node, NodeConfig

    node = Node(NodeConfig(home=home, host="127.0.0.1", port=0))
    await node.start()
    try:
        t0 = time.perf_counter()
        info = await node.exchange.share(src)
        share = time.perf_counter() - t0
        t0 = time.perf_counter()
        await node.exchange.get(info.resource_id, dest)
        copy = time.perf_counter() - t0
    finally:
        await node.stop()
    return share, copy


def share_and_copy(base: Path, src: Path) -> tuple[float, float]:
    """Share in a fresh node, then ``get`` the same id (a local copy)."""
    work = Path(tempfile.mkdtemp(prefix="local-", dir=base))
    try:
        dest = work / "copy"
        share, copy = asyncio.run(_share_and_copy(work / "home", src, dest))
        if tree_digest(dest) != tree_digest(src):
            raise RuntimeError("the local copy differs from the source")
        return share, copy
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cp_r_seconds(base: Path, src: Path, *, sync: bool = False) -> float:
    """``cp -r``; with ``sync``, then ``sync -f`` (syncfs), the durability a local
    copy promises."""
    dest = base / "cp-r"
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dest)], check=True)
    if sync:
        subprocess.run(["sync", "-f", str(dest)], check=True)
    seconds = time.perf_counter() - t0
    shutil.rmtree(dest)
    return seconds


def durability_options(base: Path, src: Path) -> None:
    """How long making a just-written copy of the tree durable takes, per option
    (exchange/durable.py chose from these): fsync per file in a row, fsyncs from
    thread pools, sync_file_range(WRITE) per file then syncfs, syncfs alone."""
    import ctypes

    from p2pnode.exchange.durable import syncfs

    libc = ctypes.CDLL(None, use_errno=True)

    def fsync_one(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def in_a_row(paths: list[Path], fd: int) -> None:
        for path in paths:
            fsync_one(path)

    def pool(n: int) -> Callable[[list[Path], int], None]:
        def run(paths: list[Path], fd: int) -> None:
            with ThreadPoolExecutor(n) as ex:
                list(ex.map(fsync_one, paths, chunksize=16))

        return run

    def range_then_syncfs(paths: list[Path], fd: int) -> None:
        for path in paths:
            f = os.open(path, os.O_RDONLY)
            libc.sync_file_range(f, ctypes.c_longlong(0), ctypes.c_longlong(0), 2)
            os.close(f)
        syncfs(fd)

    options: dict[str, Callable[[list[Path], int], None]] = {
        "fsync per file, in a row": in_a_row,
        "fsyncs from 16 threads": pool(16),
        "fsyncs from 64 threads": pool(64),
        "sync_file_range + syncfs": range_then_syncfs,
        "syncfs": lambda paths, fd: (syncfs(fd), None)[1],
    }
    print("durability of a fresh copy of the tree (best of 2, alternating):")
    best: dict[str, float] = {}
    for _ in range(2):
        for name, run in options.items():
            dest = base / "durable"
            shutil.copytree(src, dest)
            paths = [p for p in dest.rglob("*") if p.is_file()]
            fd = os.open(dest, os.O_RDONLY)
            t0 = time.perf_counter()
            run(paths, fd)
            seconds = time.perf_counter() - t0
            os.close(fd)
            shutil.rmtree(dest)
            best[name] = min(best.get(name, seconds), seconds)
    for name, seconds in best.items():
        print(f"  {name:28s} {seconds:6.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", default="main")
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=2, help="runs per case (best is used)")
    parser.add_argument("--dir", default=None, help="where to put the files (default: /tmp)")
    parser.add_argument("--no-libtorrent", action="store_true")
    parser.add_argument(
        "--durability", action="store_true", help="only time the ways to make a copy durable"
    )
    parser.add_argument("--torrent")
    parser.add_argument("--save")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.role == "lt-seeder":
        role_lt_seeder(args.torrent, args.save)
        return
    if args.role == "lt-downloader":
        role_lt_downloader(args.torrent, args.save, args.port)
        return

    lt_ok = not args.no_libtorrent
    if lt_ok:
        try:
            import libtorrent  # noqa: F401
        except ImportError:
            print("libtorrent not installed (pip install libtorrent): skipped")
            lt_ok = False
    with tempfile.TemporaryDirectory(prefix="bench-small-", dir=args.dir) as tmp:
        base = Path(tmp)
        src = base / "tree"
        total = make_tree(src, args.files)
        if args.durability:
            durability_options(base, src)
            return
        torrent = base / "tree.torrent"
        if lt_ok:
            make_torrent(src, torrent)
        print(
            f"small files: {args.files} files, {total / 2**20:.1f} MiB in 100 folders "
            f"(seed {SEED}), {os.cpu_count()} cores"
        )
        runs: dict[str, list[float]] = {}
        hash_tool = ""
        for _ in range(max(1, args.repeat)):
            # Alternate the cases: the machine may be shared.
            seconds, hash_tool = blake3_seconds(src)
            runs.setdefault("blake3", []).append(seconds)
            runs.setdefault("cp -r", []).append(cp_r_seconds(base, src))
            runs.setdefault("cp -r + sync -f", []).append(cp_r_seconds(base, src, sync=True))
            share, copy = share_and_copy(base, src)
            runs.setdefault("share", []).append(share)
            runs.setdefault("local copy", []).append(copy)
            get, _ = p2pnode_get(base, src)
            runs.setdefault("p2pnode get", []).append(get)
            if lt_ok:
                runs.setdefault("libtorrent", []).append(libtorrent_get(base, src, torrent))
        best = {k: min(v) for k, v in runs.items()}
        for name, values in runs.items():
            shown = ", ".join(f"{v:.3f}" for v in values)
            label = f"{name} ({hash_tool})" if name == "blake3" else name
            print(f"  {label:28s} best {best[name]:6.3f} s   runs [{shown}]")
        print("ratios (best against best):")
        if "libtorrent" in best:
            print(
                f"  p2pnode get / libtorrent       {best['p2pnode get'] / best['libtorrent']:5.2f}x"
                "  (target <= 1)"
            )
        print(f"  share / blake3 of the tree     {best['share'] / best['blake3']:5.2f}x")
        print(
            f"  local copy / cp -r             {best['local copy'] / best['cp -r']:5.2f}x"
            "  (target <= ~3)"
        )
        print(
            f"  local copy / cp -r + sync -f   "
            f"{best['local copy'] / best['cp -r + sync -f']:5.2f}x  (both durable)"
        )


if __name__ == "__main__":
    main()
