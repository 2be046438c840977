"""Helpers shared by the control API's route modules: JSON bodies and error mapping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from p2pnode.errors import (
    NodeNotRunning,
    NotFoundError,
    P2PError,
    P2PTimeoutError,
    ProtocolError,
    UsageError,
)


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


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError("request body is not JSON") from None
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
    return path
