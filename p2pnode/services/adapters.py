"""Service handlers that forward each call to something local: a program (``--exec``)
or an HTTP service (``--http``).

Both are thin asyncio shells with hard bounds, since a caller anywhere in the
network drives them:
- a program runs per call with ``create_subprocess_exec`` (a shell only when asked),
  request on stdin, reply from stdout; output past ``max_output`` bytes, or running
  past the timeout (capped by the call's own deadline), kills its process group; a
  non-zero exit becomes a handler error with the status and the first lines of
  stderr, never a traceback;
- an HTTP service is reached only on a loopback address unless ``allow_remote``;
  redirects are not followed (one could leave loopback); 2xx is the reply, 4xx a
  bad request, 5xx or no connection a handler error; bodies are bounded.

Both tell the local side who calls (the caller's peer id is authenticated by the
Noise connection): a program gets ``P2PNODE_CALLER``, ``P2PNODE_SERVICE`` and
``P2PNODE_DEADLINE`` (seconds) in its environment, an HTTP service the headers
``X-P2PNode-Caller``, ``X-P2PNode-Service`` and ``X-P2PNode-Deadline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from p2pnode.errors import (
    BadServiceRequest,
    DeadlineExceeded,
    HandlerError,
    TooLarge,
    UsageError,
)
from p2pnode.identity import peer_id_to_str

if TYPE_CHECKING:
    from p2pnode.services.service import CallContext

log = logging.getLogger(__name__)
# Reapers of programs whose call was cancelled while they were being reaped.
_REAPING: set[asyncio.Future[None]] = set()

UnaryHandler = Callable[[object, "CallContext"], Awaitable[object]]
StreamHandler = Callable[[object, "CallContext"], AsyncIterator[object]]

DEFAULT_MAX_OUTPUT = 1024 * 1024
STDERR_KEEP = 4096  # bytes of stderr kept for the error message; the rest is drained
STDERR_LINES = 5
STDERR_LINE_CHARS = 200
READ_CHUNK = 64 * 1024
REAP_TIMEOUT = 5.0  # seconds to wait for a killed program's pipes to close
BODY_EXCERPT = 300  # characters of an HTTP error body shown in the error
TEXT_TYPE = "text/plain; charset=utf-8"
LOCAL_NAMES = frozenset({"localhost", "localhost."})


# ---------------------------------------------------------------------------- shared


def _request_bytes(request: object) -> bytes:
    """What a program's stdin or an HTTP body gets for a request."""
    if request is None:
        return b""
    if isinstance(request, bytes):
        return request
    if isinstance(request, str):
        return request.encode()
    if isinstance(request, dict | list | int | float | bool):
        return json.dumps(request).encode()
    raise BadServiceRequest(f"request of type {type(request).__name__} cannot be forwarded")


def _as_reply(data: bytes) -> bytes | str:
    """Text when it is valid UTF-8 (what a caller prints), else the bytes."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


def _time_left(timeout: float, ctx: CallContext | None) -> float:
    """The adapter's timeout, capped by what is left of the call's deadline."""
    if ctx is not None and ctx.deadline > 0:
        return min(timeout, ctx.deadline)
    return timeout


def _caller_facts(ctx: CallContext, left: float) -> dict[str, str]:
    return {
        "CALLER": peer_id_to_str(ctx.peer_id),
        "SERVICE": ctx.service,
        "DEADLINE": f"{left:.3f}",
    }


def _first_lines(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    lines = [line.rstrip()[:STDERR_LINE_CHARS] for line in text.splitlines() if line.strip()]
    shown = "; ".join(lines[:STDERR_LINES])
    return shown + (" ..." if len(lines) > STDERR_LINES else "")


# ---------------------------------------------------------------------------- --exec


class _Overflow(Exception):
    """Stdout passed its bound (internal: becomes TooLarge)."""


def exec_argv(argv: Sequence[str], *, shell: bool) -> list[str]:
    """The argv actually run: the program found on PATH, or ``/bin/sh -c TEXT``."""
    if not argv or not all(isinstance(a, str) for a in argv) or not argv[0]:
        raise UsageError("exec needs a program and its arguments")
    if shell:
        text = argv[0] if len(argv) == 1 else " ".join(argv)
        return ["/bin/sh", "-c", text]
    program = shutil.which(argv[0])
    if program is None:
        raise UsageError(f"program not found or not executable: {argv[0]!r}")
    return [program, *argv[1:]]


def exec_handler(
    argv: Sequence[str],
    *,
    timeout: float,
    max_output: int = DEFAULT_MAX_OUTPUT,
    shell: bool = False,
    stream: bool = False,
) -> Any:
    """A handler running ``argv`` once per call (request on stdin, reply from
    stdout). With ``stream`` it is a stream handler yielding stdout line by line
    (each line bounded by ``max_output``). The program is checked now, so a typo
    fails at ``serve`` time, not on the first call."""
    if timeout <= 0 or max_output <= 0:
        raise UsageError("exec timeout and max_output must be positive")
    command = exec_argv(argv, shell=shell)
    shown = " ".join(argv)[:80]
    if stream:

        async def stream_handler(request: object, ctx: CallContext) -> AsyncIterator[object]:
            left = _time_left(timeout, ctx)
            async with _Program(command, shown, left, _caller_env(ctx, left)) as program:
                async for line in program.lines(_request_bytes(request), max_output):
                    yield _as_reply(line)

        return stream_handler

    async def handler(request: object, ctx: CallContext) -> object:
        left = _time_left(timeout, ctx)
        async with _Program(command, shown, left, _caller_env(ctx, left)) as program:
            return _as_reply(await program.run(_request_bytes(request), max_output))

    return handler


def _caller_env(ctx: CallContext, left: float) -> dict[str, str]:
    facts = _caller_facts(ctx, left)
    return {**os.environ, **{f"P2PNODE_{k}": v for k, v in facts.items()}}


class _Program:
    """One run of the program: started on enter, its process group killed on exit
    if still running (a timeout, an overflow, a cancelled call)."""

    def __init__(self, command: list[str], shown: str, timeout: float, env: dict[str, str]) -> None:
        self._command = command
        self._env = env
        self._shown = shown
        self._timeout = timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr = bytearray()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> _Program:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self._command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
                # Its own process group: a kill reaches what a shell started too.
                start_new_session=True,
            )
        except OSError as exc:
            raise HandlerError(f"cannot run {self._shown!r}: {exc.strerror}") from None
        return self

    async def __aexit__(self, *_: object) -> None:
        proc = self._proc
        if proc is None:
            return
        # Always: a shell may have exited and left a child holding stdout open.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        reaper = asyncio.ensure_future(self._reap(proc))
        try:
            # Shielded: a cancelled call still waits for its child to be reaped.
            await asyncio.shield(reaper)
        except asyncio.CancelledError:
            _REAPING.add(reaper)  # cancelled twice: let it finish on its own
            reaper.add_done_callback(_REAPING.discard)
            raise

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        """Drain what is left of stdout (a paused pipe never sees its end, and
        wait() waits for every pipe to close), then wait for the exit."""
        try:
            async with asyncio.timeout(REAP_TIMEOUT):
                if proc.stdout is not None:
                    while await proc.stdout.read(READ_CHUNK):
                        pass
                await proc.wait()
                await asyncio.gather(*self._tasks, return_exceptions=True)
        except TimeoutError:
            # Something outside the process group holds a pipe: stop waiting.
            log.warning(
                "program %r: pipes still open %ss after the kill", self._shown, REAP_TIMEOUT
            )
        for task in self._tasks:
            task.cancel()

    def _start_io(self, stdin: bytes) -> None:
        assert self._proc is not None
        self._tasks = [
            asyncio.create_task(self._feed(stdin)),
            asyncio.create_task(self._drain_stderr()),
        ]

    async def _feed(self, data: bytes) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        stdin = self._proc.stdin
        # A program that does not read its stdin (or exits early) is not an error.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if data:
                stdin.write(data)
                await stdin.drain()
            stdin.close()
            await stdin.wait_closed()

    async def _drain_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while chunk := await self._proc.stderr.read(READ_CHUNK):
            room = STDERR_KEEP - len(self._stderr)
            if room > 0:
                self._stderr += chunk[:room]

    def _deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"{self._shown!r} did not finish within {self._timeout:.3g} s (killed)"
        )

    async def _finish(self) -> None:
        """Wait for the exit and stderr; a non-zero status is a handler error."""
        assert self._proc is not None
        await self._proc.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        code = self._proc.returncode
        if code == 0:
            return
        if code is not None and code < 0:
            what = f"was killed by signal {-code}"
        else:
            what = f"exited with status {code}"
        detail = _first_lines(bytes(self._stderr))
        raise HandlerError(f"{self._shown!r} {what}" + (f": {detail}" if detail else ""))

    async def run(self, stdin: bytes, max_output: int) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        self._start_io(stdin)

        async def collect() -> bytes:
            out = bytearray()
            while chunk := await stdout.read(READ_CHUNK):
                out += chunk
                if len(out) > max_output:
                    raise _Overflow
            await self._finish()
            return bytes(out)

        try:
            return await asyncio.wait_for(collect(), self._timeout)
        except TimeoutError:
            raise self._deadline_error() from None
        except _Overflow:
            raise TooLarge(f"{self._shown!r} wrote more than {max_output} bytes (killed)") from None

    async def lines(self, stdin: bytes, max_line: int) -> AsyncIterator[bytes]:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        self._start_io(stdin)
        loop = asyncio.get_running_loop()
        ends = loop.time() + self._timeout
        pending = b""
        while True:
            left = ends - loop.time()
            if left <= 0:
                raise self._deadline_error()
            try:
                chunk = await asyncio.wait_for(stdout.read(READ_CHUNK), left)
            except TimeoutError:
                raise self._deadline_error() from None
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line
            if len(pending) > max_line:
                raise TooLarge(f"{self._shown!r} wrote a line over {max_line} bytes")
        if pending:
            yield pending
        try:
            await asyncio.wait_for(self._finish(), max(0.0, ends - loop.time()))
        except TimeoutError:
            raise self._deadline_error() from None


# ---------------------------------------------------------------------------- --http


def check_http_url(url: str, *, allow_remote: bool) -> str:
    """The URL if it may be served: http(s), a host, loopback unless allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"not an http:// or https:// URL: {url!r}")
    if not allow_remote and not _is_loopback(parts.hostname):
        raise UsageError(
            f"{parts.hostname} is not a loopback address (127.0.0.1, ::1, localhost); "
            "forwarding to another host needs allow_remote (--allow-remote)"
        )
    return url


def _is_loopback(host: str) -> bool:
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def http_handler(
    url: str,
    *,
    allow_remote: bool = False,
    timeout: float,
    max_body: int = DEFAULT_MAX_OUTPUT,
) -> UnaryHandler:
    """A handler POSTing each request to ``url`` (a dict or list as JSON, bytes or
    text as the body) and mapping the answer to a reply or a typed error."""
    check_http_url(url, allow_remote=allow_remote)
    if timeout <= 0 or max_body <= 0:
        raise UsageError("http timeout and max_body must be positive")

    async def handler(request: object, ctx: CallContext) -> object:
        import aiohttp  # the node has it; kept out of the CLI's import path

        left = _time_left(timeout, ctx)
        facts = _caller_facts(ctx, left)
        headers = {f"X-P2PNode-{k.title()}": v for k, v in facts.items()}
        kwargs: dict[str, Any] = {"headers": headers}
        if isinstance(request, dict | list):
            kwargs["json"] = request
        else:
            kwargs["data"] = _request_bytes(request)
            text = isinstance(request, str)
            headers["Content-Type"] = (
                "text/plain; charset=utf-8" if text else "application/octet-stream"
            )
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=left)) as session,
                session.post(url, allow_redirects=False, **kwargs) as resp,
            ):
                data = await _read_bounded(resp.content, max_body)
                return _http_outcome(url, resp.status, resp.content_type, resp.charset, data)
        except TimeoutError:
            raise DeadlineExceeded(
                f"HTTP service {url} did not answer within {left:.3g} s"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            code = getattr(exc.os_error, "errno", None)
            why = os.strerror(code).lower() if code else "connection failed"
            raise HandlerError(f"HTTP service {url} unreachable ({why}): is it running?") from None
        except aiohttp.ClientError as exc:
            raise HandlerError(f"HTTP service {url} failed: {exc}") from None

    return handler


async def _read_bounded(content: Any, limit: int) -> bytes:
    out = bytearray()
    while chunk := await content.read(READ_CHUNK):
        out += chunk
        if len(out) > limit:
            raise TooLarge(f"HTTP answer larger than {limit} bytes")
    return bytes(out)


def _http_outcome(
    url: str, status: int, content_type: str, charset: str | None, data: bytes
) -> object:
    if 200 <= status < 300:
        if content_type == "application/json" or content_type.endswith("+json"):
            try:
                return json.loads(data.decode(charset or "utf-8"))
            except (ValueError, LookupError, RecursionError):
                raise HandlerError(f"HTTP service {url} sent invalid JSON") from None
        if content_type.startswith("text/"):
            try:
                return data.decode(charset or "utf-8")
            except (UnicodeDecodeError, LookupError):
                return data
        return data
    excerpt = data.decode("utf-8", "replace").strip()[:BODY_EXCERPT]
    detail = f"HTTP service answered {status}" + (f": {excerpt}" if excerpt else "")
    if 400 <= status < 500:
        raise BadServiceRequest(detail)
    if 300 <= status < 400:
        raise HandlerError(f"{detail} (redirects are not followed)")
    raise HandlerError(detail)
