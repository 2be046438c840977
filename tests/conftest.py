"""Shared fixtures.

Test-suite rules (see DESIGN.md): 127.0.0.1 and port 0 only; no sleeps used as
synchronisation (wait on an event or poll a condition with a deadline); every
test has a time limit (pyproject); real sockets and processes where they can run.

Layout: ``tests/unit`` (pure: no sockets, no processes; seconds in all),
``tests/integration`` (real sockets on 127.0.0.1, real processes) and
``tests/hostile`` (attacks; each fails without its fix). Each test is marked
after its folder, so ``pytest -m unit`` (or ``pytest tests/unit``) runs the
pure suite alone.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2pnode.config import NO_PORT_MAPPING_ENV
from p2pnode.sim.netlab import Lab, missing_tools, missing_upnp
from tests.cli_helpers import RunningNode

SUITES = ("unit", "integration", "hostile")

# Nodes started by tests on 0.0.0.0 in the root namespace must not send SSDP or
# NAT-PMP to this machine's real network: port mapping is off for every node the
# suite starts (subprocesses inherit it) unless a lab test turns it back on.
os.environ.setdefault(NO_PORT_MAPPING_ENV, "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        suite = item.path.parent.name
        if suite in SUITES:
            item.add_marker(getattr(pytest.mark, suite))


@pytest.fixture
def homes(tmp_path: Path) -> Callable[[str], Path]:
    def make(name: str) -> Path:
        return tmp_path / name

    return make


@pytest.fixture
def nodes() -> Iterator[list[RunningNode]]:
    """Node subprocesses a test starts; any still running at the end are killed."""
    started: list[RunningNode] = []
    yield started
    for node in started:
        node.kill()


@pytest.fixture
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test that made anything log an error: a failed background task, a
    handler crash, an asyncio 'exception never retrieved'. Use with
    ``pytestmark = pytest.mark.usefixtures("no_errors_logged")``."""
    caplog.set_level(logging.WARNING)
    yield
    gc.collect()
    bad = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, bad


# Lab tests build namespaces, veths and nftables: root and `ip`/`nft` only.
needs_lab = pytest.mark.skipif(
    bool(missing_tools()), reason=f"network lab unavailable: {', '.join(missing_tools())}"
)


# Port mapping lab tests also need miniupnpd (Debian `miniupnpd`).
needs_upnp = pytest.mark.skipif(
    bool(missing_tools() + missing_upnp()),
    reason=f"UPnP lab unavailable: {', '.join(missing_tools() + missing_upnp())}",
)


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A network-namespace lab (p2pnode/sim/netlab.py), deleted afterwards, also on failure."""
    if missing_tools():
        pytest.skip(f"network lab unavailable: {', '.join(missing_tools())}")
    built = Lab()
    try:
        yield built
    finally:
        built.close()
