"""The --exec and --http adapters against a real local program and a real local
aiohttp server (loopback only; each test well under a second)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from p2pnode.errors import BadServiceRequest, DeadlineExceeded, HandlerError, TooLarge, UsageError
from p2pnode.identity import peer_id_to_str
from p2pnode.services import CallContext
from p2pnode.services.adapters import exec_handler, http_handler


def Ctx(deadline: float = 30.0) -> CallContext:
    return CallContext(b"\x01" * 20, "test.svc", deadline)


CTX = Ctx()


# ---------------------------------------------------------------------------- --exec


async def test_exec_runs_the_program_with_request_on_stdin() -> None:
    upper = exec_handler(["tr", "a-z", "A-Z"], timeout=5, max_output=1024)
    assert await upper("hello\n", CTX) == "HELLO\n"
    assert await upper(b"bytes in", CTX) == "BYTES IN"


async def test_exec_reply_that_is_not_utf8_stays_bytes() -> None:
    raw = exec_handler(["head", "-c", "2"], timeout=5, max_output=1024)
    assert await raw(b"\xff\xfe\x00", CTX) == b"\xff\xfe"


async def test_exec_never_uses_a_shell_unless_asked(tmp_path: Any) -> None:
    marker = tmp_path / "pwned"
    echo = exec_handler(["echo", f"x; touch {marker}"], timeout=5, max_output=1024)
    assert await echo(b"", CTX) == f"x; touch {marker}\n"
    assert not marker.exists()
    shell = exec_handler([f"echo hi; touch {marker}"], timeout=5, max_output=1024, shell=True)
    assert await shell(b"", CTX) == "hi\n"
    assert marker.exists()


async def test_exec_nonzero_exit_is_a_handler_error_with_code_and_stderr() -> None:
    failing = exec_handler(
        ["sh", "-c", "echo first problem >&2; echo second >&2; exit 3"],
        timeout=5,
        max_output=1024,
    )
    with pytest.raises(HandlerError) as info:
        await failing(b"ignored input", CTX)
    message = str(info.value)
    assert "status 3" in message and "first problem" in message and "second" in message
    assert "Traceback" not in message


NOISY_STDERR = "import sys; sys.stderr.write('e' * 10**6 + '\\n' * 50); sys.exit(1)"


async def test_exec_stderr_in_the_error_is_bounded() -> None:
    noisy = exec_handler(
        [
            sys.executable,
            "-c",
            "import sys; sys.stderr.write('e' * 10**6 + '\\n' * 50); sys.exit(1)",
        ],
        timeout=5,
        max_output=1024,
    )
    with pytest.raises(HandlerError) as info:
        await noisy(b"", CTX)
    assert len(str(info.value)) < 2000


async def test_exec_timeout_kills_the_program_and_its_children() -> None:
    # A shell that starts a child: the kill must reach the whole process group.
    slow = exec_handler(["sleep 30; echo late"], timeout=0.3, max_output=1024, shell=True)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="did not finish"):
        await slow(b"", CTX)
    assert time.monotonic() - started < 3


async def test_exec_call_deadline_caps_the_timeout() -> None:
    slow = exec_handler(["sleep", "30"], timeout=60, max_output=1024)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await slow(b"", Ctx(deadline=0.3))
    assert time.monotonic() - started < 3


async def test_exec_output_over_the_bound_kills_the_program() -> None:
    chatty = exec_handler(["yes"], timeout=10, max_output=64 * 1024)
    started = time.monotonic()
    with pytest.raises(TooLarge, match="more than 65536 bytes"):
        await chatty(b"", CTX)
    assert time.monotonic() - started < 3


async def test_exec_overflow_with_a_paused_pipe_still_ends() -> None:
    # The program keeps writing after we stop reading: stdout's reader pauses, and
    # the killed program's pipe end must still be seen (drained), or wait() hangs.
    flood = exec_handler(["head", "-c", "20000000", "/dev/zero"], timeout=10, max_output=1000)
    started = time.monotonic()
    for _ in range(3):
        with pytest.raises(TooLarge):
            await asyncio.wait_for(flood(b"", CTX), 5)
    assert time.monotonic() - started < 5


async def test_exec_shell_child_left_holding_stdout_is_killed_too() -> None:
    # The shell exits at once; its background child keeps stdout open until killed.
    leaves = exec_handler(["sleep 30 & echo hi"], timeout=0.5, max_output=1000, shell=True)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(leaves(b"", CTX), 5)
    assert time.monotonic() - started < 3


async def test_exec_cancelled_call_kills_the_program(tmp_path: Any) -> None:
    # The program tells its pid through a FIFO: reading it waits until it runs.
    fifo = tmp_path / "pid"
    os.mkfifo(fifo)
    script = f"echo $$ > {fifo}; exec sleep 30"
    slow = exec_handler([script], timeout=60, max_output=64, shell=True)
    call = asyncio.create_task(slow(b"", CTX))
    pid = int(await asyncio.wait_for(asyncio.to_thread(fifo.read_text), 5))
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped: gone


async def test_exec_program_is_told_who_calls() -> None:
    env = exec_handler(
        ["sh -c 'echo $P2PNODE_CALLER $P2PNODE_SERVICE $P2PNODE_DEADLINE'"],
        timeout=5,
        max_output=1024,
        shell=True,
    )
    caller, service, deadline = str(await env(b"", Ctx(deadline=2.0))).split()
    assert (caller, service, float(deadline)) == (peer_id_to_str(b"\x01" * 20), "test.svc", 2.0)


async def test_exec_program_that_ignores_stdin() -> None:
    ignores = exec_handler(["echo", "fixed"], timeout=5, max_output=1024)
    assert await ignores(b"x" * 1_000_000, CTX) == "fixed\n"


async def test_exec_json_request_is_written_as_json() -> None:
    cat = exec_handler(["cat"], timeout=5, max_output=1024)
    assert await cat({"a": 1}, CTX) == '{"a": 1}'


def test_exec_unknown_program_fails_at_serve_time() -> None:
    with pytest.raises(UsageError, match="not found"):
        exec_handler(["no-such-program-p2pnode"], timeout=5, max_output=1024)
    with pytest.raises(UsageError):
        exec_handler([], timeout=5, max_output=1024)


async def test_exec_stream_yields_lines() -> None:
    lines = exec_handler(["printf", "a\\nb\\nc"], timeout=5, max_output=1024, stream=True)
    got = [item async for item in lines(b"", CTX)]
    assert got == ["a", "b", "c"]


async def test_exec_stream_stopped_early_kills_the_program() -> None:
    forever = exec_handler(["yes"], timeout=30, max_output=1024, stream=True)
    items: AsyncIterator[object] = forever(b"", CTX)
    got = [await items.__anext__() for _ in range(3)]
    assert got == ["y", "y", "y"]
    await items.aclose()  # type: ignore[attr-defined]


async def test_exec_stream_nonzero_exit_after_items() -> None:
    failing = exec_handler(
        ["sh", "-c", "echo one; echo bad >&2; exit 4"], timeout=5, max_output=1024, stream=True
    )
    got: list[object] = []
    with pytest.raises(HandlerError, match="status 4: bad"):
        async for item in failing(b"", CTX):
            got.append(item)
    assert got == ["one"]


# ---------------------------------------------------------------------------- --http


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    # A short shutdown: the slow handler is still sleeping at teardown.
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@pytest.fixture
async def local_http() -> AsyncIterator[str]:
    async def weather(request: web.Request) -> web.Response:
        body = await request.json()
        if "city" not in body:
            return web.json_response({"error": "city missing"}, status=422)
        return web.json_response({"city": body["city"], "temp": 4})

    async def echo(request: web.Request) -> web.Response:
        data = await request.read()
        return web.Response(body=data, content_type=request.content_type)

    async def text(request: web.Request) -> web.Response:
        return web.Response(text=(await request.text()).upper())

    async def caller(request: web.Request) -> web.Response:
        names = ("X-P2PNode-Caller", "X-P2PNode-Service", "X-P2PNode-Deadline")
        return web.json_response([request.headers.get(n) for n in names])

    async def boom(_: web.Request) -> web.Response:
        return web.Response(status=500, text="database down")

    async def big(_: web.Request) -> web.Response:
        return web.Response(body=b"x" * 200_000)

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response(text="late")

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound("http://example.com/")

    app = web.Application()
    app.add_routes(
        [
            web.post("/weather", weather),
            web.post("/echo", echo),
            web.post("/text", text),
            web.post("/caller", caller),
            web.post("/boom", boom),
            web.post("/big", big),
            web.post("/slow", slow),
            web.post("/redirect", redirect),
        ]
    )
    runner, url = await _serve(app)
    yield url
    await runner.cleanup()


async def test_http_json_request_and_reply(local_http: str) -> None:
    weather = http_handler(f"{local_http}/weather", timeout=5)
    assert await weather({"city": "Oslo"}, CTX) == {"city": "Oslo", "temp": 4}


async def test_http_text_and_bytes(local_http: str) -> None:
    assert await http_handler(f"{local_http}/text", timeout=5)("hi", CTX) == "HI"
    echo = http_handler(f"{local_http}/echo", timeout=5)
    assert await echo(b"\x00\xff", CTX) == b"\x00\xff"


async def test_http_service_is_told_who_calls(local_http: str) -> None:
    told = await http_handler(f"{local_http}/caller", timeout=1)("x", CTX)
    assert told == [peer_id_to_str(b"\x01" * 20), "test.svc", "1.000"]


async def test_http_4xx_is_bad_request_5xx_is_handler_error(local_http: str) -> None:
    with pytest.raises(BadServiceRequest, match=r"422.*city missing"):
        await http_handler(f"{local_http}/weather", timeout=5)({"town": "x"}, CTX)
    with pytest.raises(HandlerError, match="500: database down"):
        await http_handler(f"{local_http}/boom", timeout=5)("x", CTX)


async def test_http_redirect_is_not_followed(local_http: str) -> None:
    with pytest.raises(HandlerError, match="302"):
        await http_handler(f"{local_http}/redirect", timeout=5)("x", CTX)


async def test_http_body_is_bounded(local_http: str) -> None:
    big = http_handler(f"{local_http}/big", timeout=5, max_body=100_000)
    with pytest.raises(TooLarge):
        await big("x", CTX)


async def test_http_timeout_and_call_deadline(local_http: str) -> None:
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await http_handler(f"{local_http}/slow", timeout=0.3)("x", CTX)
    with pytest.raises(DeadlineExceeded):
        await http_handler(f"{local_http}/slow", timeout=30)("x", Ctx(deadline=0.3))
    assert time.monotonic() - started < 3


async def test_http_connection_refused_is_a_handler_error() -> None:
    runner, url = await _serve(web.Application())
    await runner.cleanup()  # the port is free again: nothing listens
    with pytest.raises(HandlerError, match="unreachable"):
        await http_handler(url, timeout=5)("x", CTX)


def test_http_only_loopback_unless_allowed() -> None:
    for url in ("http://127.0.0.1:8080/", "http://[::1]:80/x", "http://localhost:1/"):
        http_handler(url, timeout=1)
    for url in ("http://10.0.0.1/", "http://example.com/", "ftp://127.0.0.1/", "nonsense"):
        with pytest.raises(UsageError):
            http_handler(url, timeout=1)
    http_handler("http://example.com/", timeout=1, allow_remote=True)
