"""The README's Python API examples, run as written: the first against a real
bootstrap node, the services one (two nodes of its own) alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from p2pnode import Node, UsageError
from tests.cli_helpers import RunningNode, cli_env, run_cli
from tests.helpers import fast_config

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_api_block(heading: str = "## Python API") -> str:
    """The first python block after ``heading``."""
    text = README.read_text()
    section = text[text.index(f"\n{heading}\n") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def test_readme_python_example_finds_the_bootstrap_peer(
    tmp_path: Path, nodes: list[RunningNode]
) -> None:
    boot = RunningNode(tmp_path / "boot")
    nodes.append(boot)
    ident = json.loads(run_cli("--home", str(tmp_path / "boot"), "id", "--json").stdout)
    code = _python_api_block()
    # Only the two settings the README tells the reader to fill in are replaced.
    code, n_boot = re.subn(
        r"^BOOTSTRAP = .*$", f"BOOTSTRAP = ('127.0.0.1', {ident['port']})", code, flags=re.M
    )
    code, n_peer = re.subn(r"^PEER_ID = .*$", f"PEER_ID = {ident['peer_id']!r}", code, flags=re.M)
    assert n_boot == 1 and n_peer == 1, code
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=90,
        env=cli_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == 2, proc.stdout
    # The contact found is the bootstrap node itself, by its text peer id.
    assert f"port={ident['port']}" in out[1] and "Contact(" in out[1], out[1]


def test_readme_services_example_serves_calls_and_streams_between_two_nodes(
    tmp_path: Path,
) -> None:
    code = _python_api_block("### Services")
    assert "serve_stream(" in code and "call_stream(" in code, code
    script = tmp_path / "services_example.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=90,
        env=cli_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    # What the README says it prints, line by line.
    assert proc.stdout.splitlines() == [
        "{'sum': 5}",
        "[0, 1, 2]",
        "[('math.add', 1), ('count', 1)]",
    ], proc.stdout
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr
    printed = "`{'sum': 5}`, `[0, 1, 2]` and `[('math.add', 1), ('count', 1)]`"
    assert printed in README.read_text()


def test_readme_home_table_names_every_file_a_node_writes(
    tmp_path: Path, nodes: list[RunningNode]
) -> None:
    text = README.read_text()
    table = text[text.index("## The home folder") : text.index("## Python API")]
    first = RunningNode(tmp_path / "a")
    nodes.append(first)
    second = RunningNode(tmp_path / "b", "--bootstrap", first.bootstrap)
    nodes.append(second)
    running = {p.name for p in (tmp_path / "b").iterdir()}
    run_cli("--home", str(tmp_path / "b"), "stop")
    assert second.wait() == 0
    seen = running | {p.name for p in (tmp_path / "b").iterdir()}
    assert "exchange.sqlite3" in seen and "node.lock" in seen, seen
    for name in seen:
        # The SQLite companions are named in the table as "-wal" and "-shm".
        base, _, suffix = name.partition("-")
        assert f"`{base}`" in table and (not suffix or f"`-{suffix}`" in table), name


async def test_every_peer_id_call_takes_the_text_form(tmp_path: Path) -> None:
    async with Node(fast_config(tmp_path / "a")) as first:
        seed = (("127.0.0.1", first.port),)
        async with Node(fast_config(tmp_path / "b", bootstrap=seed)) as second:
            await second.wait_joined(timeout=10)
            for peer in (first.peer_id, first.peer_id.upper(), first.node_id):
                for found in (
                    await second.find_peer(peer),
                    await second.discovery.find_peer(peer),
                    (await second.discovery.find_peer_traced(peer))[0],
                ):
                    assert found is not None and found.port == first.port
            own = await second.find_peer(second.peer_id)
            assert own is not None and own.port == second.port
            with pytest.raises(UsageError):
                await second.find_peer("not a peer id!")
