"""Config parsing and the home folder's files: pure, no sockets."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from p2pnode.config import default_home, parse_host_port
from p2pnode.errors import NodeNotRunning, UsageError
from p2pnode.home import (
    CONTACTS_FILE,
    HomeLock,
    SavedContact,
    clear_control,
    load_contacts,
    read_config_file,
    read_control,
    save_contacts,
    write_control,
)


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
