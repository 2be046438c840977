"""Control API endpoints of the resource exchange: share, unshare, ls, providers, get.

``POST /v1/get`` streams newline-delimited JSON: ``{"event": "phase", ...}`` lines
when the download's phase changes (looking providers up, connecting, asking for the
manifest, looking up again: exchange/phase.py) and ``{"event": "progress", ...}``
lines while the bytes arrive, then one ``{"event": "done", "resource": ...}`` or
``{"event": "error", "error": ..., "kind": ...}`` line. Progress lines are dropped
when the reader is slow; phase lines (a few per download) never are.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from p2pnode.control.api import ErrorKind, Jsonable, NodeAPI, StreamEvent
from p2pnode.control.common import count_refused, error_body, path_field, read_json
from p2pnode.errors import P2PError, UsageError
from p2pnode.exchange.manifest import resource_id_from_str, resource_id_to_str
from p2pnode.identity import peer_id_to_str

log = logging.getLogger(__name__)
PROGRESS_QUEUE = 64


def _id_field(body: dict[str, Any]) -> bytes:
    value = body.get("id")
    if not isinstance(value, str):
        raise UsageError("field 'id' must be a resource id")
    return resource_id_from_str(value)


class Watched(Protocol):
    """One download followed elsewhere: its progress and its phase events."""

    @property
    def progress(self) -> Callable[[Jsonable], None]: ...
    @property
    def phase(self) -> Callable[[Jsonable], None]: ...


class DownloadWatcher(Protocol):
    """Who else follows downloads (the status page): progress and phases, then the
    outcome."""

    def watch(self, rid: bytes, dest: Path) -> Watched: ...
    def finished(self, rid: bytes, error: str | None) -> None: ...


def exchange_routes(node: NodeAPI, watcher: DownloadWatcher | None = None) -> list[web.RouteDef]:
    async def post_share(request: web.Request) -> web.Response:
        body = await read_json(request)
        follow_links = body.get("follow_links", False)
        if not isinstance(follow_links, bool):
            raise UsageError("field 'follow_links' must be true or false")
        info = await node.exchange.share(path_field(body, "path"), follow_links=follow_links)
        return web.json_response(info.to_json())

    async def post_unshare(request: web.Request) -> web.Response:
        body = await read_json(request)
        rid = _id_field(body)
        await node.exchange.unshare(rid)
        return web.json_response({"id": resource_id_to_str(rid), "unshared": True})

    async def get_ls(_: web.Request) -> web.Response:
        # A file changed since the last periodic check must not still show as shared.
        await node.exchange.check_stale()
        return web.json_response({"resources": [r.to_json() for r in node.exchange.list()]})

    async def get_providers(request: web.Request) -> web.Response:
        rid = resource_id_from_str(request.match_info["rid"])
        records = await node.exchange.providers(rid)
        rows = [
            {
                "peer_id": peer_id_to_str(r.node_id),
                "host": r.host,
                "port": r.port,
                "relays": [
                    {"host": h, "port": p, "peer_id": peer_id_to_str(relay)}
                    for h, p, relay in getattr(r, "relays", ())
                ],
            }
            for r in records
        ]
        return web.json_response({"id": resource_id_to_str(rid), "providers": rows})

    async def post_get(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        rid = _id_field(body)
        dest = path_field(body, "dest")
        force = bool(body.get("force", False))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        # Unbounded, but progress lines are only queued below PROGRESS_QUEUE; phase
        # lines are few (one per change of phase, bounded by the lookups made).
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        watched = watcher.watch(rid, dest) if watcher is not None else None

        def on_progress(progress: Jsonable) -> None:
            if watched is not None:
                watched.progress(progress)
            # Drop progress lines rather than block the download on a slow reader.
            if queue.qsize() < PROGRESS_QUEUE:
                queue.put_nowait({"event": StreamEvent.PROGRESS, **progress.to_json()})

        def on_phase(phase: Jsonable) -> None:
            if watched is not None:
                watched.phase(phase)
            queue.put_nowait({"event": StreamEvent.PHASE, **phase.to_json()})

        download = asyncio.create_task(
            node.exchange.get(rid, dest, force=force, progress=on_progress, phase=on_phase)
        )
        try:
            while not download.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, download}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    await _send(response, getter.result())
                else:
                    getter.cancel()
            try:
                info = download.result()
                final: dict[str, Any] = {"event": StreamEvent.DONE, "resource": info.to_json()}
            except P2PError as exc:
                final = {"event": StreamEvent.ERROR, **error_body(exc)}
            except RecursionError:
                # As the guard does for other routes (the stream has started here).
                log.warning("download of %s: RecursionError", resource_id_to_str(rid))
                count_refused(request, "recursion")
                final = {
                    "event": StreamEvent.ERROR,
                    "error": "input nested too deeply",
                    "kind": ErrorKind.USAGE,
                }
            if watcher is not None:
                watcher.finished(rid, final.get("error"))
            await _send(response, final)
        finally:
            if watcher is not None and not download.done():
                watcher.finished(rid, "interrupted (the client went away)")
            if not download.done():
                # The CLI went away: stop the download; what it verified is kept for resume.
                download.cancel()
                await asyncio.gather(download, return_exceptions=True)
        await response.write_eof()
        return response

    return [
        web.post("/v1/share", post_share),
        web.post("/v1/unshare", post_unshare),
        web.get("/v1/ls", get_ls),
        web.get("/v1/providers/{rid}", get_providers),
        web.post("/v1/get", post_get),
    ]


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(json.dumps(event).encode() + b"\n")
