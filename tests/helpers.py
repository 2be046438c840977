"""Helpers for tests: polling with a deadline and fast node configs."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from p2pnode.config import NodeConfig
from p2pnode.dht.config import DhtConfig


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll ``check`` until it is true or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


def fast_config(
    home: Path, bootstrap: tuple[tuple[str, int], ...] = (), **kw: object
) -> NodeConfig:
    """A node config for tests: loopback, any port, short timeouts."""
    settings: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "save_interval": 0.5,
        "bootstrap_max_backoff": 0.5,
        "dht": DhtConfig(rpc_timeout=1.0),
        **kw,
    }
    return NodeConfig(home=home, bootstrap=bootstrap, **settings)  # type: ignore[arg-type]


def can_bind(host: str, kind: socket.SocketKind = socket.SOCK_DGRAM) -> bool:
    """Whether this machine lets a socket bind ``host`` (other 127.x addresses, for
    tests that need attackers with addresses of their own)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True
