"""Helpers shared by the control API's route modules: JSON bodies and error mapping.

A request body is read whole (at most :data:`MAX_BODY` bytes), its nesting checked
by a flat scan (:func:`json_depth_exceeds`) before ``json.loads`` may recurse on
it, and decoded as UTF-8 whatever charset the header names (RFC 8259). Every body
refused before it reaches a handler is a 400 and is counted by reason in
``p2pnode_control_refused_inputs_total`` (the app's :data:`REFUSED_INPUTS`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from p2pnode.errors import (
    NodeNotRunning,
    NotFoundError,
    P2PError,
    P2PTimeoutError,
    ProtocolError,
    UsageError,
)

MAX_BODY = 64 * 1024
# Our bodies are flat objects; json.loads recurses once per level (RecursionError
# near 1,000, an HTTP 500 before this limit).
MAX_JSON_DEPTH = 32
# Path.mkdir(parents=True) and other path walks recurse once per component.
MAX_PATH_DEPTH = 256
REFUSED_INPUTS = web.AppKey("refused_inputs", Counter)

_JSON_SPECIAL = re.compile(rb'[\[\]{}"\\]')


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """True if arrays/objects in ``raw`` nest deeper than ``limit``: one pass, no
    recursion, brackets inside strings ignored. Junk is judged by json.loads later."""
    depth = 0
    in_string = False
    skip = -1  # the index of a character escaped by a backslash
    for match in _JSON_SPECIAL.finditer(raw):
        at = match.start()
        if at == skip:
            continue
        char = raw[at]
        if in_string:
            if char == 0x5C:  # backslash
                skip = at + 1
            elif char == 0x22:  # quote
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in b"[{":
            depth += 1
            if depth > limit:
                return True
        elif char in b"]}":
            depth -= 1
    return False


def status_for(exc: P2PError) -> int:
    if isinstance(exc, UsageError):
        return 400
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, NodeNotRunning):
        return 503
    if isinstance(exc, P2PTimeoutError):
        return 504
    if isinstance(exc, ProtocolError):
        return 502
    return 500


def error_body(exc: P2PError) -> dict[str, str]:
    # The class name: ErrorKind names those the client maps back.
    return {"error": str(exc), "kind": type(exc).__name__}


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def count_refused(request: web.Request, reason: str) -> None:
    counter = request.app.get(REFUSED_INPUTS)
    if counter is not None:
        counter.labels(reason).inc()


def _refused(request: web.Request, reason: str, message: str) -> UsageError:
    count_refused(request, reason)
    return UsageError(message)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; a UsageError (400) for anything else."""
    try:
        raw = await request.read()  # bounded by the app's client_max_size
    except web.HTTPRequestEntityTooLarge:
        raise _refused(request, "too_large", f"request body larger than {MAX_BODY} bytes") from None
    if json_depth_exceeds(raw, MAX_JSON_DEPTH):
        raise _refused(
            request, "too_deep", f"request body nested deeper than {MAX_JSON_DEPTH} levels"
        )
    try:
        body = json.loads(raw.decode("utf-8"))
    # ValueError: bad JSON, bad UTF-8, an int over Python's digit limit.
    # RecursionError: a last guard, should the scan above ever miss a case.
    except (ValueError, RecursionError):
        raise _refused(request, "not_json", "request body is not JSON (UTF-8)") from None
    if not isinstance(body, dict):
        raise UsageError("request body must be a JSON object")
    return body


def path_field(body: dict[str, Any], name: str) -> Path:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise UsageError(f"field {name!r} must be a path")
    path = Path(value)
    if not path.is_absolute():
        raise UsageError(f"field {name!r} must be an absolute path")
    if len(path.parts) > MAX_PATH_DEPTH:
        raise UsageError(f"field {name!r} is too deep (over {MAX_PATH_DEPTH} folders)")
    return path
