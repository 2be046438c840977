"""The CLI as a user runs it: `p2pnode start` as real subprocesses, driven by CLI commands."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.cli_helpers import CLI, RunningNode, cli_env, poll, run_cli


def test_start_join_inspect_dht_and_stop(tmp_path: Path, nodes: list[RunningNode]) -> None:
    first = RunningNode(tmp_path / "n1")
    nodes.append(first)
    banner = "\n".join(first.banner)
    assert "peer id:" in banner and "control:" in banner and "listening:" in banner
    second = RunningNode(
        tmp_path / "n2", "--bootstrap", first.bootstrap.replace("127.0.0.1", "localhost")
    )
    nodes.append(second)

    ident = json.loads(run_cli("--home", str(tmp_path / "n1"), "id", "--json").stdout)
    assert ident["peer_id"] in banner
    # Global options after the command name work too.
    human = run_cli("id", "--home", str(tmp_path / "n1")).stdout
    assert ident["peer_id"] in human and "version" in human

    def second_sees_first() -> bool:
        out = run_cli("--home", str(tmp_path / "n2"), "peers", "--json").stdout
        return any(p["peer_id"] == ident["peer_id"] for p in json.loads(out)["peers"])

    poll(second_sees_first)
    table = run_cli("--home", str(tmp_path / "n2"), "peers").stdout
    assert ident["peer_id"] in table and "LAST SEEN" in table

    status = json.loads(run_cli("--home", str(tmp_path / "n2"), "status", "--json").stdout)
    assert status["routing_table_size"] >= 1 and status["uptime"] >= 0
    assert "routing table" in run_cli("--home", str(tmp_path / "n2"), "status").stdout

    # A signed record: put prints its address, get takes exactly that text.
    put = run_cli("--home", str(tmp_path / "n1"), "dht", "put", "greeting", "hello p2p")
    address = f"{ident['peer_id']}/greeting"
    assert put.stdout.splitlines()[0] == address
    got = run_cli("--home", str(tmp_path / "n2"), "dht", "get", address).stdout
    assert got.strip() == "hello p2p"
    as_json = run_cli("--home", str(tmp_path / "n1"), "dht", "put", "greeting", "v2", "--json")
    assert json.loads(as_json.stdout)["address"] == address
    got = run_cli("--home", str(tmp_path / "n2"), "dht", "get", address, "--json").stdout
    assert json.loads(got)["value"] == "v2"
    imm = run_cli("--home", str(tmp_path / "n1"), "dht", "put", "--immutable", "fixed", "--json")
    imm_address = json.loads(imm.stdout)["address"]
    assert imm_address.startswith("imm:")
    got = run_cli("--home", str(tmp_path / "n2"), "dht", "get", imm_address).stdout
    assert got.strip() == "fixed"
    missing = run_cli(
        "--home", str(tmp_path / "n2"), "dht", "get", f"{ident['peer_id']}/nope", check=False
    )
    assert missing.returncode == 1 and "no valid signed record" in missing.stderr
    # A plain name is not an address: the error says how to read plain values.
    plain_name = run_cli("--home", str(tmp_path / "n2"), "dht", "get", "greeting", check=False)
    assert plain_name.returncode != 0 and "--plain" in plain_name.stderr
    plain = run_cli("--home", str(tmp_path / "n1"), "dht", "put", "--plain", "legacy", "x")
    assert "unauthenticated" in plain.stdout
    got = run_cli("--home", str(tmp_path / "n2"), "dht", "get", "--plain", "legacy").stdout
    assert got.strip() == "x"

    found = run_cli("--home", str(tmp_path / "n2"), "dht", "find-peer", ident["peer_id"], "--json")
    assert json.loads(found.stdout)["port"] == ident["port"]
    unknown = "a" * 32
    lost = run_cli("--home", str(tmp_path / "n2"), "dht", "find-peer", unknown, check=False)
    assert lost.returncode == 1 and "not found" in lost.stderr
    bad = run_cli("--home", str(tmp_path / "n2"), "dht", "find-peer", "xyz!", check=False)
    assert bad.returncode == 1 and "peer id" in bad.stderr

    # A second start on a running home fails clearly.
    dup = subprocess.run(
        [*CLI, "start", "--home", str(tmp_path / "n1"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        env=cli_env(),
    )
    assert dup.returncode == 1 and "already running" in dup.stderr

    run_cli("--home", str(tmp_path / "n2"), "stop")
    assert second.wait() == 0
    run_cli("--home", str(tmp_path / "n1"), "stop")
    assert first.wait() == 0
    assert (tmp_path / "n2" / "contacts.json").exists()


def test_sigterm_stops_cleanly(tmp_path: Path, nodes: list[RunningNode]) -> None:
    node = RunningNode(tmp_path / "n")
    nodes.append(node)
    node.proc.terminate()
    assert node.wait() == 0
    assert not (tmp_path / "n" / "control.json").exists()


def test_commands_without_a_node_fail_clearly(tmp_path: Path) -> None:
    proc = run_cli("--home", str(tmp_path / "empty"), "status", check=False)
    assert proc.returncode == 1
    assert "no node is running" in proc.stderr


def test_bad_bootstrap_argument_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*CLI, "start", "--home", str(tmp_path / "x"), "--bootstrap", "nonsense"],
        capture_output=True,
        text=True,
        timeout=30,
        env=cli_env(),
    )
    assert proc.returncode == 1 and "host:port" in proc.stderr


def test_help_loads_neither_the_node_nor_the_http_client() -> None:
    """Every command is a process: `--help` and the client commands must not pay for
    asyncio, aiohttp or the network stack (measured: ~330 modules before, ~120 after)."""
    code = (
        "import sys, p2pnode.cli; "
        "heavy = ('asyncio', 'aiohttp', 'kademlia', 'cryptography', 'urllib.request', "
        "'p2pnode.node', 'p2pnode.control.server', 'p2pnode.dht.discovery'); "
        "print(' '.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run(
        [*CLI[:1], "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""
    shown = subprocess.run(
        [*CLI, "--help"], capture_output=True, text=True, timeout=60, env=cli_env()
    )
    assert shown.returncode == 0 and "share" in shown.stdout


def test_bad_port_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_cli("start", "--home", str(tmp_path / "p"), "--port", "70000", check=False)
    assert proc.returncode == 1 and "--port must be 0..65535" in proc.stderr


def test_a_closed_stdout_pipe_exits_quietly(tmp_path: Path, nodes: list[RunningNode]) -> None:
    """`p2pnode status | head -1` with head already gone: no traceback, rc 141
    (128 + SIGPIPE, as `cat` or `ls` killed by SIGPIPE)."""
    node = RunningNode(tmp_path / "n")
    nodes.append(node)
    for command in (["status"], ["ls", "--json"], ["id"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before anything is written
        proc = subprocess.run(
            [*CLI, "--home", str(tmp_path / "n"), *command],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=cli_env(),
        )
        os.close(write_end)
        assert proc.returncode == 141, proc.stderr
        assert proc.stderr == "", proc.stderr


def _json_error(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    body = json.loads(lines[0])
    assert set(body) == {"error", "code"}, body
    return body


def test_json_errors_are_json_on_stderr(tmp_path: Path, nodes: list[RunningNode]) -> None:
    bad_port = run_cli(
        "start", "--home", str(tmp_path / "p"), "--port", "70000", "--json", check=False
    )
    assert bad_port.returncode == 1 and bad_port.stdout == ""
    assert _json_error(bad_port)["code"] == "usage"
    no_node = run_cli("--json", "--home", str(tmp_path / "empty"), "status", check=False)
    assert no_node.returncode == 1 and _json_error(no_node)["code"] == "node_not_running"
    bad_arg = run_cli("--json", "start", "--port", "x", check=False)
    assert bad_arg.returncode == 2 and _json_error(bad_arg)["code"] == "usage"

    node = RunningNode(tmp_path / "n")
    nodes.append(node)
    port = json.loads(run_cli("--home", str(tmp_path / "n"), "id", "--json").stdout)["port"]
    busy = run_cli(
        "start",
        "--json",
        "--home",
        str(tmp_path / "b"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        check=False,
    )
    assert busy.returncode == 1 and _json_error(busy)["code"] == "usage"
    assert "listening on" not in busy.stderr  # no log line before the error (item 7)
    lost = run_cli(
        "--home", str(tmp_path / "n"), "dht", "find-peer", "a" * 32, "--json", check=False
    )
    assert lost.returncode == 1 and _json_error(lost)["code"] == "not_found"


def test_start_json_prints_json_lines(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            *CLI,
            "start",
            "--json",
            "--home",
            str(tmp_path / "j"),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready" and ready["peer_id"] and ready["port"] > 0
        run_cli("--home", str(tmp_path / "j"), "stop")
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert json.loads(out) == {"event": "stopped"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_start_logs_warnings_only_unless_asked(tmp_path: Path) -> None:
    """The banner, then warnings only: no INFO lines (ours or kademlia's) by default;
    --log-level info brings them back."""

    def stderr_of(home: str, *extra: str) -> str:
        node = RunningNode(tmp_path / home, *extra)
        try:
            run_cli("--home", str(tmp_path / home), "stop")
            assert node.wait() == 0
            assert node.proc.stderr is not None
            return node.proc.stderr.read()
        finally:
            node.kill()

    quiet = stderr_of("q")
    assert " INFO " not in quiet, quiet
    loud = stderr_of("l", "--log-level", "info")
    assert " INFO " in loud, loud


def test_find_peer_of_itself_and_help_texts(tmp_path: Path, nodes: list[RunningNode]) -> None:
    node = RunningNode(tmp_path / "n")
    nodes.append(node)
    ident = json.loads(run_cli("--home", str(tmp_path / "n"), "id", "--json").stdout)
    for typed in (ident["peer_id"], ident["peer_id"].upper()):
        own = run_cli("--home", str(tmp_path / "n"), "dht", "find-peer", typed, "--json")
        assert json.loads(own.stdout)["port"] == ident["port"]
    put_help = run_cli("dht", "put", "--help").stdout
    assert "KEY=VALUE" not in put_help and "the text to store" in put_help
    for command in ("get", "unshare", "providers"):
        assert "a resource id" in run_cli(command, "--help").stdout


def test_join_with_shows_an_address_other_machines_can_use(
    tmp_path: Path, nodes: list[RunningNode]
) -> None:
    node = RunningNode(tmp_path / "n", "--host", "0.0.0.0")
    nodes.append(node)
    import psutil

    from p2pnode.node import join_candidates

    here = join_candidates(
        [
            a.address
            for addrs in psutil.net_if_addrs().values()
            for a in addrs
            if ":" not in a.address
        ]
    )
    join = next(line for line in node.banner if "join with:" in line)
    if here:
        assert f"--bootstrap {here[0]}:" in join, join
    else:  # a host with loopback only
        assert "--bootstrap 127.0.0.1:" in join, join
