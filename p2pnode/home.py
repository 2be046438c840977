"""The node's home folder: what lives there and who may use it.

Only its owner: the home is 0700 and every file in it 0600, whatever the umask
(:func:`secure_home`, at start, before anything else is written). A home found
with looser modes is tightened, with a log line: the folder, the node's own files
and its downloads folder; anything else a user keeps there is left as it is,
behind the 0700 folder.

Files (written atomically):
  identity.key   Ed25519 private key (PEM)
  config.toml    optional defaults for `start` (host, port, bootstrap, api_port, log_level)
  contacts.json  routing-table contacts saved at the last run, used to rejoin
  services.json  the services `serve` registered (program or HTTP adapters), served
                 again at start
  control.json   the running node's control API address and pid (removed at stop)
  api.token      the control API token
  node.lock      held (flock) while a node runs on this home
  exchange.sqlite3 (+ -wal, -shm)  the resource index (p2pnode.exchange.store);
                 downloads in progress sit next to their destination, not here
  downloads/     where the status page saves downloads
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pnode.errors import NodeNotRunning, UsageError

KEY_FILE = "identity.key"
CONTACTS_FILE = "contacts.json"
CONTROL_FILE = "control.json"
TOKEN_FILE = "api.token"
API_SOCKET = "api.sock"
LOCK_FILE = "node.lock"
CONFIG_FILE = "config.toml"
SERVICES_FILE = "services.json"
MAX_SAVED_CONTACTS = 200
MAX_SAVED_SERVICES = 1024
# p2pnode.exchange.store.DB_NAME (not imported: the CLI client imports this module).
# Created 0600 here before SQLite opens it: SQLite gives its -wal and -shm files the
# mode of the database file, but creates that one 0644 minus the umask.
INDEX_FILE = "exchange.sqlite3"
# p2pnode.control.ui.DOWNLOADS_DIR: where the status page saves downloads.
DOWNLOADS_DIR = "downloads"
HOME_MODE = 0o700
FILE_MODE = 0o600
# What an older home gets tightened: the node's own files and folders. Anything else
# a user keeps in the home is left as it is (the 0700 home keeps others out).
OWN_NAMES = frozenset(
    {
        KEY_FILE,
        CONTACTS_FILE,
        CONTROL_FILE,
        TOKEN_FILE,
        LOCK_FILE,
        CONFIG_FILE,
        SERVICES_FILE,
        DOWNLOADS_DIR,
    }
    | {INDEX_FILE + suffix for suffix in ("", "-wal", "-shm", "-journal")}
)
# Entries looked at in the downloads folder when tightening it.
MAX_TIGHTEN = 10_000

log = logging.getLogger(__name__)


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents, without recursion: a path can have
    thousands of parts) and make ``path`` itself 0700 whatever the umask."""
    missing: list[Path] = []
    here = path
    while not here.is_dir() and here != here.parent:
        missing.append(here)
        here = here.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=HOME_MODE)
        except FileExistsError:
            pass  # made meanwhile by someone else: checked below
        except OSError as exc:
            raise UsageError(f"cannot create folder {folder}: {exc.strerror}") from None
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder")
    os.chmod(path, HOME_MODE)


def secure_home(home: Path) -> None:
    """Make the home private: the folder 0700, the SQLite index created 0600, and
    group/other bits taken off the node's files already there (logged)."""
    try:
        loose = stat.S_IMODE(home.stat().st_mode) & 0o077 != 0
    except FileNotFoundError:
        loose = False
    make_private_dir(home)
    # O_NOFOLLOW: never create or open through a link planted in an old home.
    fd = os.open(home / INDEX_FILE, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    os.close(fd)
    # After the chmod above no one else can reach inside, so no entry can be
    # swapped for a link while we look.
    tightened = (["."] if loose else []) + _tighten(home)
    if tightened:
        shown = ", ".join(tightened[:8]) + (", ..." if len(tightened) > 8 else "")
        log.warning(
            "home %s: others could read %d entries; made them owner-only: %s",
            home,
            len(tightened),
            shown,
        )


def _is_own(name: str) -> bool:
    # write_atomic's temporary files: .<name>.<pid>.tmp
    return name in OWN_NAMES or (name.startswith(".") and name.endswith(".tmp"))


def _tighten(home: Path) -> list[str]:
    """Take group/other bits off the node's entries in ``home`` and everything in its
    downloads folder (owner bits kept, links skipped, at most MAX_TIGHTEN entries,
    no recursion). Returns their paths relative to the home."""
    tightened: list[str] = []
    pending = [home]
    seen = 0
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if folder == home and not _is_own(entry.name):
                    continue
                seen += 1
                if seen > MAX_TIGHTEN:
                    log.warning("home %s: stopped tightening after %d entries", home, MAX_TIGHTEN)
                    return tightened
                if entry.is_symlink():
                    continue
                mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                if mode & 0o077:
                    os.chmod(entry.path, mode & ~0o077)
                    tightened.append(os.path.relpath(entry.path, home))
    return tightened


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
        # The first thing a node does with its home: make it private first.
        secure_home(self._path.parent)
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
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
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


def save_services(home: Path, specs: list[dict[str, Any]]) -> None:
    """The services to serve again at start (each the control API's serve body)."""
    data = {"version": 1, "services": specs[:MAX_SAVED_SERVICES]}
    write_atomic(home / SERVICES_FILE, json.dumps(data, indent=1).encode())


def load_services(home: Path) -> list[dict[str, Any]]:
    """The saved services, as saved; each is checked when served again. A missing
    file gives none; an unreadable one gives none and a warning (never a crash)."""
    path = home / SERVICES_FILE
    try:
        data = json.loads(path.read_bytes())
        rows = data["services"]
        if not isinstance(rows, list):
            raise TypeError("'services' is not a list")
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        log.warning("%s is unreadable (%s): no saved service is served", path, exc)
        return []
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows[:MAX_SAVED_SERVICES]):
        if isinstance(row, dict):
            out.append(row)
        else:
            log.warning("%s: entry %d is not an object: skipped", path, i)
    return out


@dataclass(frozen=True)
class ControlInfo:
    url: str
    token: str
    pid: int
    # the same API on a Unix socket (reachable across network namespaces)
    socket: str | None = None


def write_control(home: Path, url: str, token: str, socket: Path | None = None) -> None:
    write_atomic(home / TOKEN_FILE, token.encode())
    info: dict[str, object] = {"url": url, "pid": os.getpid()}
    if socket is not None:
        info["socket"] = str(socket)
    write_atomic(home / CONTROL_FILE, json.dumps(info).encode())


def clear_control(home: Path) -> None:
    for name in (CONTROL_FILE, API_SOCKET):
        with contextlib.suppress(FileNotFoundError):
            (home / name).unlink()


def read_control(home: Path) -> ControlInfo:
    try:
        info = json.loads((home / CONTROL_FILE).read_text())
        token = (home / TOKEN_FILE).read_text().strip()
        socket = info.get("socket")
        return ControlInfo(
            url=str(info["url"]),
            token=token,
            pid=int(info["pid"]),
            socket=socket if isinstance(socket, str) else None,
        )
    except FileNotFoundError:
        raise NodeNotRunning(f"no node is running for home {home}") from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
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
    except RecursionError:  # tomllib recurses once per nested array or table
        raise UsageError(f"{path}: nested too deeply") from None
