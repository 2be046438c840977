"""Running `p2pnode` as a user does: real subprocesses and CLI commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CLI = [sys.executable, "-m", "p2pnode"]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=cli_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"p2pnode {' '.join(args)} failed: {proc.stderr}")
    return proc


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("P2PNODE_HOME", None)
    return env


class RunningNode:
    def __init__(self, home: Path, *extra: str) -> None:
        self.home = home
        self.proc = subprocess.Popen(
            [*CLI, "start", "--home", str(home), "--host", "127.0.0.1", "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        self.banner: list[str] = []
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        for line in self.proc.stdout:
            self.banner.append(line.rstrip())
            if line.strip() == "ready" or time.monotonic() > deadline:
                break
        if not self.banner or self.banner[-1] != "ready":
            self.proc.kill()
            raise AssertionError(f"node did not start: {self.banner} {self.proc.stderr.read()}")  # type: ignore[union-attr]
        match = re.search(r"--bootstrap (\S+)", "\n".join(self.banner))
        assert match, self.banner
        self.bootstrap = match.group(1)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def poll(fn: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)
