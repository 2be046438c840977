"""Config parsing and the home folder's files: pure, no sockets."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from p2pnode.config import default_home, parse_host_port
from p2pnode.control import ui
from p2pnode.errors import NodeNotRunning, UsageError
from p2pnode.exchange.store import DB_NAME
from p2pnode.home import (
    CONTACTS_FILE,
    DOWNLOADS_DIR,
    INDEX_FILE,
    HomeLock,
    SavedContact,
    clear_control,
    load_contacts,
    make_private_dir,
    read_config_file,
    read_control,
    save_contacts,
    write_atomic,
    write_control,
)
from p2pnode.identity import KEY_FILE, Identity


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:4001", ("127.0.0.1", 4001)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:4001", ("::1", 4001)),
        (" example.org:65535 ", ("example.org", 65535)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    "text", ["4001", "host:", ":4001", "host:0", "host:70000", "host:abc", "::1:4001", "[::1]4001"]
)
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_host_port(text)


def test_default_home_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("P2PNODE_HOME", str(tmp_path / "h"))
    assert default_home() == tmp_path / "h"


def test_contacts_round_trip_and_damage(tmp_path: Path) -> None:
    contacts = [SavedContact(bytes([i]) * 20, "127.0.0.1", 4000 + i) for i in range(3)]
    save_contacts(tmp_path, contacts)
    assert load_contacts(tmp_path) == contacts
    (tmp_path / CONTACTS_FILE).write_text("{not json")
    assert load_contacts(tmp_path) == []
    bad_rows = {
        "contacts": [
            {"id": "zz", "host": "h", "port": 1},
            {"id": "00" * 20},
            7,
            {"id": "11" * 20, "host": "h", "port": 99999},
        ]
    }
    (tmp_path / CONTACTS_FILE).write_text(json.dumps(bad_rows))
    assert load_contacts(tmp_path) == []


def test_home_lock_is_exclusive(tmp_path: Path) -> None:
    first, second = HomeLock(tmp_path), HomeLock(tmp_path)
    first.acquire()
    with pytest.raises(UsageError, match="already running"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


def test_control_files(tmp_path: Path) -> None:
    with pytest.raises(NodeNotRunning):
        read_control(tmp_path)
    write_control(tmp_path, "http://127.0.0.1:1234", "secret")
    assert stat.S_IMODE((tmp_path / "api.token").stat().st_mode) == 0o600
    info = read_control(tmp_path)
    assert (info.url, info.token) == ("http://127.0.0.1:1234", "secret")
    clear_control(tmp_path)
    with pytest.raises(NodeNotRunning):
        read_control(tmp_path)


def test_config_file(tmp_path: Path) -> None:
    assert read_config_file(tmp_path) == {}
    (tmp_path / "config.toml").write_text('port = 4005\nbootstrap = ["127.0.0.1:4001"]\n')
    assert read_config_file(tmp_path) == {"port": 4005, "bootstrap": ["127.0.0.1:4001"]}
    (tmp_path / "config.toml").write_text("port = = 1")
    with pytest.raises(UsageError):
        read_config_file(tmp_path)


def _remove_deep(top: Path) -> None:
    """rmtree recurses once per level: remove a deep chain of folders bottom-up."""
    chain = [top]
    while True:
        inner = [p for p in chain[-1].iterdir() if p.is_dir()]
        if not inner:
            break
        chain.append(inner[0])
    for folder in reversed(chain):
        for entry in folder.iterdir():
            if not entry.is_dir():
                entry.unlink()
        folder.rmdir()


def test_a_home_1500_folders_deep_is_created_without_recursion(tmp_path: Path) -> None:
    # Path.mkdir(parents=True) recursed once per missing folder: a RecursionError.
    home = tmp_path.joinpath("d", *["d"] * 1499)
    assert len(str(home)) < 4000
    try:
        identity = Identity.load_or_create(home)
        assert Identity.load_or_create(home).node_id == identity.node_id
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        assert stat.S_IMODE((home / KEY_FILE).stat().st_mode) == 0o600
    finally:
        _remove_deep(tmp_path / "d")


def test_private_dir_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        make_private_dir(tmp_path / "a" / "b")
        write_atomic(tmp_path / "a" / "b" / "f", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b" / "f").stat().st_mode) == 0o600
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="not a folder"):
        make_private_dir(tmp_path / "file")
    with pytest.raises(UsageError, match="cannot create"):
        make_private_dir(tmp_path / "file" / "home")


def test_names_kept_in_step_with_their_owners() -> None:
    assert INDEX_FILE == DB_NAME
    assert DOWNLOADS_DIR == ui.DOWNLOADS_DIR


def test_deeply_nested_home_files_give_clear_errors(tmp_path: Path) -> None:
    """Local files, but a RecursionError from the parsers must not escape as a crash."""
    (tmp_path / "config.toml").write_text("a = " + "[" * 5000 + "]" * 5000)
    with pytest.raises(UsageError, match="nested too deeply"):
        read_config_file(tmp_path)
    (tmp_path / CONTACTS_FILE).write_text("[" * 100_000 + "]" * 100_000)
    assert load_contacts(tmp_path) == []
    write_control(tmp_path, "http://127.0.0.1:1", "t")
    (tmp_path / "control.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(NodeNotRunning, match="unreadable"):
        read_control(tmp_path)


def test_saved_services_round_trip_and_damage_is_never_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from p2pnode.home import SERVICES_FILE, load_services, save_services

    assert load_services(tmp_path) == []  # none saved yet
    specs = [{"name": "text.upper", "exec": ["tr", "a-z", "A-Z"]}, {"name": "w", "http": "x"}]
    save_services(tmp_path, specs)
    assert (tmp_path / SERVICES_FILE).stat().st_mode & 0o777 == 0o600
    assert load_services(tmp_path) == specs
    for junk in (b"{not json", b'{"services": 3}', b"[]", b"\xff\xfe"):
        (tmp_path / SERVICES_FILE).write_bytes(junk)
        assert load_services(tmp_path) == []
    assert "unreadable" in caplog.text
