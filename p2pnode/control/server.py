"""The local control API: HTTP/JSON on 127.0.0.1, for the CLI, scripts and tools.

Rules:
- every request carries ``Authorization: Bearer <token>`` (token in the home, 0600),
  compared in constant time;
- the Host header must name the address we listen on (defeats DNS rebinding) and a
  request with an Origin header is refused (no browser page may drive the node);
- errors are JSON ``{"error": message, "kind": ErrorClass}`` with a fitting status;
- ``/ui/*`` is the status page (p2pnode.control.ui): a session cookie from a one-time
  login link instead of the token, and same-origin browser requests are let in
  there only;
- ``GET /metrics`` answers in Prometheus' text format (OpenMetrics if the Accept
  header asks for it), under the same token rule: Prometheus scrapes with
  ``authorization: {type: Bearer, credentials_file: ...}``.

It sees the node only through :class:`~p2pnode.control.api.NodeAPI`.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import Counter
from prometheus_client.exposition import choose_encoder

from p2pnode.control.api import ErrorKind, NodeAPI
from p2pnode.control.common import (
    MAX_BODY,
    REFUSED_INPUTS,
    error_body,
    json_response,
    read_json,
    status_for,
)
from p2pnode.control.exchange_routes import exchange_routes
from p2pnode.control.metrics import NodeMetrics
from p2pnode.control.services_routes import services_routes
from p2pnode.control.ui import StatusPage, page_refusal
from p2pnode.errors import NotFoundError, P2PError, UsageError
from p2pnode.identity import peer_id_from_str, peer_id_to_str

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_DHT_KEY = 256


def _refusal(message: str, kind: ErrorKind, status: int) -> web.Response:
    return json_response({"error": message, "kind": kind}, status)


class ControlServer:
    def __init__(self, node: NodeAPI, token: str) -> None:
        self._node = node
        self._token = token.encode()
        self.metrics = NodeMetrics(node.metrics_snapshot)
        self.page = StatusPage(node)
        self.refused_inputs = Counter(
            "p2pnode_control_refused_inputs",
            "Control API requests refused for their input (body too large, too deep, not"
            " JSON; recursion too deep in a handler), by reason",
            ["reason"],
            registry=self.metrics.registry,
        )
        self._runner: web.AppRunner | None = None
        self._allowed_hosts: set[str] = set()
        self.url = ""
        self.socket_path: Path | None = None

    async def start(self, host: str, port: int, unix_path: Path | None = None) -> str:
        """Listen on TCP ``host:port`` and, if given, on the Unix socket
        ``unix_path`` too (same API, same token: it reaches a node inside a
        network namespace, whose loopback is its own). Returns the TCP URL."""
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        app[REFUSED_INPUTS] = self.refused_inputs
        app.add_routes(
            self._node_routes()
            + exchange_routes(self._node, self.page)
            + services_routes(self._node)
            + self.page.api_routes()
            + self.page.page_routes()
        )
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port).start()
        except OSError as exc:
            raise UsageError(f"cannot listen on control API {host}:{port}: {exc}") from None
        if not self._runner.addresses:
            # Seen when out of file descriptors: a typed error, not an IndexError.
            raise UsageError(f"control API on {host}:{port} bound no socket")
        bound = self._runner.addresses[0]
        if unix_path is not None:
            await self._listen_unix(unix_path)
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}"
        self._allowed_hosts = {f"{shown}:{bound[1]}", f"localhost:{bound[1]}"}
        self.page.start(self.url)
        return self.url

    async def _listen_unix(self, path: Path) -> None:
        assert self._runner is not None
        # Tiny syscalls at start. The home (0700) guards the socket before chmod.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a crashed run's socket: the home lock says it is ours
        try:
            await web.UnixSite(self._runner, str(path)).start()
            os.chmod(path, 0o600)
        except (OSError, ValueError) as exc:  # e.g. a path over the 107-byte limit
            log.info("control API: no Unix socket at %s: %s", path, exc)
            return
        self.socket_path = path

    async def close(self) -> None:
        # First: open event streams end now, not at the runner's shutdown timeout.
        await self.page.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/ui" or request.path.startswith("/ui/"):
            return await self._page_guard(request, handler)
        if request.headers.get("Origin") is not None:
            return _refusal("cross-origin requests are refused", ErrorKind.FORBIDDEN, 403)
        if request.host not in self._allowed_hosts:
            return _refusal("bad Host header", ErrorKind.FORBIDDEN, 403)
        auth = request.headers.get("Authorization", "")
        given = auth.removeprefix("Bearer ").encode()
        if not auth.startswith("Bearer ") or not hmac.compare_digest(given, self._token):
            return _refusal("missing or wrong API token", ErrorKind.UNAUTHORIZED, 401)
        return await self._call(request, handler)

    async def _page_guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The status page: same Host rule; an Origin header, if any, must be our own
        (the page's fetches), so other sites still cannot drive the node; the
        session cookie instead of the token."""
        if request.host not in self._allowed_hosts:
            return _refusal("bad Host header", ErrorKind.FORBIDDEN, 403)
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"http://{request.host}":
            return _refusal("cross-origin requests are refused", ErrorKind.FORBIDDEN, 403)
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in {"same-origin", "none"}:
            return _refusal("cross-site requests are refused", ErrorKind.FORBIDDEN, 403)
        if request.path != "/ui/login" and not self.page.authenticated(request):
            if request.path in {"/ui", "/ui/"}:
                return page_refusal("You are not logged in.", 401)
            return _refusal(
                "not logged in: run `p2pnode ui` for a login link", ErrorKind.UNAUTHORIZED, 401
            )
        return await self._call(request, handler)

    async def _call(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except P2PError as exc:
            return json_response(error_body(exc), status_for(exc))
        except RecursionError:
            # Input deeper than some code under the handler can recurse (a shared
            # folder tree, say): refused and counted, not a 500; logged, as that code
            # should have refused it itself.
            log.warning("control API %s %s: RecursionError", request.method, request.path)
            self.refused_inputs.labels("recursion").inc()
            return _refusal("input nested too deeply", ErrorKind.USAGE, 400)

    @contextmanager
    def _timed_lookup(self, operation: str) -> Iterator[None]:
        """Observe the duration of a DHT lookup made for an API call (any outcome)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.api_lookup_seconds.labels(operation).observe(elapsed)

    def _node_routes(self) -> list[web.RouteDef]:
        node = self._node
        timed = self._timed_lookup
        registry = self.metrics.registry

        async def get_metrics(request: web.Request) -> web.Response:
            encode, content_type = choose_encoder(request.headers.get("Accept", ""))
            # Content-Type carries a version parameter: set the header itself.
            return web.Response(body=encode(registry), headers={"Content-Type": content_type})

        async def get_id(_: web.Request) -> web.Response:
            return json_response(node.describe())

        async def get_peers(_: web.Request) -> web.Response:
            return json_response({"peers": node.peers()})

        async def get_connections(_: web.Request) -> web.Response:
            return json_response({"connections": node.connections()})

        async def get_status(_: web.Request) -> web.Response:
            return json_response(node.status())

        async def post_stop(_: web.Request) -> web.Response:
            node.request_stop()
            return json_response({"stopping": True})

        async def post_dht_put(request: web.Request) -> web.Response:
            body = await read_json(request)
            kind = body.get("kind", "mutable")
            if kind not in ("mutable", "immutable", "plain"):
                raise UsageError("kind must be mutable, immutable or plain")
            value = _text_field(body, "value")
            if len(value.encode()) > node.config.dht.max_value_bytes:
                raise UsageError(f"value longer than {node.config.dht.max_value_bytes} bytes")
            discovery = node.discovery
            key = None if kind == "immutable" else _text_field(body, "key")
            with timed("put"):
                if kind == "immutable":
                    outcome = await discovery.put_immutable(value)
                elif kind == "plain":
                    assert key is not None
                    outcome = await discovery.put_outcome(key, value)
                else:
                    assert key is not None
                    outcome = await discovery.put_mutable(key, value)
            # stored (anywhere), here (True / False: refused / None: not tried), remote,
            # asked, unproven; address (a record's, what `dht get` takes)
            return json_response({"key": key, "kind": kind, **outcome.to_json()})

        async def get_dht_get(request: web.Request) -> web.Response:
            key = request.query.get("key", "")
            plain = request.query.get("plain", "") in ("1", "true")
            if not key or len(key) > MAX_DHT_KEY:
                raise UsageError(f"key must be 1..{MAX_DHT_KEY} characters")
            discovery = node.discovery
            with timed("get"):
                if plain:
                    value = await discovery.get(key)
                else:
                    try:
                        value = await discovery.get_record(key)
                    except UsageError as exc:  # not an address: say how to read plain values
                        raise UsageError(
                            f"{exc}; an unauthenticated plain kademlia value is read with "
                            "`dht get --plain`"
                        ) from None
            if value is None:
                what = "plain value" if plain else "valid signed record"
                raise NotFoundError(f"no {what} for {key!r} in the DHT")
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            out: dict[str, object] = {"key": key, "value": value}
            if plain:
                out["unauthenticated"] = True
            else:
                out["address"] = key
            return json_response(out)

        async def get_find_peer(request: web.Request) -> web.Response:
            node_id = peer_id_from_str(request.query.get("id", ""))
            with timed("find_peer"):
                contact = await node.discovery.find_peer(node_id)
                if contact is None:
                    # a private node is in no routing table: its peer record
                    # (p2pnode/nat/relay.py) names its relays
                    records = await node.discovery.find_providers(node_id)
                    peer = next((r for r in records if r.node_id == node_id), None)
                    if peer is not None:
                        return json_response(
                            {
                                "peer_id": peer_id_to_str(peer.node_id),
                                "host": peer.host,
                                "port": peer.port,
                                "relays": [
                                    {"host": h, "port": p, "peer_id": peer_id_to_str(relay)}
                                    for h, p, relay in getattr(peer, "relays", ())
                                ],
                            }
                        )
            if contact is None:
                raise NotFoundError(f"peer {peer_id_to_str(node_id)} not found in the DHT")
            return json_response(
                {
                    "peer_id": peer_id_to_str(contact.node_id),
                    "host": contact.host,
                    "port": contact.port,
                    "relays": [],
                }
            )

        return [
            web.get("/metrics", get_metrics),
            web.get("/v1/id", get_id),
            web.get("/v1/dht/find_peer", get_find_peer),
            web.get("/v1/peers", get_peers),
            web.get("/v1/connections", get_connections),
            web.get("/v1/status", get_status),
            web.post("/v1/stop", post_stop),
            web.post("/v1/dht/put", post_dht_put),
            web.get("/v1/dht/get", get_dht_get),
        ]


def _text_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise UsageError(f"field {name!r} must be a non-empty string")
    if name == "key" and len(value) > MAX_DHT_KEY:
        raise UsageError(f"key longer than {MAX_DHT_KEY} characters")
    return value
