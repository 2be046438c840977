"""A shared folder arrives as the same tree (issue 14, defect 3): nested empty
folders included, and what a followed symbolic link points to as regular files;
compared like ``diff -r`` (filecmp.dircmp, which follows links as diff does)."""

from __future__ import annotations

import filecmp
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from p2pnode.dht import DhtConfig, Discovery
from p2pnode.errors import UsageError
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.service import Exchange
from p2pnode.identity import Identity
from p2pnode.net.config import NetLimits
from p2pnode.net.host import PeerHost

CONFIG = ExchangeConfig(
    requests_per_peer=4,
    piece_timeout=5.0,
    manifest_timeout=5.0,
    rediscover_attempts=1,
    rediscover_delay=0.05,
    fsync=False,
    io_threads=2,
    stale_check_interval=0,
    progress_interval=0.0,
)
DHT = DhtConfig(rpc_timeout=1.0, lookup_timeout=5.0)

Factory = Callable[..., Awaitable[tuple[Exchange, int]]]


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[Factory]:
    parts: list[tuple[Exchange, PeerHost, Discovery]] = []

    async def factory(name: str, bootstrap_udp: int | None = None) -> tuple[Exchange, int]:
        identity = Identity.generate()
        discovery = Discovery(identity, DHT)
        udp = await discovery.listen("127.0.0.1", 0)
        host = PeerHost(identity, NetLimits(request_timeout=10.0))
        tcp = await host.listen("127.0.0.1", 0)
        exchange = Exchange(tmp_path / name, CONFIG, discovery, host, tcp)
        await exchange.start()
        parts.append((exchange, host, discovery))
        if bootstrap_udp is not None:
            assert await discovery.bootstrap([("127.0.0.1", bootstrap_udp)])
        return exchange, udp

    yield factory
    for exchange, host, discovery in reversed(parts):
        await exchange.close()
        await host.close()
        await discovery.close()


def _same_tree(left: Path, right: Path) -> None:
    """Like ``diff -r left right`` finding nothing."""
    cmp = filecmp.dircmp(left, right)
    stack = [cmp]
    while stack:
        c = stack.pop()
        assert not c.left_only and not c.right_only, (c.left, c.left_only, c.right_only)
        assert not c.common_funny and not c.funny_files, (c.left, c.common_funny)
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        assert not mismatch and not errors, (c.left, mismatch, errors)
        stack.extend(c.subdirs.values())


def _no_links(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            assert not os.path.islink(os.path.join(dirpath, name)), name


def _make_tree(root: Path) -> None:
    files = {
        "a/b/deep.bin": os.urandom(200_000),
        "a/small.txt": b"hello",
        "a/zero": b"",
        "top.dat": os.urandom(70_000),
    }
    for rel, blob in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(blob)
    for rel in ("a/b/empty", "e1/e2/e3", "only-empty", "a/\u00e9t\u00e9 vide"):
        (root / rel).mkdir(parents=True)


async def test_folder_with_nested_empty_folders_arrives_whole(
    make_node: Factory, tmp_path: Path
) -> None:
    seed, seed_udp = await make_node("seed")
    leech, _ = await make_node("leech", bootstrap_udp=seed_udp)
    src = tmp_path / "tree"
    _make_tree(src)
    info = await seed.share(src)
    assert info.empty_folders == 4 and info.files == 4
    assert info.links is not None and info.links.startswith("refused")
    assert info.to_json()["empty_folders"] == 4

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    got = await leech.get(info.resource_id, downloads)
    assert got.path == str(downloads / "tree") and got.empty_folders == 4
    _same_tree(src, downloads / "tree")
    assert (downloads / "tree" / "e1" / "e2" / "e3").is_dir()
    assert not (downloads / "tree.p2pnode-partial").exists()

    # Already here: the local copy is the same tree too.
    copy = await leech.get(info.resource_id, tmp_path / "copy")
    assert copy.path == str(tmp_path / "copy")
    _same_tree(src, tmp_path / "copy")


async def test_links_refused_by_default_followed_inside_when_asked(
    make_node: Factory, tmp_path: Path
) -> None:
    seed, seed_udp = await make_node("seed")
    leech, _ = await make_node("leech", bootstrap_udp=seed_udp)
    src = tmp_path / "tree"
    _make_tree(src)
    (src / "to-b").symlink_to("a/b")  # a folder inside, with an empty folder in it
    (src / "a" / "alias.txt").symlink_to("small.txt")
    with pytest.raises(UsageError, match=r"alias.txt' is a symbolic link.*--follow-links"):
        await seed.share(src)
    (tmp_path / "secret").write_bytes(b"secret")
    (src / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(UsageError, match=r"leak' is a symbolic link to .*outside"):
        await seed.share(src, follow_links=True)
    (src / "leak").unlink()

    info = await seed.share(src, follow_links=True)
    assert info.links is not None and info.links.startswith("followed: 2 link(s)")
    assert info.empty_folders == 5  # to-b/empty too
    dest = tmp_path / "got"
    await leech.get(info.resource_id, dest)
    _same_tree(src, dest)  # dircmp follows the source's links, as diff -r does
    _no_links(dest)
    assert (dest / "to-b" / "deep.bin").read_bytes() == (src / "a/b/deep.bin").read_bytes()


async def test_manifest_path_1500_levels_deep_refused_cleanly(
    make_node: Factory, tmp_path: Path
) -> None:
    """Issue 11, hostile: a provider serves a manifest whose one path is 1,500
    levels deep. The download fails with a clear ProtocolError (it used to crash
    with RecursionError), leaving no row in the store and nothing on disk."""
    from blake3 import blake3

    from p2pnode.errors import ProtocolError
    from p2pnode.exchange.manifest import Entry, FileStat, Manifest

    seed, seed_udp = await make_node("seed")
    leech, _ = await make_node("leech", bootstrap_udp=seed_udp)
    rel = "/".join(["d"] * 1499 + ["f"])
    # Built unchecked (the dataclass, not Manifest.create): what a hostile node sends.
    bad = Manifest("dir", "deep", 16 * 1024, (Entry(rel, 1, 0),), blake3(b"x").digest())
    seed.store.add_shared(bad, tmp_path / "nowhere", [FileStat(rel, 1, 0)])
    await seed._announce(bad.resource_id)  # what share() does once the row is in

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with pytest.raises(ProtocolError, match="1500 levels deep"):
        await leech.get(bad.resource_id, downloads)
    assert leech.store.get(bad.resource_id) is None
    assert list(downloads.iterdir()) == []
