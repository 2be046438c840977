"""The status page end to end, in headless Chromium (Debian's, driven by Playwright):
log in with a one-time link, start a download from the page, watch its progress
bar move and complete; the API token never reaches the browser. The screenshot
goes to the test's tmp folder, or to docs/status-page.png (shown in the README)
with P2PNODE_UPDATE_SCREENSHOT=1; the figures are printed."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from p2pnode import Node
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.server import PieceServer
from p2pnode.home import read_control
from tests.helpers import eventually, fast_config

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "status-page.png"
SIZE = 8 * 1024 * 1024  # 32 pieces of 256 KiB
PIECE_DELAY = 0.15  # seconds per piece served: the download lasts ~5 s
# One request at a time, so the progress bar has time to be seen moving.
EXCHANGE = ExchangeConfig(
    fsync=False, stale_check_interval=0, requests_per_peer=1, progress_interval=0.1
)

try:
    from playwright.async_api import async_playwright
except ImportError:  # pragma: no cover - depends on the machine
    async_playwright = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.skipif(async_playwright is None, reason="playwright is not installed"),
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"no browser: {CHROMIUM} missing (apt-get install chromium)"
    ),
]


async def _login_link(node: Node) -> tuple[str, str]:
    info = read_control(node.home)
    auth = {"Authorization": f"Bearer {info.token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(info.url + "/v1/ui/login-link", headers=auth) as r,
    ):
        assert r.status == 200, await r.text()
        return (await r.json())["url"], info.token


async def test_status_page_logs_in_once_and_shows_a_download_to_completion(
    homes: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve = PieceServer._get_piece

    async def slow_piece(self: PieceServer, remote: bytes, msg: Any) -> Any:
        await asyncio.sleep(PIECE_DELAY)
        return await serve(self, remote, msg)

    monkeypatch.setattr(PieceServer, "_get_piece", slow_piece)
    data = os.urandom(SIZE)
    blob = tmp_path / "files" / "blob.bin"
    blob.parent.mkdir()
    blob.write_bytes(data)

    seeder = Node(fast_config(homes("seeder"), exchange=EXCHANGE))
    await seeder.start()
    getter = Node(fast_config(homes("getter"), (("127.0.0.1", seeder.port),), exchange=EXCHANGE))
    try:
        await getter.start()
        await getter.wait_joined(timeout=10)
        shared = await seeder.exchange.share(blob)
        await eventually(lambda: getter.exchange.providers(shared.resource_id), what="provider")
        link, token = await _login_link(getter)
        assert token not in link

        async with async_playwright() as pw:  # type: ignore[misc]
            browser = await pw.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
            )
            try:
                figures = await _drive(browser, link, token, shared.id, tmp_path)
            finally:
                await browser.close()
        copy = getter.home / "downloads" / "copy.bin"
        assert copy.read_bytes() == data
    finally:
        await getter.stop()
        await seeder.stop()
    print(
        "\nstatus page: DOMContentLoaded {dcl:.0f} ms, first SSE update {first:.0f} ms after "
        "navigation; {rate:.2f} updates/s during a {secs:.1f} s download "
        "({moves} distinct progress values seen)".format(**figures)
    )


async def _drive(browser: Any, link: str, token: str, rid: str, shots: Path) -> dict[str, float]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    urls: list[str] = []
    page.on("request", lambda req: urls.append(req.url))

    response = await page.goto(link)
    assert response is not None and response.ok
    assert page.url.endswith("/ui/"), page.url
    await page.wait_for_function("window.p2pnodeUpdates >= 1", timeout=10_000)
    timing = await page.evaluate(
        """() => {
            const nav = performance.getEntriesByType("navigation")[0];
            return {dcl: nav.domContentLoadedEventEnd,
                    first: performance.getEntriesByName("first-update")[0].startTime};
        }"""
    )

    # Start the download from the page's form, then watch the bar.
    await page.fill("#get-id", rid)
    await page.fill("#get-name", "copy.bin")
    await page.click("#get-form button")
    await page.wait_for_selector("#get-result:has-text('started')", timeout=5_000)
    bar = page.locator(f"#downloads progress[data-id='{rid}']")
    started = time.monotonic()
    updates_before = await page.evaluate("window.p2pnodeUpdates")
    seen: list[float] = []
    while True:
        if await bar.count():
            value, maximum = await bar.evaluate("b => [b.value, b.max]")
            fraction = value / maximum
            if not seen or seen[-1] != fraction:
                seen.append(fraction)
            if fraction >= 1.0:
                break
        assert time.monotonic() - started < 60, f"the bar did not complete: {seen}"
        await asyncio.sleep(0.05)
    secs = time.monotonic() - started
    updates = await page.evaluate("window.p2pnodeUpdates") - updates_before
    assert any(0 < f < 1 for f in seen), f"the bar never showed partial progress: {seen}"
    assert seen == sorted(seen), f"the bar went backwards: {seen}"
    await page.wait_for_selector("#downloads td:has-text('done')", timeout=10_000)
    assert "100%" in await page.inner_text("#downloads")

    SCREENSHOT.parent.mkdir(exist_ok=True)
    shot = SCREENSHOT if os.environ.get("P2PNODE_UPDATE_SCREENSHOT") else shots / "page.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0

    # The link is one use; the token is nowhere the browser could see or keep.
    second = await (await context.new_page()).goto(link)
    assert second is not None and second.status == 403
    assert all(token not in u for u in urls), urls
    assert token not in await page.content()
    cookies = await context.cookies()
    assert cookies and all(token not in c["value"] for c in cookies)
    assert all(c["httpOnly"] and c["sameSite"] == "Strict" for c in cookies), cookies
    await context.close()
    return {
        "dcl": timing["dcl"],
        "first": timing["first"],
        "rate": updates / secs,
        "secs": secs,
        "moves": len(seen),
    }
