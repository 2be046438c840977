"""The live status page of the control API: ``/ui/``, for a browser on this machine.

Authentication never puts the long-lived API token in a URL or a page:

- ``POST /v1/ui/login-link`` (bearer token, as every ``/v1`` call) returns a
  one-time link ``/ui/login?once=<random>``, valid ``LOGIN_TTL`` seconds, one use;
- visiting it sets an HttpOnly, SameSite=Strict cookie holding a separate session
  secret and redirects to ``/ui/``;
- ``/ui/*`` accept that cookie and nothing else; the rest of the API still wants
  the bearer token. The server's guard lets same-origin requests through on
  ``/ui/*`` only (see ``ControlServer._guard``).

The page (HTML, one vanilla JS file, CSS: package data, no build step) gets a
JSON state once a second over Server-Sent Events. The DHT traffic history and the
recent warnings/errors are kept here, in memory, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from p2pnode.control.api import Jsonable, NodeAPI
from p2pnode.control.common import read_json
from p2pnode.control.metrics import bucket_sizes
from p2pnode.errors import P2PError, UsageError
from p2pnode.exchange.display import peers_shown, phase_line
from p2pnode.exchange.manifest import resource_id_from_str, resource_id_to_str

log = logging.getLogger(__name__)

LOGIN_TTL = 60.0
SESSION_TTL = 12 * 3600.0
MAX_LINKS = 16
MAX_SESSIONS = 16
MAX_SSE_CLIENTS = 8
SSE_INTERVAL = 1.0
# A client that cannot take one update in this long is dropped.
SSE_WRITE_TIMEOUT = 5.0
SAMPLE_INTERVAL = 2.0
HISTORY = 90  # samples: 3 minutes
ERRORS = 50
DOWNLOADS_KEPT = 20
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
DOWNLOADS_DIR = "downloads"


def _static(name: str) -> bytes:
    return resources.files("p2pnode.control").joinpath("static", name).read_bytes()


class _Expiring:
    """Secrets with a deadline, at most ``limit`` (the oldest goes first)."""

    def __init__(self, ttl: float, limit: int) -> None:
        self._ttl = ttl
        self._limit = limit
        self._items: OrderedDict[str, float] = OrderedDict()

    def issue(self) -> str:
        secret = secrets.token_urlsafe(32)
        self._items[secret] = time.monotonic() + self._ttl
        while len(self._items) > self._limit:
            self._items.popitem(last=False)
        return secret

    def check(self, given: str, *, consume: bool = False) -> bool:
        now = time.monotonic()
        found = None
        # Constant-time compare against each live secret (there are few).
        for secret, deadline in list(self._items.items()):
            if deadline < now:
                del self._items[secret]
            elif hmac.compare_digest(secret.encode(), given.encode()):
                found = secret
        if found is not None and consume:
            del self._items[found]
        return found is not None


class _ErrorRing(logging.Handler):
    """The last warnings and errors of p2pnode's loggers."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: deque[dict[str, Any]] = deque(maxlen=ERRORS)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad log call must not break logging
            message = str(record.msg)
        self.records.append(
            {
                "time": record.created,
                "level": record.levelname,
                "logger": record.name,
                "message": message[:500],
            }
        )


def reachability(status: dict[str, Any]) -> str:
    """What ``p2pnode status`` says: no probe exists, requests that others
    started are the evidence we have."""
    requests_in = sum(v for k, v in status["dht"].items() if k.startswith("rpc_received."))
    if requests_in or status["net"].get("connections_inbound", 0):
        return f"yes ({requests_in} DHT request(s) came in from other nodes)"
    return "not known yet (no other node has contacted this one)"


@dataclass(frozen=True)
class Watch:
    """The callbacks that keep a download's entry on the page: ``progress`` gets
    ``Progress``, ``phase`` gets ``PhaseEvent`` (exchange/fetcher.py, phase.py)."""

    progress: Callable[[Jsonable], None]
    phase: Callable[[Jsonable], None]


class StatusPage:
    def __init__(self, node: NodeAPI) -> None:
        self._node = node
        self._links = _Expiring(LOGIN_TTL, MAX_LINKS)
        self._sessions = _Expiring(SESSION_TTL, MAX_SESSIONS)
        self._errors = _ErrorRing()
        self._history: deque[dict[str, float]] = deque(maxlen=HISTORY)
        self._downloads: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._clients = 0
        self._closing = asyncio.Event()
        self._sampler: asyncio.Task[None] | None = None
        self.url = ""
        self.cookie = "p2pnode_ui"

    def start(self, url: str) -> None:
        self.url = url
        # Cookies are per host, not per port: one name per node on this host.
        self.cookie = f"p2pnode_ui_{url.rsplit(':', 1)[-1]}"
        # Process-wide: nodes sharing a process (tests) see each other's records.
        logging.getLogger("p2pnode").addHandler(self._errors)
        self._sampler = asyncio.create_task(self._sample(), name="ui-sampler")

    async def close(self) -> None:
        self._closing.set()
        logging.getLogger("p2pnode").removeHandler(self._errors)
        tasks = [t for t in (self._sampler, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- authentication -------------------------------------------------------------

    def login_link(self) -> str:
        return f"{self.url}/ui/login?once={self._links.issue()}"

    def authenticated(self, request: web.Request) -> bool:
        given = request.cookies.get(self.cookie, "")
        return bool(given) and self._sessions.check(given)

    # -- data -----------------------------------------------------------------------

    async def _sample(self) -> None:
        while True:
            try:
                dht = self._node.status()["dht"]
                self._history.append(
                    {
                        "t": time.time(),
                        "in": sum(v for k, v in dht.items() if k.startswith("rpc_received.")),
                        "out": sum(v for k, v in dht.items() if k.startswith("rpc_sent.")),
                        "errors": dht.get("failures", 0)
                        + sum(v for k, v in dht.items() if k.startswith("rpc_timeout.")),
                    }
                )
            except P2PError:
                pass  # the node is starting or stopping
            await asyncio.sleep(SAMPLE_INTERVAL)

    def watch(self, rid: bytes, dest: Path) -> Watch:
        """Callbacks that keep the download's latest state for the page: its byte
        progress (with ``peers_shown``, the peers figure the CLI shows too) and,
        before the bytes or when it looks providers up again, what it is doing
        (``activity``: the CLI's phase line, until the next progress)."""
        key = resource_id_to_str(rid)
        entry: dict[str, Any] = {"id": key, "dest": str(dest), "state": "starting", "error": None}
        self._downloads.pop(key, None)
        self._downloads[key] = entry
        while len(self._downloads) > DOWNLOADS_KEPT:
            self._downloads.popitem(last=False)

        def on_progress(progress: Jsonable) -> None:
            entry.update(progress.to_json())
            entry["peers_shown"] = peers_shown(entry)
            entry.pop("activity", None)

        def on_phase(phase: Jsonable) -> None:
            entry["activity"] = phase_line(phase.to_json())

        return Watch(on_progress, on_phase)

    def downloading(self, rid: bytes) -> bool:
        entry = self._downloads.get(resource_id_to_str(rid))
        return entry is not None and entry["state"] not in {"done", "failed"}

    def finished(self, rid: bytes, error: str | None) -> None:
        entry = self._downloads.get(resource_id_to_str(rid))
        if entry is not None:
            entry["state"] = "failed" if error else "done"
            entry["error"] = error
            entry.pop("activity", None)
            if not error and entry.get("total_bytes") is not None:
                entry["done_bytes"] = entry["total_bytes"]

    def state(self) -> dict[str, Any]:
        node = self._node
        status = node.status()
        snap = node.metrics_snapshot()
        history = list(self._history)
        traffic = [
            {
                "t": b["t"],
                "in": b["in"] - a["in"],
                "out": b["out"] - a["out"],
                "errors": b["errors"] - a["errors"],
            }
            for a, b in itertools.pairwise(history)
        ]
        return {
            "identity": node.describe(),
            "status": {
                "state": status["state"],
                "uptime": status["uptime"],
                "joined": status["joined"],
                "reachable": reachability(status),
                "routing_table_size": status["routing_table_size"],
                "connected": status["net"].get("peers", 0),
                "rss_bytes": status["rss_bytes"],
            },
            "peers": node.peers(),  # rtt_ms: None until a contact answered us
            "buckets": bucket_sizes(snap["node_id"], snap["dht_contact_ids"]),
            "downloads": list(reversed(self._downloads.values())),
            "resources": [r.to_json() for r in node.exchange.list()],
            "traffic": traffic,
            "sample_interval": SAMPLE_INTERVAL,
            "errors": list(reversed(self._errors.records)),
            "downloads_dir": str(self.downloads_dir()),
            "time": time.time(),
        }

    def downloads_dir(self) -> Path:
        return self._node.config.home / DOWNLOADS_DIR

    # -- routes ---------------------------------------------------------------------

    def api_routes(self) -> list[web.RouteDef]:
        """Routes under the bearer token."""

        async def post_login_link(_: web.Request) -> web.Response:
            return web.json_response({"url": self.login_link(), "expires_in": LOGIN_TTL})

        return [web.post("/v1/ui/login-link", post_login_link)]

    def page_routes(self) -> list[web.RouteDef]:
        """Routes under the session cookie (``/ui/login`` under a one-time secret)."""

        async def get_login(request: web.Request) -> web.Response:
            once = request.query.get("once", "")
            if not once or not self._links.check(once, consume=True):
                return page_refusal("This login link is unknown, used or expired.", 403)
            response = web.Response(status=303, headers={"Location": "/ui/"})
            response.set_cookie(
                self.cookie,
                self._sessions.issue(),
                path="/ui",
                httponly=True,
                samesite="Strict",
                max_age=int(SESSION_TTL),
            )
            return response

        async def get_index(_: web.Request) -> web.Response:
            return web.Response(body=_static("index.html"), content_type="text/html")

        async def get_asset(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            if name not in STATIC:
                raise web.HTTPNotFound()
            return web.Response(body=_static(name), content_type=STATIC[name])

        async def get_state(_: web.Request) -> web.Response:
            return web.json_response(self.state())

        async def post_get(request: web.Request) -> web.Response:
            body = await read_json(request)
            rid_text = body.get("id")
            if not isinstance(rid_text, str):
                raise UsageError("field 'id' must be a resource id")
            rid = resource_id_from_str(rid_text)
            dest = self._destination(body.get("name"))
            if self.downloading(rid):
                raise UsageError(f"{resource_id_to_str(rid)} is already being downloaded")
            watch = self.watch(rid, dest)
            task = asyncio.create_task(self._download(rid, dest, watch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return web.json_response({"id": resource_id_to_str(rid), "dest": str(dest)}, status=202)

        return [
            web.get("/ui/login", get_login),
            web.get("/ui/", get_index),
            web.get("/ui/static/{name}", get_asset),
            web.get("/ui/api/state", get_state),
            web.get("/ui/events", self._events),
            web.post("/ui/api/get", post_get),
        ]

    def _destination(self, name: object) -> Path:
        # The page may only write a new entry directly in the node's downloads folder.
        if not isinstance(name, str) or not name or name in {".", ".."}:
            raise UsageError("field 'name' must be a file name")
        if "/" in name or "\\" in name or "\0" in name or len(name) > 255:
            raise UsageError("field 'name' must be a plain file name, not a path")
        folder = self.downloads_dir()
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder / name

    async def _download(self, rid: bytes, dest: Path, watch: Watch) -> None:
        try:
            await self._node.exchange.get(rid, dest, progress=watch.progress, phase=watch.phase)
        except P2PError as exc:
            self.finished(rid, str(exc))
        else:
            self.finished(rid, None)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if self._clients >= MAX_SSE_CLIENTS:
            raise web.HTTPServiceUnavailable(text="too many status page clients")
        self._clients += 1
        try:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-store",
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(request)
            while not self._closing.is_set():
                data = json.dumps(self.state(), separators=(",", ":"))
                try:
                    await asyncio.wait_for(
                        response.write(f"data: {data}\n\n".encode()), SSE_WRITE_TIMEOUT
                    )
                except (ConnectionError, TimeoutError):
                    break  # the client went away or cannot keep up
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), SSE_INTERVAL)
            return response
        finally:
            self._clients -= 1


def page_refusal(message: str, status: int) -> web.Response:
    text = (
        "<!doctype html><meta charset=utf-8><title>p2pnode</title>"
        f"<p>{message} Run <code>p2pnode ui</code> for a new link.</p>"
    )
    return web.Response(text=text, status=status, content_type="text/html")
