"""The status page's authentication and guard, without sockets: one-time links,
session cookies, Origin rules on /ui only, and where the page may write."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from p2pnode.control import ui
from p2pnode.control.exchange_routes import exchange_routes
from p2pnode.control.server import ControlServer
from p2pnode.errors import UsageError

HOST = "127.0.0.1:4000"
TOKEN = "the-long-lived-api-token"


class FakeNode:
    def __init__(self, home: Path) -> None:
        self.config = SimpleNamespace(home=home)

    def metrics_snapshot(self) -> Any:
        return {}


def _server(tmp_path: Path) -> ControlServer:
    server = ControlServer(FakeNode(tmp_path), TOKEN)  # type: ignore[arg-type]
    server._allowed_hosts = {HOST}
    server.page.url = f"http://{HOST}"
    server.page.cookie = "p2pnode_ui_4000"
    return server


async def _ok(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _call(server: ControlServer, method: str, path: str, **headers: str) -> int:
    request = make_mocked_request(method, path, headers={"Host": HOST, **headers})
    response = await server._guard(request, _ok)
    return response.status


def test_a_login_link_works_once_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    links = ui._Expiring(ttl=60, limit=4)
    once = links.issue()
    assert not links.check("wrong")
    assert links.check(once, consume=True)
    assert not links.check(once, consume=True)
    late = links.issue()
    now = ui.time.monotonic()
    monkeypatch.setattr(ui.time, "monotonic", lambda: now + 61)
    assert not links.check(late)


def test_secrets_are_bounded() -> None:
    links = ui._Expiring(ttl=60, limit=2)
    first = links.issue()
    links.issue()
    links.issue()
    assert not links.check(first)


async def test_ui_routes_want_the_cookie_not_the_token(tmp_path: Path) -> None:
    server = _server(tmp_path)
    session = server.page._sessions.issue()
    cookie = f"p2pnode_ui_4000={session}"
    assert await _call(server, "GET", "/ui/api/state") == 401
    assert await _call(server, "GET", "/ui/api/state", Authorization=f"Bearer {TOKEN}") == 401
    assert await _call(server, "GET", "/ui/api/state", Cookie=cookie) == 200
    assert await _call(server, "GET", "/ui/api/state", Cookie="p2pnode_ui_4000=guess") == 401
    # The login link itself needs no cookie (its one-time secret is checked by the route).
    assert await _call(server, "GET", "/ui/login") == 200
    # The cookie opens nothing outside /ui.
    assert await _call(server, "GET", "/v1/status", Cookie=cookie) == 401


async def test_same_origin_passes_on_ui_only_and_other_origins_are_refused(
    tmp_path: Path,
) -> None:
    server = _server(tmp_path)
    cookie = f"p2pnode_ui_4000={server.page._sessions.issue()}"
    own = f"http://{HOST}"
    assert await _call(server, "POST", "/ui/api/get", Cookie=cookie, Origin=own) == 200
    assert await _call(server, "POST", "/ui/api/get", Cookie=cookie, Origin="http://evil") == 403
    assert await _call(server, "POST", "/ui/api/get", Cookie=cookie, Origin="null") == 403
    cross = {"Cookie": cookie, "Sec-Fetch-Site": "cross-site"}
    assert await _call(server, "POST", "/ui/api/get", **cross) == 403
    assert await _call(server, "GET", "/ui/", Cookie=cookie, Host="evil:4000") == 403
    bearer = f"Bearer {TOKEN}"
    assert await _call(server, "GET", "/v1/status", Authorization=bearer) == 200
    assert await _call(server, "GET", "/v1/status", Authorization=bearer, Origin=own) == 403


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "/etc/passwd", "a\\b", "x\0", 7])
def test_the_page_writes_only_plain_names_in_the_downloads_folder(
    tmp_path: Path, name: object
) -> None:
    page = ui.StatusPage(FakeNode(tmp_path))  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        page._destination(name)


def test_a_plain_name_lands_in_the_downloads_folder(tmp_path: Path) -> None:
    page = ui.StatusPage(FakeNode(tmp_path))  # type: ignore[arg-type]
    assert page._destination("copy.bin") == tmp_path / "downloads" / "copy.bin"


def test_the_static_files_ship_with_the_package() -> None:
    assert b"/ui/static/app.js" in ui._static("index.html")
    for name in ui.STATIC:
        assert ui._static(name)


class FakeProgress:
    def __init__(self, done: int) -> None:
        self.done = done

    def to_json(self) -> dict[str, Any]:
        return {"done_bytes": self.done, "total_bytes": 100, "state": "downloading"}


def test_downloads_keep_their_latest_progress_then_their_outcome(tmp_path: Path) -> None:
    page = ui.StatusPage(FakeNode(tmp_path))  # type: ignore[arg-type]
    rid = bytes(32)
    watch = page.watch(rid, tmp_path / "x")
    watch.progress(FakeProgress(40))
    assert page.downloading(rid)
    (entry,) = page._downloads.values()
    assert entry["done_bytes"] == 40
    page.finished(rid, None)
    assert not page.downloading(rid)
    assert entry["state"] == "done" and entry["done_bytes"] == 100
    page.watch(bytes(31) + b"\1", tmp_path / "y")
    page.finished(bytes(31) + b"\1", "no provider")
    assert [d["state"] for d in page._downloads.values()] == ["done", "failed"]


class FakePhase:
    def __init__(self, **fields: Any) -> None:
        self.fields = fields

    def to_json(self) -> dict[str, Any]:
        return {"id": "x", **self.fields}


def test_a_download_shows_its_phase_until_the_bytes_come(tmp_path: Path) -> None:
    page = ui.StatusPage(FakeNode(tmp_path))  # type: ignore[arg-type]
    rid = bytes(32)
    watch = page.watch(rid, tmp_path / "x")
    (entry,) = page._downloads.values()
    assert entry["state"] == "starting" and "activity" not in entry
    watch.phase(FakePhase(phase="lookup", lookup=1, lookups=3))
    assert entry["activity"] == "looking up providers..."
    watch.phase(FakePhase(phase="connecting", lookup=1, lookups=3, providers=2))
    assert entry["activity"] == "found 2 providers, connecting..."
    watch.phase(FakePhase(phase="manifest", lookup=1, lookups=3, peer="abcdefgh@h:1"))
    assert entry["activity"] == "fetching the manifest from abcdefgh@h:1..."
    assert page.downloading(rid) and entry["state"] == "starting"
    # The bytes: the progress says it from now on.
    watch.progress(FakeProgress(40))
    assert "activity" not in entry and entry["state"] == "downloading"
    # Every provider gone: looking again, shown until the next progress.
    watch.phase(FakePhase(phase="lookup", lookup=2, lookups=3, reason="unreachable", failed=1))
    assert entry["activity"] == (
        "no provider reachable yet (1 attempt failed), looking again (2/3)..."
    )
    watch.progress(FakeProgress(60))
    assert "activity" not in entry
    page.finished(rid, None)
    assert entry["state"] == "done" and "activity" not in entry


def test_the_page_shows_the_peers_a_download_used(tmp_path: Path) -> None:
    page = ui.StatusPage(FakeNode(tmp_path))  # type: ignore[arg-type]
    watch = page.watch(bytes(32), tmp_path / "x")
    (entry,) = page._downloads.values()

    class P:
        def __init__(self, state: str, peers: int, used: int) -> None:
            self.j = {"state": state, "peers": peers, "peers_used": used, "done_bytes": 0}

        def to_json(self) -> dict[str, Any]:
            return self.j

    watch.progress(P("downloading", 2, 1))
    assert entry["peers_shown"] == 2
    watch.progress(P("finishing", 0, 2))
    assert entry["peers_shown"] == 2
    watch.progress(P("done", 0, 2))
    assert entry["peers_shown"] == 2


class PhasedExchange:
    """A get that says its phases, then its bytes; records what the page showed."""

    def __init__(self, page: ui.StatusPage) -> None:
        self.page = page
        self.shown: list[str] = []

    def _activity(self) -> str:
        (entry,) = self.page._downloads.values()
        return str(entry.get("activity") or entry["state"])

    async def get(self, rid: bytes, dest: Path, **callbacks: Any) -> Any:
        callbacks["phase"](FakePhase(phase="lookup", lookup=1, lookups=3))
        self.shown.append(self._activity())
        callbacks["phase"](FakePhase(phase="manifest", lookup=1, lookups=3, peer="p@h:1"))
        self.shown.append(self._activity())
        callbacks["progress"](FakeProgress(100))
        self.shown.append(self._activity())
        return SimpleNamespace(to_json=lambda: {"id": "x"})


async def test_a_get_from_the_page_shows_its_phases(tmp_path: Path) -> None:
    page = ui.StatusPage(FakeNode(tmp_path))  # type: ignore[arg-type]
    exchange = PhasedExchange(page)
    page._node = SimpleNamespace(exchange=exchange)  # type: ignore[assignment]
    rid = bytes(32)
    await page._download(rid, tmp_path / "x", page.watch(rid, tmp_path / "x"))
    assert exchange.shown == [
        "looking up providers...",
        "fetching the manifest from p@h:1...",
        "downloading",
    ]


async def test_a_get_through_the_api_shows_its_phases_on_the_page(tmp_path: Path) -> None:
    page = ui.StatusPage(FakeNode(tmp_path))  # type: ignore[arg-type]
    exchange = PhasedExchange(page)
    node = SimpleNamespace(exchange=exchange)
    routes = exchange_routes(node, page)  # type: ignore[arg-type]
    handler = next(r.handler for r in routes if getattr(r, "path", "") == "/v1/get")
    request = make_mocked_request("POST", "/v1/get", headers={"Host": HOST})
    body = {"id": ui.resource_id_to_str(bytes(32)), "dest": str(tmp_path / "x")}
    request._read_bytes = json.dumps(body).encode()
    await handler(request)  # type: ignore[operator]
    assert exchange.shown == [
        "looking up providers...",
        "fetching the manifest from p@h:1...",
        "downloading",
    ]
    (entry,) = page._downloads.values()
    assert entry["state"] == "done" and "activity" not in entry
