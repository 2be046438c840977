"""The node's home folder: what lives there and who may use it.

Files (all written atomically; secrets 0600):
  identity.key   Ed25519 private key (PEM)
  config.toml    optional defaults for `start` (host, port, bootstrap, api_port, log_level)
  contacts.json  routing-table contacts saved at the last run, used to rejoin
  control.json   the running node's control API address and pid (removed at stop)
  api.token      the control API token
  node.lock      held (flock) while a node runs on this home
  exchange.sqlite3 (+ -wal, -shm)  the resource index (p2pnode.exchange.store);
                 downloads in progress sit next to their destination, not here
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pnode.errors import NodeNotRunning, UsageError

CONTACTS_FILE = "contacts.json"
CONTROL_FILE = "control.json"
TOKEN_FILE = "api.token"
LOCK_FILE = "node.lock"
CONFIG_FILE = "config.toml"
MAX_SAVED_CONTACTS = 200


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class HomeLock:
    """An exclusive flock on the home: a second node on the same home fails clearly."""

    def __init__(self, home: Path) -> None:
        self._path = home / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise UsageError(
                f"a node is already running with home {self._path.parent} (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class SavedContact:
    node_id: bytes
    host: str
    port: int


def save_contacts(home: Path, contacts: list[SavedContact]) -> None:
    rows = [
        {"id": c.node_id.hex(), "host": c.host, "port": c.port}
        for c in contacts[:MAX_SAVED_CONTACTS]
    ]
    write_atomic(home / CONTACTS_FILE, json.dumps({"version": 1, "contacts": rows}).encode())


def load_contacts(home: Path) -> list[SavedContact]:
    """Saved contacts; a missing or damaged file gives an empty list (never a crash)."""
    path = home / CONTACTS_FILE
    try:
        data = json.loads(path.read_text())
        rows = data["contacts"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    out: list[SavedContact] = []
    for row in rows[:MAX_SAVED_CONTACTS] if isinstance(rows, list) else []:
        try:
            node_id = bytes.fromhex(row["id"])
            host, port = str(row["host"]), int(row["port"])
        except (KeyError, TypeError, ValueError):
            continue
        if len(node_id) == 20 and 0 < port < 65536:
            out.append(SavedContact(node_id, host, port))
    return out


@dataclass(frozen=True)
class ControlInfo:
    url: str
    token: str
    pid: int


def write_control(home: Path, url: str, token: str) -> None:
    write_atomic(home / TOKEN_FILE, token.encode())
    info = {"url": url, "pid": os.getpid()}
    write_atomic(home / CONTROL_FILE, json.dumps(info).encode())


def clear_control(home: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (home / CONTROL_FILE).unlink()


def read_control(home: Path) -> ControlInfo:
    try:
        info = json.loads((home / CONTROL_FILE).read_text())
        token = (home / TOKEN_FILE).read_text().strip()
        return ControlInfo(url=str(info["url"]), token=token, pid=int(info["pid"]))
    except FileNotFoundError:
        raise NodeNotRunning(f"no node is running for home {home}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NodeNotRunning(f"control file in {home} is unreadable: {exc}") from None


def read_config_file(home: Path) -> dict[str, Any]:
    """Defaults for `start` from <home>/config.toml; absent file gives {}."""
    import tomllib  # only `start` reads it: other commands skip the import

    path = home / CONFIG_FILE
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: {exc}") from None
