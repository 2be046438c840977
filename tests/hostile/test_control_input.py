"""Hostile bodies posted to a real node's control API over real HTTP, with a valid
token: each gets a JSON 400 (counted), never a 500, and the node keeps answering."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from p2pnode import Node
from p2pnode.control.common import MAX_BODY, MAX_JSON_DEPTH
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.home import ControlInfo, read_control
from tests.helpers import fast_config

pytestmark = pytest.mark.usefixtures("no_errors_logged")

EXCHANGE = ExchangeConfig(fsync=False, stale_check_interval=0, progress_interval=0.0)


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[ControlInfo]:
    async with Node(fast_config(tmp_path / "home", exchange=EXCHANGE)) as node:
        yield read_control(node.home)


async def post(
    info: ControlInfo, path: str, body: bytes, content_type: str = "application/json"
) -> tuple[int, dict[str, str]]:
    headers = {"Authorization": f"Bearer {info.token}", "Content-Type": content_type}
    async with (
        aiohttp.ClientSession() as http,
        http.post(info.url + path, data=body, headers=headers) as r,
    ):
        return r.status, await r.json(content_type=None)


async def refused_count(info: ControlInfo) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {info.token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(info.url + "/metrics", headers=headers) as r,
    ):
        text = await r.text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    family = fams["p2pnode_control_refused_inputs"]
    return {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}


DEEP = b"[" * 32000 + b"]" * 32000  # the reproduction: fits in the body limit


@pytest.mark.parametrize("path", ["/v1/dht/put", "/v1/share", "/v1/unshare", "/v1/get"])
async def test_32000_nested_arrays_give_400_not_500(control: ControlInfo, path: str) -> None:
    assert len(DEEP) <= MAX_BODY
    status, body = await post(control, path, DEEP)
    assert status == 400, body
    assert body["kind"] == "UsageError"
    assert "nested" in body["error"]
    assert (await refused_count(control))["too_deep"] == 1


@pytest.mark.parametrize(
    ("raw", "reason", "words"),
    [
        # Nested objects, and arrays hidden in a string do not count.
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "too_deep", "nested"),
        (b'{"key": "' + b"[" * 200 + b'", "value": 1}', "not_object", "non-empty string"),
        # Python refuses ints over 4300 digits with a ValueError, not a JSONDecodeError.
        (b'{"key": ' + b"9" * 5000 + b"}", "not_json", "not JSON"),
        (b'{"key": "\xff"}', "not_json", "not JSON"),
        (b"[1, 2]", "not_object", "JSON object"),
        (b"", "not_json", "not JSON"),
    ],
)
async def test_other_bad_bodies_give_400(
    control: ControlInfo, raw: bytes, reason: str, words: str
) -> None:
    status, body = await post(control, "/v1/dht/put", raw)
    assert status == 400, body
    assert words in body["error"]
    if reason != "not_object":  # a valid JSON document refused later is not a bad body
        assert (await refused_count(control))[reason] == 1


async def test_too_large_body_gives_400(control: ControlInfo) -> None:
    status, body = await post(control, "/v1/dht/put", b'{"k": "' + b"x" * MAX_BODY + b'"}')
    assert status == 400, body
    assert f"larger than {MAX_BODY} bytes" in body["error"]
    assert (await refused_count(control))["too_large"] == 1


async def test_unknown_charset_gives_400(control: ControlInfo) -> None:
    # aiohttp's request.json() decodes with the header's charset: LookupError, a 500.
    status, body = await post(
        control, "/v1/dht/put", b'{"key": "k"}', "application/json; charset=no-such"
    )
    assert status == 400, body


async def test_depth_at_the_limit_is_parsed(control: ControlInfo) -> None:
    nested = b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1)
    status, body = await post(control, "/v1/dht/put", b'{"key": ' + nested + b"}")
    assert status == 400
    assert "non-empty string" in body["error"]  # got past the parser to the field check


async def test_deep_path_field_gives_400(control: ControlInfo) -> None:
    # Path.mkdir(parents=True) recurses once per missing folder: refuse at the boundary.
    dest = "/tmp" + "/d" * 2000
    rid = "a" * 52
    status, body = await post(control, "/v1/get", f'{{"id": "{rid}", "dest": "{dest}"}}'.encode())
    assert status == 400, body
    assert "deep" in body["error"]


async def test_sharing_a_folder_tree_1100_deep_is_refused_not_a_500(
    control: ControlInfo, tmp_path: Path
) -> None:
    """Whatever the exchange does with a tree deeper than Python recurses, the API
    answers a JSON 400 (a RecursionError in a handler is refused at the boundary)."""
    top = tmp_path / "deep"
    here = top
    for _ in range(1100):
        here.mkdir()
        here = here / "d"
    try:
        status, body = await post(control, "/v1/share", f'{{"path": "{top}"}}'.encode())
        assert status == 400, body
        assert body["kind"] == "UsageError"
        status, _ = await post(control, "/v1/dht/put", b'{"key": "k", "value": "v"}')
        assert status in {200, 504}  # still answering (no peer to store on)
    finally:
        while here != top:  # rmtree recurses once per level
            here = here.parent
            here.rmdir()
