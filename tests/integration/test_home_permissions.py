"""A real node's home is private whatever the umask: the folder 0700 and every file in
it 0600 (identity key, SQLite index with -wal and -shm, control token and address,
lock, saved contacts); an existing home with looser modes is tightened at start."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from p2pnode import Node
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.home import CONTACTS_FILE, CONTROL_FILE, INDEX_FILE, LOCK_FILE, TOKEN_FILE
from p2pnode.identity import KEY_FILE
from tests.cli_helpers import RunningNode, run_cli
from tests.helpers import eventually, fast_config

EXCHANGE = ExchangeConfig(fsync=False, stale_check_interval=0, progress_interval=0.0)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(home: Path) -> dict[str, int]:
    """Every entry under ``home`` (home itself as '.') -> its permission bits."""
    found = {".": stat.S_IMODE(home.lstat().st_mode)}
    for root, dirs, files in os.walk(home):
        for name in dirs + files:
            path = Path(root, name)
            found[str(path.relative_to(home))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_private(home: Path) -> dict[str, int]:
    found = modes(home)
    loose = {
        name: oct(mode)
        for name, mode in found.items()
        if mode != (0o700 if (home / name).is_dir() else 0o600)
    }
    assert not loose, loose
    return found


@pytest.mark.parametrize("mask", [0o000, 0o022])
async def test_a_new_home_is_private_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    home = tmp_path / "parent" / "home"  # a missing parent too
    shared = tmp_path / "file.bin"
    shared.write_bytes(os.urandom(4096))
    with umask(mask):
        async with Node(fast_config(tmp_path / "peer", exchange=EXCHANGE)) as peer:
            node = Node(fast_config(home, (("127.0.0.1", peer.port),), exchange=EXCHANGE))
            await node.start()
            try:
                await node.exchange.share(shared)  # writes to the index: -wal and -shm
                # A contact, so that stop saves the routing table.
                await eventually(lambda: node.status()["routing_table_size"] > 0)
                running = assert_private(home)
            finally:
                await node.stop()
    expected = {KEY_FILE, INDEX_FILE, INDEX_FILE + "-wal", INDEX_FILE + "-shm"}
    expected |= {TOKEN_FILE, CONTROL_FILE, LOCK_FILE}
    assert expected <= running.keys(), running
    stopped = assert_private(home)
    assert CONTACTS_FILE in stopped


async def test_an_old_loose_home_is_tightened_at_start_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "home"
    with umask(0o022):
        async with Node(fast_config(home, exchange=EXCHANGE)):
            pass
    # As an older version left it: everything readable by all.
    (home / "downloads" / "sub").mkdir(parents=True)
    (home / "downloads" / "sub" / "got.txt").write_text("x")
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    outside.chmod(0o644)
    (home / "downloads" / "link").symlink_to(outside)
    for name in modes(home):
        if not (home / name).is_symlink():
            (home / name).chmod(0o777 if (home / name).is_dir() else 0o644)
    # Not the node's: left as they are (the 0700 home keeps others out).
    (home / "mine").mkdir(mode=0o755)
    (home / "mine" / "notes.txt").write_text("x")
    (home / "mine" / "notes.txt").chmod(0o644)
    caplog.set_level(logging.WARNING, logger="p2pnode.home")
    async with Node(fast_config(home, exchange=EXCHANGE)):
        found = modes(home)
    assert found.pop("downloads/link") == 0o777  # a link: its own bits mean nothing
    assert (found.pop("mine"), found.pop("mine/notes.txt")) == (0o755, 0o644)
    loose = {n: oct(m) for n, m in found.items() if m & 0o077}
    assert not loose, loose
    assert found["."] == 0o700
    assert found[KEY_FILE] == found[INDEX_FILE] == 0o600
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644  # not followed
    lines = [r.getMessage() for r in caplog.records if r.name == "p2pnode.home"]
    assert any("made them owner-only" in line and KEY_FILE in line for line in lines), lines
    assert not any("mine" in line for line in lines)


def test_the_cli_node_under_umask_0_keeps_its_home_private(
    tmp_path: Path, nodes: list[RunningNode]
) -> None:
    home = tmp_path / "cli-home"
    with umask(0o000):  # inherited by the `p2pnode start` process
        node = RunningNode(home)
    nodes.append(node)
    running = assert_private(home)
    assert {KEY_FILE, INDEX_FILE, TOKEN_FILE, CONTROL_FILE} <= running.keys(), running
    run_cli("--home", str(home), "stop")
    assert node.wait() == 0
    assert_private(home)
