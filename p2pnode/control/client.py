"""A small synchronous client of the control API, for the CLI (stdlib only, fast start)."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from p2pnode.control.api import ErrorKind
from p2pnode.errors import (
    SERVICE_ERRORS,
    DownloadError,
    NodeNotRunning,
    NotFoundError,
    P2PError,
    P2PTimeoutError,
    ProtocolError,
    StaleError,
    StorageError,
    UsageError,
)
from p2pnode.home import read_control

_KINDS: dict[str, type[P2PError]] = {
    ErrorKind.USAGE: UsageError,
    ErrorKind.NOT_FOUND: NotFoundError,
    ErrorKind.TIMEOUT: P2PTimeoutError,
    ErrorKind.PROTOCOL: ProtocolError,
    ErrorKind.NODE_NOT_RUNNING: NodeNotRunning,
    # The server names any P2PError by its class: these keep their meaning (and
    # their --json code) on this side too.
    **{cls.__name__: cls for cls in (DownloadError, StaleError, StorageError)},
    **{cls.__name__: cls for cls in SERVICE_ERRORS.values()},
}


class ControlClient:
    def __init__(self, home: Path, timeout: float = 120.0) -> None:
        self._info = read_control(home)
        self._home = home
        self._timeout = timeout

    def _request(self, method: str, path: str, body: Any = None) -> urllib.request.Request:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self._info.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self._info.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        return req

    def _open(self, req: urllib.request.Request) -> Any:
        try:
            return urllib.request.urlopen(req, timeout=self._timeout)
        except urllib.error.HTTPError as exc:
            raise _error_from(exc) from None
        except (urllib.error.URLError, ConnectionError) as exc:
            raise NodeNotRunning(
                f"no node answers for home {self._home} at {self._info.url} "
                f"(stale control file? pid {self._info.pid}): {exc}"
            ) from None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        with self._open(self._request(method, path, body)) as resp:
            return json.loads(resp.read())

    def stream(self, method: str, path: str, body: Any = None) -> Iterator[dict[str, Any]]:
        """The answer's lines as they come; a stream cut short (the node killed)
        just ends, so the caller sees that no final event came."""
        with self._open(self._request(method, path, body)) as resp:
            try:
                for line in resp:
                    if line.strip():
                        yield json.loads(line)
            except (http.client.HTTPException, ConnectionError, json.JSONDecodeError):
                return


def _error_from(exc: urllib.error.HTTPError) -> P2PError:
    try:
        body = json.loads(exc.read())
        message, kind = str(body["error"]), str(body.get("kind", ""))
    except (ValueError, KeyError, TypeError):
        return P2PError(f"control API error {exc.code}: {exc.reason}")
    return _KINDS.get(kind, P2PError)(message)


def raise_event_error(event: dict[str, Any]) -> None:
    """Raise the P2PError an ``{"event": "error"}`` stream line describes."""
    raise _KINDS.get(str(event.get("kind")), P2PError)(str(event.get("error")))
