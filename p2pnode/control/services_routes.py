"""Control API endpoints of services: serve (an --exec program or an --http service),
unserve, list, find providers, call and call a stream.

What ``serve`` registers is saved in the node's home (``services.json``, 0600,
written atomically) and served again when the node starts; ``unserve`` removes
it. Serving a name already served is refused (naming it) unless the body says
``"replace": true``.

Replies are JSON-safe: bytes travel as base64 (``reply_b64`` at the top, a
``{"base64": ...}`` object inside a structure). A failed call is the usual error
body plus ``code``, the service error's wire code (``no_providers``,
``deadline_exceeded``, ...), with a status that fits it.

``POST /v1/services/call_stream`` answers newline-delimited JSON: one
``{"event": "item", ...}`` line per item (written as the node pulls them, so a
slow reader slows the stream, never grows memory), then ``{"event": "done"}`` or
``{"event": "error", ...}``.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from p2pnode.control.api import NodeAPI, StreamEvent
from p2pnode.control.common import (
    MAX_JSON_DEPTH,
    count_refused,
    error_body,
    json_depth_exceeds,
    json_response,
    read_json,
)
from p2pnode.errors import (
    BadServiceRequest,
    DeadlineExceeded,
    HandlerError,
    NoProviders,
    P2PError,
    ProvidersFailed,
    ServiceError,
    ServiceNotFound,
    ServiceOverloaded,
    TooLarge,
    UsageError,
)
from p2pnode.home import load_services, save_services
from p2pnode.identity import peer_id_to_str
from p2pnode.services.adapters import exec_handler, http_handler
from p2pnode.services.names import validate_service_name

log = logging.getLogger(__name__)

DEFAULT_ADAPTER_TIMEOUT = 30.0
DEFAULT_CALL_TIMEOUT = 10.0
DEFAULT_STREAM_TIMEOUT = 60.0
MAX_TIMEOUT = 3600.0
MAX_ARGV = 256
MAX_ADAPTER_OUTPUT = 16 * 1024 * 1024
# A call's body carries its request (up to the services' 1 MiB, base64 adds a third):
# more than the control API's usual 64 KiB.
MAX_CALL_BODY = 2 * 1024 * 1024

# The status each service error answers with: the caller's fault 400, nothing there
# 404, a provider refusing for load 503, time 504, the provider's own failure 502.
_STATUS: tuple[tuple[type[ServiceError], int], ...] = (
    (BadServiceRequest, 400),
    (ServiceNotFound, 404),
    (NoProviders, 404),
    (ServiceOverloaded, 503),
    (DeadlineExceeded, 504),
    (TooLarge, 413),
    (HandlerError, 502),
    (ProvidersFailed, 502),
)


def service_status(exc: ServiceError) -> int:
    return next((status for cls, status in _STATUS if isinstance(exc, cls)), 502)


def service_error_body(exc: ServiceError) -> dict[str, str]:
    return {**error_body(exc), "code": exc.code}


Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _typed(route: Route) -> Route:
    """Service errors answer with their own status and code (other P2PErrors go to
    the server's guard as usual)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await route(request)
        except ServiceError as exc:
            return json_response(service_error_body(exc), service_status(exc))

    return wrapped


# ---------------------------------------------------------------------------- fields


def _name(value: object) -> str:
    return validate_service_name(value)


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise UsageError(f"field {key!r} must be true or false")
    return value


def _timeout(body: dict[str, Any], default: float) -> float:
    value = body.get("timeout", default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError("field 'timeout' must be a number of seconds")
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise UsageError(f"field 'timeout' must be more than 0 and at most {MAX_TIMEOUT:g} s")
    return float(value)


def _argv(value: object) -> list[str]:
    if (
        not isinstance(value, list)
        or not value
        or len(value) > MAX_ARGV
        or not all(isinstance(a, str) and "\0" not in a for a in value)
    ):
        raise UsageError(f"field 'exec' must be a list of 1..{MAX_ARGV} strings (program, args)")
    return value


async def read_call_json(request: web.Request) -> dict[str, Any]:
    """A call's JSON body, read up to MAX_CALL_BODY (past the app-wide limit, which
    only ``request.read()`` applies) and checked as ``read_json`` checks others."""
    raw = bytearray()
    while chunk := await request.content.read(64 * 1024):  # read() returns what is there
        raw += chunk
        if len(raw) > MAX_CALL_BODY:
            count_refused(request, "too_large")
            raise UsageError(f"call body larger than {MAX_CALL_BODY} bytes")
    if json_depth_exceeds(bytes(raw), MAX_JSON_DEPTH):
        count_refused(request, "too_deep")
        raise UsageError(f"request body nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(bytes(raw).decode("utf-8"))
    except (ValueError, RecursionError):
        count_refused(request, "not_json")
        raise UsageError("request body is not JSON (UTF-8)") from None
    if not isinstance(body, dict):
        raise UsageError("request body must be a JSON object")
    return body


def _request_value(body: dict[str, Any]) -> object:
    """The call's request: ``input`` (text), ``json_input`` (any JSON value) or
    ``input_b64`` (bytes); none of them is an empty text."""
    given = [k for k in ("input", "json_input", "input_b64") if k in body]
    if len(given) > 1:
        raise UsageError("give one of 'input', 'json_input' and 'input_b64'")
    if not given or given[0] == "input":
        text = body.get("input", "")
        if not isinstance(text, str):
            raise UsageError("field 'input' must be text (use 'json_input' for JSON values)")
        return text
    if given[0] == "json_input":
        return body["json_input"]
    raw = body["input_b64"]
    try:
        if not isinstance(raw, str):
            raise ValueError
        return base64.b64decode(raw, validate=True)
    except ValueError:
        raise UsageError("field 'input_b64' must be base64") from None


def _peer(body: dict[str, Any]) -> str | None:
    peer = body.get("peer")
    if peer is not None and (not isinstance(peer, str) or not peer):
        raise UsageError("field 'peer' must be a peer id")
    return peer


def json_safe(value: object) -> object:
    """``value`` with bytes as ``{"base64": ...}`` (JSON has no bytes)."""
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN/inf: not JSON
    return value


def reply_fields(value: object) -> dict[str, object]:
    """The reply as JSON fields: ``reply`` (text or JSON) or ``reply_b64`` (bytes)."""
    if isinstance(value, bytes):
        return {"type": "bytes", "reply_b64": base64.b64encode(value).decode()}
    kind = "text" if isinstance(value, str) else "json"
    return {"type": kind, "reply": json_safe(value)}


# ---------------------------------------------------------------------------- routes


def services_routes(node: NodeAPI) -> list[web.RouteDef]:
    """The routes; the services saved in the node's home are served again first."""
    # What each service served through this API runs: shown by GET /v1/services.
    adapters: dict[str, str] = {}
    home = node.config.home
    # What serve registered, saved in the home (SERVICES_FILE) as normalised bodies.
    saved: dict[str, dict[str, Any]] = {}

    def serve_body(body: dict[str, Any], *, replace: bool) -> dict[str, Any]:
        """Serve what ``body`` says; returns it normalised (what is saved)."""
        name = _name(body.get("name"))
        timeout = _timeout(body, DEFAULT_ADAPTER_TIMEOUT)
        idempotent = _bool(body, "idempotent")
        stream = _bool(body, "stream")
        allow_remote = _bool(body, "allow_remote")
        given = [k for k in ("exec", "command", "http") if k in body]
        if len(given) != 1:
            raise UsageError("give exactly one of 'exec' (argv), 'command' (shell) and 'http'")
        max_output = body.get("max_output", 1024 * 1024)
        if (
            isinstance(max_output, bool)
            or not isinstance(max_output, int)
            or not 0 < max_output <= MAX_ADAPTER_OUTPUT
        ):
            raise UsageError(f"field 'max_output' must be 1..{MAX_ADAPTER_OUTPUT} bytes")
        if not replace and any(row.get("name") == name for row in node.services()):
            raise UsageError(
                f"service {name!r} is already served here: unserve it first, "
                "or replace it (--replace)"
            )
        spec: dict[str, Any] = {
            "name": name,
            "idempotent": idempotent,
            "timeout": timeout,
            "max_output": max_output,
        }
        if given[0] == "http":
            url = body["http"]
            if not isinstance(url, str):
                raise UsageError("field 'http' must be a URL")
            if stream:
                raise UsageError("an --http service answers once: it cannot be a stream")
            handler = http_handler(
                url, allow_remote=allow_remote, timeout=timeout, max_body=max_output
            )
            node.serve(name, handler, idempotent=idempotent)
            adapter = f"http {url}"
            spec.update(http=url, allow_remote=allow_remote)
        else:
            shell = given[0] == "command"
            if shell:
                command = body["command"]
                if not isinstance(command, str) or not command.strip() or "\0" in command:
                    raise UsageError("field 'command' must be a shell command line")
                argv = [command]
                spec["command"] = command
            else:
                argv = _argv(body["exec"])
                spec["exec"] = argv
            made = exec_handler(
                argv, timeout=timeout, max_output=max_output, shell=shell, stream=stream
            )
            if stream:
                node.serve_stream(name, made, idempotent=idempotent)
            else:
                node.serve(name, made, idempotent=idempotent)
            adapter = f"{'shell' if shell else 'exec'} {' '.join(argv)}"
            spec["stream"] = stream
        adapters[name] = adapter
        return spec

    def save() -> None:
        try:
            save_services(home, list(saved.values()))
        except OSError as exc:  # served all the same; only the next start misses it
            log.error("cannot save the services to %s: %s", home, exc)

    # Served again at start; a saved entry that no longer works (a program gone, a
    # bad field) is reported and skipped, and dropped from the file at the next save.
    for body in load_services(home):
        try:
            spec = serve_body(body, replace=False)
        except P2PError as exc:
            log.warning("saved service %r not served: %s", body.get("name", "?"), exc)
            continue
        saved[spec["name"]] = spec
        log.info("serving saved service %s: %s", spec["name"], adapters[spec["name"]])

    async def post_serve(request: web.Request) -> web.Response:
        body = await read_json(request)
        spec = serve_body(body, replace=_bool(body, "replace"))
        name = spec["name"]
        saved[name] = spec
        save()
        return json_response(
            {
                "name": name,
                "kind": "stream" if spec.get("stream") else "unary",
                "adapter": adapters[name],
                "idempotent": spec["idempotent"],
                "timeout": spec["timeout"],
            }
        )

    async def post_unserve(request: web.Request) -> web.Response:
        body = await read_json(request)
        name = _name(body.get("name"))
        node.unserve(name)
        adapters.pop(name, None)
        if saved.pop(name, None) is not None:
            save()
        return json_response({"name": name, "unserved": True})

    async def get_services(_: web.Request) -> web.Response:
        rows = []
        for row in node.services():
            shown = dict(row)
            if row.get("name") in adapters:
                shown["adapter"] = adapters[row["name"]]
            rows.append(shown)
        return json_response({"services": rows})

    async def get_find(request: web.Request) -> web.Response:
        name = _name(request.query.get("name", ""))
        records = await node.find_service(name)
        if not records:
            raise NoProviders(f"no provider of {name!r} found in the DHT", service=name)
        rows = [
            {"peer_id": peer_id_to_str(r.node_id), "host": r.host, "port": r.port} for r in records
        ]
        return json_response({"name": name, "providers": rows})

    async def post_call(request: web.Request) -> web.Response:
        body = await read_call_json(request)
        name = _name(body.get("name"))
        value = _request_value(body)
        timeout = _timeout(body, DEFAULT_CALL_TIMEOUT)
        started = time.perf_counter()
        reply = await node.call(name, value, timeout=timeout, peer=_peer(body))
        elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
        return json_response({"name": name, **reply_fields(reply), "elapsed_ms": elapsed_ms})

    async def post_call_stream(request: web.Request) -> web.StreamResponse:
        body = await read_call_json(request)
        name = _name(body.get("name"))
        value = _request_value(body)
        timeout = _timeout(body, DEFAULT_STREAM_TIMEOUT)
        items = aiter(node.call_stream(name, value, timeout=timeout, peer=_peer(body)))
        # The first item before the answer starts: a call that fails to start (no
        # providers, unknown service) gets its own status, as a unary call does.
        try:
            first: list[object] = [await anext(items)]
        except StopAsyncIteration:
            first = []
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        count = 0
        try:
            for item in first:
                count += 1
                await _send(response, {"event": StreamEvent.ITEM, **reply_fields(item)})
            async for item in items:
                count += 1
                await _send(response, {"event": StreamEvent.ITEM, **reply_fields(item)})
            final: dict[str, Any] = {"event": StreamEvent.DONE, "items": count}
        except ServiceError as exc:
            final = {"event": StreamEvent.ERROR, **service_error_body(exc)}
        except UsageError as exc:
            final = {"event": StreamEvent.ERROR, **error_body(exc)}
        except ConnectionResetError:
            return response  # the client went away: the stream is closed below
        finally:
            # The client went away (or the stream ended): stop pulling, cancel it there.
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()
        await _send(response, final)
        await response.write_eof()
        return response

    return [
        web.post("/v1/services/serve", _typed(post_serve)),
        web.post("/v1/services/unserve", _typed(post_unserve)),
        web.get("/v1/services", _typed(get_services)),
        web.get("/v1/services/find", _typed(get_find)),
        web.post("/v1/services/call", _typed(post_call)),
        web.post("/v1/services/call_stream", _typed(post_call_stream)),
    ]


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(json.dumps(event).encode() + b"\n")
