"""What the CLI says, with a fake control client (no node, no sockets)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import p2pnode.control.client as client_module
from p2pnode import cli

RID = "r" * 10


class FakeClient:
    events: list[dict[str, Any]] = []
    interrupt = False

    def __init__(self, home: Path, timeout: float = 120.0) -> None:
        self.home = home

    def call(self, method: str, path: str, body: Any = None) -> Any:
        raise AssertionError(f"unexpected call {method} {path}")

    def stream(self, method: str, path: str, body: Any = None) -> Iterator[dict[str, Any]]:
        yield from self.events
        if self.interrupt:
            raise KeyboardInterrupt


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    monkeypatch.setattr(client_module, "ControlClient", FakeClient)
    FakeClient.events = [
        {"event": "progress", "total_bytes": 100, "done_bytes": 40, "state": "downloading"}
    ]
    FakeClient.interrupt = False
    return FakeClient


def test_get_cut_short_by_a_killed_node_says_it_resumes(
    fake: type[FakeClient], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli.main(["--home", str(tmp_path), "get", RID, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == cli.ExitCode.ERROR
    assert "verified pieces are kept" in err and f"p2pnode get {RID} -o" in err, err
    assert "again to resume" in err


def test_get_interrupted_by_ctrl_c_says_it_resumes(
    fake: type[FakeClient], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.interrupt = True
    rc = cli.main(["--home", str(tmp_path), "get", RID])
    err = capsys.readouterr().err
    assert rc == cli.ExitCode.INTERRUPTED
    assert "interrupted" in err and "verified pieces are kept" in err, err
    assert f"p2pnode get {RID}` again to resume" in err

    rc = cli.main(["--home", str(tmp_path), "--json", "get", RID])
    # The stream's events as JSON lines on stderr, the error as the last one.
    *events, last = capsys.readouterr().err.splitlines()
    assert [json.loads(e) for e in events] == fake.events
    body = json.loads(last)
    assert rc == cli.ExitCode.INTERRUPTED and body["code"] == "interrupted"
    assert "resume" in body["error"]


def _resource(**over: Any) -> dict[str, Any]:
    base = {"id": "abc", "name": "f.bin", "size": 10, "state": "shared", "served": True}
    return {**base, **over}


def test_ls_says_unshared_and_stale_not_shared(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resources = [
        _resource(id="served1"),
        _resource(id="gone1", served=False),
        _resource(id="changed1", served=False, stale="f.bin: size changed"),
        _resource(id="fetched1", state="complete", served=True),
    ]

    class LsClient(FakeClient):
        def call(self, method: str, path: str, body: Any = None) -> Any:
            assert path == "/v1/ls"
            return {"resources": resources}

    monkeypatch.setattr(client_module, "ControlClient", LsClient)
    assert cli.main(["--home", str(tmp_path), "ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    state = {line.split()[0]: line.split()[4] for line in lines[1:5]}  # SIZE is "10 B"
    assert state == {
        "served1": "shared",
        "gone1": "unshared",
        "changed1": "stale",
        "fetched1": "complete",
    }
    assert "changed1: not served: f.bin: size changed" in lines[5]


def _status(**dht: int) -> dict[str, Any]:
    return {
        "peer_id": "me",
        "uptime": 3725.2,
        "joined": True,
        "routing_table_size": 7,
        "dht": {"rpc_sent.ping": 5, "rpc_timeout.ping": 1, "dropped.bad_type": 2, **dht},
        "net": {"peers": 2, "connections_inbound": 0},
        "exchange": {"downloads_active": 1, "pieces_served": 3, "bytes_served": 3 * 65536},
        "resources": 4,
        "rss_bytes": 50 * 2**20,
    }


def test_status_is_a_short_summary_unless_verbose(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = _status()

    class StatusClient(FakeClient):
        def call(self, method: str, path: str, body: Any = None) -> Any:
            return answer

    monkeypatch.setattr(client_module, "ControlClient", StatusClient)
    assert cli.main(["--home", str(tmp_path), "status"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) <= 12, out
    assert "uptime:     1h 2m" in out and "7 in the routing table, 2 connected" in out
    assert "reachable:  unknown" in out
    assert "0 request(s) in, 5 out, 1 timed out, 2 datagram(s) dropped" in out
    assert "1 download(s) active; served 3 piece(s), 192.0 KiB" in out
    assert "rpc_sent.ping" not in out

    answer = _status(**{"rpc_received.find_node": 9})
    answer.update(
        reachability="public",
        tcp="public",
        udp="public",
        dht_mode="server",
        reachable_addresses=["203.0.113.10:4001"],
    )
    assert cli.main(["--home", str(tmp_path), "status", "-v"]) == 0
    out = capsys.readouterr().out
    assert (
        "reachable:  public (tcp public, udp public; DHT server); reach me at 203.0.113.10:4001"
        in out
    )
    assert "  rpc_sent.ping: 5" in out
