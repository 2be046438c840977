"""`dht put` says exactly where a value was stored: a real node and its control API,
and the real CLI in a subprocess (issue 10: never "stored" when nothing was)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from p2pnode import Node
from p2pnode.cli import _put_text
from p2pnode.dht import DhtConfig
from tests.cli_helpers import cli_env
from tests.helpers import eventually, fast_config


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "p2pnode",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_put_reports_where_the_value_went(homes: Callable[[str], Path]) -> None:
    # A store of one value: the second key has no room (our own values are never
    # evicted), and there is no peer to take it.
    config = fast_config(homes("alone"))
    config = replace(config, dht=replace(config.dht, max_stored_values=1))
    async with Node(config) as node:
        home = str(node.home)
        code, out, err = await cli(
            "--home", home, "dht", "put", "--plain", "first", "one", "--json"
        )
        assert code == 0, err
        assert json.loads(out) == {
            "key": "first",
            "kind": "plain",
            "stored": True,
            "here": True,
            "remote": 0,
            "asked": 0,
            "unproven": 0,
        }
        code, out, _ = await cli("--home", home, "dht", "put", "--plain", "first", "again")
        assert (code, out.strip()) == (
            0,
            "stored on this node only (no peers)"
            " (plain value: unauthenticated, anyone can overwrite it)",
        )
        code, out, err = await cli("--home", home, "dht", "put", "--plain", "second", "two")
        assert code == 1 and out == ""
        assert "not stored: refused by this node's store, no peers to ask" in err
        assert "stored on" not in err
        assert node.discovery.stats()["value_store.refused.full"] == 1


async def test_put_counts_the_nodes_that_accepted(homes: Callable[[str], Path]) -> None:
    first = Node(fast_config(homes("a")))
    await first.start()
    try:
        second = Node(fast_config(homes("b"), bootstrap=(("127.0.0.1", first.port),)))
        async with second:
            await eventually(lambda: bool(second.discovery.contacts()), what="joined")
            outcome = await second.discovery.put_outcome("shared", "value")
            assert outcome.remote == 1 and outcome.asked == 1 and outcome.here is True
            assert _put_text(outcome.to_json()) == "stored on 1 of 1 nodes and on this node"
    finally:
        await first.stop()


def test_put_texts() -> None:
    def text(here: bool | None, remote: int, asked: int) -> str:
        stored = bool(here) or remote > 0
        return _put_text({"stored": stored, "here": here, "remote": remote, "asked": asked})

    assert text(True, 3, 5) == "stored on 3 of 5 nodes and on this node"
    assert text(None, 3, 20) == "stored on 3 of 20 nodes"
    assert text(False, 2, 20) == "stored on 2 of 20 nodes (refused by this node's store)"
    assert text(True, 0, 4) == "stored on this node only (none of the 4 nodes asked accepted it)"
    assert text(None, 0, 20) == "not stored: refused by all 20 nodes asked"
    assert (
        text(False, 0, 3)
        == "not stored: refused by this node's store, refused by all 3 nodes asked"
    )
    assert DhtConfig().max_stored_values > 1


def test_put_texts_name_the_nodes_that_could_not_prove_their_id() -> None:
    here_only = {"stored": True, "here": True, "remote": 0, "asked": 0, "unproven": 2}
    nowhere = {"stored": False, "here": None, "remote": 0, "asked": 0, "unproven": 3}
    for outcome, count in ((here_only, "2"), (nowhere, "3")):
        text = _put_text(outcome)
        assert "no peers" not in text, text
        assert count in text and re.search("unproven|prove", text), text
