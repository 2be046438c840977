"""Services as a user runs them: `p2pnode start` processes, `serve` on one node,
`find-service` and `call` on another, against a real local program and a real
local aiohttp server."""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.cli_helpers import CLI, RunningNode, cli_env, poll, run_cli


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """A CLI command with ``stdin`` piped in (None: no stdin at all)."""
    return subprocess.run(
        [*CLI, *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )


@pytest.fixture
def pair(tmp_path: Path, nodes: list[RunningNode]) -> tuple[Path, Path]:
    """Two joined nodes: A serves, B calls."""
    a = RunningNode(tmp_path / "a")
    nodes.append(a)
    b = RunningNode(tmp_path / "b", "--bootstrap", a.bootstrap)
    nodes.append(b)
    return a.home, b.home


def _found(home: Path, name: str) -> bool:
    return cli("--home", str(home), "find-service", name).returncode == 0


@pytest.fixture
def weather_server() -> Iterator[str]:
    """A real aiohttp service on 127.0.0.1, in a thread of its own."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    url: list[str] = []

    async def weather(request: web.Request) -> web.Response:
        body = await request.json()
        if not isinstance(body, dict) or "city" not in body:
            return web.json_response({"error": "city missing"}, status=422)
        return web.json_response({"city": body["city"], "temp_c": 4})

    async def boom(_: web.Request) -> web.Response:
        return web.Response(status=503, text="backend down")

    app = web.Application()
    app.add_routes([web.post("/", weather), web.post("/boom", boom)])
    runner = web.AppRunner(app, shutdown_timeout=0.1)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        url.append(f"http://{host}:{port}")
        ready.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield url[0]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_exec_service_called_from_another_node(pair: tuple[Path, Path]) -> None:
    a, b = pair
    served = run_cli("--home", str(a), "serve", "text.upper", "--exec", "tr a-z A-Z")
    assert "serving text.upper" in served.stdout
    poll(lambda: _found(b, "text.upper"))

    a_id = json.loads(run_cli("--home", str(a), "id", "--json").stdout)["peer_id"]
    found = cli("--home", str(b), "find-service", "text.upper")
    assert a_id in found.stdout and "1 provider(s)" in found.stdout
    as_json = json.loads(cli("--home", str(b), "find-service", "text.upper", "--json").stdout)
    assert [p["peer_id"] for p in as_json["providers"]] == [a_id]

    called = cli("--home", str(b), "call", "text.upper", stdin="hello\n")
    assert called.returncode == 0, called.stderr
    assert called.stdout == "HELLO\n"
    by_flag = cli("--home", str(b), "call", "text.upper", "--input", "abc", "--json")
    assert json.loads(by_flag.stdout)["reply"] == "ABC"
    direct = cli("--home", str(b), "call", "text.upper", "--input", "x", "--peer", a_id)
    assert direct.stdout == "X\n"

    table = cli("--home", str(a), "services").stdout
    assert "text.upper" in table and "tr a-z A-Z" in table and "P50" in table
    rows = json.loads(cli("--home", str(a), "services", "--json").stdout)["services"]
    assert rows[0]["name"] == "text.upper" and rows[0]["calls"] == 3
    status = cli("--home", str(a), "status").stdout
    assert "text.upper: 3 call(s), 0 error(s)" in status

    # Withdrawn: A refuses it (B may still hold A as a cached provider).
    run_cli("--home", str(a), "unserve", "text.upper")
    gone = cli("--home", str(b), "call", "text.upper", "--input", "x")
    assert gone.returncode == 1 and "text.upper" in gone.stderr
    assert cli("--home", str(a), "unserve", "text.upper").returncode == 1


def test_stream_service(pair: tuple[Path, Path]) -> None:
    a, b = pair
    run_cli("--home", str(a), "serve", "count.three", "--stream", "--exec", "seq 3")
    poll(lambda: _found(b, "count.three"))
    got = cli("--home", str(b), "call", "count.three", "--stream")
    assert got.returncode == 0, got.stderr
    assert got.stdout == "1\n2\n3\n"
    events = cli("--home", str(b), "call", "count.three", "--stream", "--json").stdout
    lines = [json.loads(line) for line in events.splitlines()]
    assert [e.get("reply") for e in lines[:-1]] == ["1", "2", "3"]
    assert lines[-1] == {"event": "done", "items": 3}

    # A reader that goes away (`| head -n 3`) ends the stream there: the endless
    # program on A is stopped and nothing stays in flight.
    run_cli("--home", str(a), "serve", "yes.forever", "--stream", "--exec", "yes")
    poll(lambda: _found(b, "yes.forever"))
    piped = subprocess.run(
        f"{shlex.join([*CLI, '--home', str(b), 'call', 'yes.forever', '--stream'])} | head -n 3",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )
    assert piped.stdout == "y\ny\ny\n"

    def stopped_on_a() -> bool:
        rows = json.loads(cli("--home", str(a), "services", "--json").stdout)["services"]
        forever = next(r for r in rows if r["name"] == "yes.forever")
        return bool(forever["calls"] == 1 and forever["in_flight"] == 0)

    poll(stopped_on_a)


def test_http_service(pair: tuple[Path, Path], weather_server: str) -> None:
    a, b = pair
    run_cli("--home", str(a), "serve", "weather", "--http", f"{weather_server}/")
    run_cli("--home", str(a), "serve", "weather.broken", "--http", f"{weather_server}/boom")
    poll(lambda: _found(b, "weather") and _found(b, "weather.broken"))

    got = cli(
        "--home", str(b), "call", "weather", "--json-input", '{"city": "Oslo"}', "--timeout", "5"
    )
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == {"city": "Oslo", "temp_c": 4}

    bad = cli("--home", str(b), "call", "weather", "--json-input", '{"town": "Oslo"}')
    assert bad.returncode == 1 and "422" in bad.stderr and "city missing" in bad.stderr
    down = cli("--home", str(b), "call", "weather.broken", "--input", "x")
    assert down.returncode == 1 and "503" in down.stderr and "backend down" in down.stderr

    remote = cli("--home", str(a), "serve", "elsewhere", "--http", "http://192.0.2.1/")
    assert remote.returncode == 1 and "--allow-remote" in remote.stderr


def test_errors_are_clear_and_the_node_keeps_serving(pair: tuple[Path, Path]) -> None:
    a, b = pair
    run_cli("--home", str(a), "serve", "text.upper", "--exec", "tr a-z A-Z")
    run_cli("--home", str(a), "serve", "fails", "--exec", "sh -c 'echo no disk >&2; exit 3'")
    run_cli("--home", str(a), "serve", "slow", "--exec", "sleep 30")
    run_cli("--home", str(a), "serve", "too.big", "--exec", "head -c 3000000 /dev/zero")
    poll(lambda: all(_found(b, n) for n in ("text.upper", "fails", "slow", "too.big")))

    unknown = cli("--home", str(b), "call", "no.such.service", "--input", "x")
    assert unknown.returncode == 1 and "no provider of 'no.such.service'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    missing = cli("--home", str(b), "find-service", "no.such.service")
    assert missing.returncode == 1 and "no provider" in missing.stderr

    failed = cli("--home", str(b), "call", "fails", "--input", "x")
    assert failed.returncode == 1
    assert "exited with status 3" in failed.stderr and "no disk" in failed.stderr

    late = cli("--home", str(b), "call", "slow", "--input", "x", "--timeout", "1")
    assert late.returncode == 1 and "within" in late.stderr and "Traceback" not in late.stderr

    big = cli("--home", str(b), "call", "too.big")
    assert big.returncode == 1 and "more than" in big.stderr

    bad_name = cli("--home", str(b), "call", "Not A Name")
    assert bad_name.returncode == 1 and "bad service name" in bad_name.stderr
    no_program = cli("--home", str(a), "serve", "typo", "--exec", "no-such-program-p2pnode")
    assert no_program.returncode == 1 and "not found" in no_program.stderr

    as_json = cli("--home", str(b), "call", "fails", "--input", "x", "--json")
    assert as_json.returncode == 1 and "error" in json.loads(as_json.stderr)

    # Still serving, and the failures are counted.
    assert cli("--home", str(b), "call", "text.upper", "--input", "ok").stdout == "OK\n"
    rows = {
        r["name"]: r
        for r in json.loads(cli("--home", str(a), "services", "--json").stdout)["services"]
    }
    assert sum(rows["fails"]["errors"].values()) >= 2
    assert rows["text.upper"]["calls"] == 1


def _api(home: Path, method: str, path: str, body: object = None) -> tuple[int, dict[str, object]]:
    """The control API itself: status and JSON body, errors included."""
    control = json.loads((home / "control.json").read_text())
    token = (home / "api.token").read_text().strip()
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(control["url"] + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_api_statuses_and_codes(pair: tuple[Path, Path]) -> None:
    a, b = pair
    run_cli("--home", str(a), "serve", "slow", "--exec", "sleep 30")
    run_cli("--home", str(a), "serve", "fails", "--exec", "false")
    poll(lambda: _found(b, "slow") and _found(b, "fails"))

    status, body = _api(b, "POST", "/v1/services/call", {"name": "no.such", "input": "x"})
    assert (status, body["code"], body["kind"]) == (404, "no_providers", "NoProviders")
    status, body = _api(b, "POST", "/v1/services/call", {"name": "slow", "timeout": 0.5})
    assert (status, body["code"]) == (504, "deadline_exceeded")
    status, body = _api(b, "POST", "/v1/services/call", {"name": "fails"})
    assert (status, body["code"]) == (502, "handler_error")
    status, body = _api(b, "POST", "/v1/services/call", {"name": "BAD NAME"})
    assert status == 400 and "bad service name" in str(body["error"])
    status, body = _api(b, "POST", "/v1/services/call", {"name": "slow", "input": 5})
    assert status == 400 and "json_input" in str(body["error"])
    status, body = _api(b, "POST", "/v1/services/call", {"name": "slow", "timeout": -1})
    assert status == 400
    status, body = _api(b, "POST", "/v1/services/call_stream", {"name": "no.such"})
    assert (status, body["code"]) == (404, "no_providers")
    status, body = _api(
        a,
        "POST",
        "/v1/services/serve",
        {"name": "x.y", "exec": ["cat"], "http": "http://127.0.0.1:1/"},
    )
    assert status == 400 and "exactly one" in str(body["error"])
    status, body = _api(a, "POST", "/v1/services/unserve", {"name": "never.served"})
    assert (status, body["code"]) == (404, "not_found")
    status, body = _api(b, "GET", "/v1/services/find?name=no.such")
    assert (status, body["code"]) == (404, "no_providers")
    # Binary in, binary out: base64 both ways.
    run_cli("--home", str(a), "serve", "echo", "--exec", "cat")
    poll(lambda: _found(b, "echo"))
    status, body = _api(b, "POST", "/v1/services/call", {"name": "echo", "input_b64": "AP8="})
    assert (status, body["type"], body["reply_b64"]) == (200, "bytes", "AP8=")


def test_served_services_persist_across_restart(tmp_path: Path, nodes: list[RunningNode]) -> None:
    """What `serve` registered is saved in the home (0600) and served again at
    start; `unserve` removes it; a bad saved entry is logged and skipped; serving
    a name twice needs --replace."""
    home = tmp_path / "a"
    a = RunningNode(home)
    nodes.append(a)
    h = ("--home", str(home))
    run_cli(*h, "serve", "text.upper", "--exec", "tr a-z A-Z")
    run_cli(*h, "serve", "text.lower", "--exec", "tr A-Z a-z", "--idempotent")
    run_cli(*h, "serve", "weather", "--http", "http://127.0.0.1:9/", "--timeout", "3")
    run_cli(*h, "serve", "lines", "--exec", "cat", "--stream")
    again = cli(*h, "serve", "text.upper", "--exec", "rev")
    assert again.returncode == 1 and "'text.upper' is already served" in again.stderr
    assert "--replace" in again.stderr and "Traceback" not in again.stderr
    run_cli(*h, "serve", "text.upper", "--exec", "rev", "--replace")
    run_cli(*h, "unserve", "text.lower")
    saved = home / "services.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    names = [s["name"] for s in json.loads(saved.read_text())["services"]]
    assert names == ["text.upper", "weather", "lines"]

    run_cli(*h, "stop")
    assert a.wait() == 0
    # Entries that cannot be served again: reported, skipped, never fatal.
    data = json.loads(saved.read_text())
    data["services"] += [
        {"name": "Bad Name", "exec": ["true"]},
        {"name": "gone.program", "exec": ["/nonexistent/p2pnode-program"]},
        {"name": "no.target"},
        "not an object",
    ]
    saved.write_text(json.dumps(data))

    b = RunningNode(home)
    nodes.append(b)
    rows = {r["name"]: r for r in json.loads(cli(*h, "services", "--json").stdout)["services"]}
    assert set(rows) == {"text.upper", "weather", "lines"}
    assert rows["text.upper"]["adapter"] == "exec rev" and rows["lines"]["kind"] == "stream"
    own = json.loads(run_cli(*h, "id", "--json").stdout)["peer_id"]
    called = cli(*h, "call", "text.upper", "--input", "abc", "--peer", own)
    assert called.returncode == 0 and called.stdout == "cba\n", called.stderr
    # announced again too: a node joining now finds it through the DHT and calls it
    other = RunningNode(tmp_path / "other", "--bootstrap", b.bootstrap)
    nodes.append(other)
    poll(lambda: _found(other.home, "text.upper"))
    assert cli("--home", str(other.home), "call", "text.upper", "--input", "xy").stdout == "yx\n"
    run_cli(*h, "unserve", "weather")
    assert [s["name"] for s in json.loads(saved.read_text())["services"]] == [
        "text.upper",
        "lines",
    ]  # the bad entries are gone with the next save
    run_cli(*h, "stop")
    assert b.wait() == 0
    assert b.proc.stderr is not None
    log = b.proc.stderr.read()
    for bad in ("'Bad Name'", "'gone.program'", "'no.target'", "entry 6 is not an object"):
        assert bad in log, log
    assert "Traceback" not in log
