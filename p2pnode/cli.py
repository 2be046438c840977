"""The `p2pnode` command line: `start` runs a node; every other command is a
thin client of a running node's control API.

Global options (--home, --json) work before or after the command name.

Start-up time matters (every command is a process): what only `start` needs
(asyncio, the node) and what only clients need (urllib) is imported on use.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from p2pnode._version import __version__
from p2pnode.config import NO_PORT_MAPPING_ENV, NodeConfig, default_home, parse_host_port
from p2pnode.control.api import StreamEvent
from p2pnode.errors import DownloadError, P2PError, UsageError
from p2pnode.exchange.display import peers_shown, phase_line
from p2pnode.home import read_config_file
from p2pnode.nat.relay_core import RelayConfig

if TYPE_CHECKING:
    from p2pnode.control.client import ControlClient

log = logging.getLogger("p2pnode")


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # a P2PError, explained on stderr
    USAGE = 2  # bad arguments (argparse's own exit status)
    INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT
    # The reader of stdout went away (`| head`): 128 + SIGPIPE, the status a shell
    # shows for `cat`, `ls`, ... killed by SIGPIPE, so `set -o pipefail` scripts see
    # the output was cut, as with those tools.
    BROKEN_PIPE = 141


class ErrorCode(StrEnum):
    """The ``code`` of a ``--json`` error on stderr: ``{"error": ..., "code": ...}``.
    Stable: scripts match on these, the message is for people."""

    USAGE = "usage"
    NOT_FOUND = "not_found"
    NODE_NOT_RUNNING = "node_not_running"
    TIMEOUT = "timeout"
    PROTOCOL = "protocol"
    DOWNLOAD = "download"
    STALE = "stale"
    STORAGE = "storage"
    INTERRUPTED = "interrupted"
    # A service call's failure: the service error's own code (p2pnode.errors).
    NO_PROVIDERS = "no_providers"
    PROVIDERS_FAILED = "providers_failed"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    OVERLOADED = "overloaded"
    BAD_REQUEST = "bad_request"
    HANDLER_ERROR = "handler_error"
    TOO_LARGE = "too_large"
    CANCELLED = "cancelled"
    ERROR = "error"


def _error_code(exc: P2PError) -> ErrorCode:
    from p2pnode import errors

    if isinstance(exc, errors.ServiceError) and exc.code in ErrorCode._value2member_map_:
        return ErrorCode(exc.code)
    kinds: tuple[tuple[type[P2PError], ErrorCode], ...] = (
        (errors.UsageError, ErrorCode.USAGE),
        (errors.NotFoundError, ErrorCode.NOT_FOUND),
        (errors.NodeNotRunning, ErrorCode.NODE_NOT_RUNNING),
        (errors.P2PTimeoutError, ErrorCode.TIMEOUT),
        (errors.DownloadError, ErrorCode.DOWNLOAD),
        (errors.StaleError, ErrorCode.STALE),
        (errors.StorageError, ErrorCode.STORAGE),
        (errors.ProtocolError, ErrorCode.PROTOCOL),
    )
    return next((code for cls, code in kinds if isinstance(exc, cls)), ErrorCode.ERROR)


def _report_error(json_mode: bool, message: str, code: ErrorCode) -> None:
    if json_mode:
        print(json.dumps({"error": message, "code": code}), file=sys.stderr)
    else:
        print(f"p2pnode: error: {message}", file=sys.stderr)


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


# ---------------------------------------------------------------------------- parsing


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Subparsers get SUPPRESS defaults so a value given before the command survives.
    default: Any = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--home",
        type=Path,
        default=default,
        help="node home folder (default: $P2PNODE_HOME or a per-user data dir)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print JSON instead of tables",
    )


class _Parser(argparse.ArgumentParser):
    # Set by main() when --json is anywhere on the line: argparse fails before
    # the options are known.
    json_errors = False

    def error(self, message: str) -> Any:
        if _Parser.json_errors:
            body = {"error": f"{self.prog}: {message}", "code": ErrorCode.USAGE}
            self.exit(ExitCode.USAGE, json.dumps(body) + "\n")
        super().error(message)


# Base32 is case-insensitive: any case is accepted, the canonical lower case is shown.
_RID_HELP = "a resource id, as `share` prints it (any letter case)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="p2pnode", description="A peer-to-peer node: Kademlia discovery, verified exchange."
    )
    parser.add_argument("--version", action="version", version=f"p2pnode {__version__}")
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _global_options(p, top=False)
        return p

    start = add("start", "run a node in the foreground until Ctrl-C / SIGTERM")
    start.add_argument(
        "--port",
        type=int,
        default=None,
        help="UDP (DHT) and TCP (peers) port; 0 = any free port (default 0)",
    )
    start.add_argument(
        "--host", default=None, help="interface to listen on (default 0.0.0.0; '::' for IPv6)"
    )
    start.add_argument(
        "--bootstrap",
        action="append",
        default=None,
        metavar="HOST:PORT",
        help="a node to join through (repeatable; host names allowed)",
    )
    start.add_argument(
        "--api-port",
        type=int,
        default=None,
        help="control API port on 127.0.0.1 (default: any free port)",
    )
    start.add_argument(
        "--no-port-mapping",
        action="store_true",
        help="do not map the port on the router (UPnP-IGD, PCP, NAT-PMP); also "
        f"{NO_PORT_MAPPING_ENV}=1 or port_mapping = false in config.toml",
    )
    start.add_argument(
        "--relay-service",
        choices=("auto", "always", "never"),
        default=None,
        help="offer a limited circuit relay to private nodes (auto: when public)",
    )
    start.add_argument(
        "--relay-client",
        choices=("auto", "always", "never"),
        default=None,
        help="reserve slots on relays and announce relay addresses (auto: when private)",
    )
    start.add_argument(
        "--relay",
        action="append",
        default=None,
        metavar="IP:PORT",
        help="a relay to reserve on (repeatable; default: the DHT contacts with the lowest RTT)",
    )
    start.add_argument(
        "--log-level",
        default=None,
        choices=[level.value for level in LogLevel],
        help="stderr log level",
    )

    add("id", "show this node's peer id, addresses and version")
    add("peers", "list the contacts in the routing table")
    add("connections", "list the open peer connections and how each was made")
    status = add("status", "a summary: uptime, peers, reachability, transfers, DHT traffic")
    status.add_argument(
        "-v", "--verbose", action="store_true", help="also every raw counter (as --json has)"
    )
    add("stop", "stop the running node cleanly")

    dht = add("dht", "publish or read a small signed text record in the DHT")
    dht_sub = dht.add_subparsers(dest="dht_command", required=True, metavar="ACTION")
    put = dht_sub.add_parser(
        "put",
        help="publish VALUE as this node's signed record NAME; prints its address",
        description="`dht put NAME VALUE` signs VALUE with this node's key as record NAME "
        "(address <peer id>/NAME; a later put of NAME replaces it everywhere). "
        "`dht put --immutable VALUE` stores VALUE under its hash (address imm:<hex>). "
        "`dht put --plain KEY VALUE` stores an unauthenticated kademlia value "
        "(interop only: anyone can overwrite it).",
    )
    _global_options(put, top=False)
    put.add_argument("name", help="the record's name (or, with --immutable, the value)")
    put.add_argument("value", nargs="?", help="the text to store (quote it if it has spaces)")
    kind = put.add_mutually_exclusive_group()
    kind.add_argument("--immutable", action="store_true", help="store VALUE under its hash")
    kind.add_argument("--plain", action="store_true", help="unauthenticated kademlia value")
    get = dht_sub.add_parser(
        "get", help="read a record by its address (<peer id>/NAME or imm:<hex>)"
    )
    _global_options(get, top=False)
    get.add_argument("key", help="the address `dht put` printed (with --plain: the key)")
    get.add_argument("--plain", action="store_true", help="read an unauthenticated kademlia value")
    find = dht_sub.add_parser("find-peer", help="find a peer's address by its peer id")
    _global_options(find, top=False)
    find.add_argument("peer_id", help="a peer id, as `p2pnode id` prints it")

    share = add("share", "share a file or folder; prints its resource id")
    share.add_argument("path", type=Path, help="the file or folder to share")
    share.add_argument(
        "--follow-links",
        action="store_true",
        help="share what symbolic links inside the folder point to, as regular files and "
        "folders (links out of the folder and cycles are refused); without it, a folder "
        "holding a symbolic link is refused",
    )
    unshare = add("unshare", "stop sharing a resource")
    unshare.add_argument("id", help=_RID_HELP)
    fetch = add("get", "download a resource by id (verified, resumable)")
    fetch.add_argument("id", help=_RID_HELP)
    fetch.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="destination; an existing folder receives the resource under its own name "
        "(default: the current folder)",
    )
    fetch.add_argument("--force", action="store_true", help="replace an existing destination")
    add("ls", "list local resources")
    ui = add("ui", "print a one-time login link to the node's live status page")
    ui.add_argument("--open", action="store_true", help="open the link in a web browser")
    providers = add("providers", "find who provides a resource, through the DHT")
    providers.add_argument("id", help=_RID_HELP)
    _service_commands(add)
    return parser


_NAME_HELP = "a service name: dotted lower-case, e.g. text.upper"


def _service_commands(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    serve = add(
        "serve",
        "serve NAME to peers: a local program (--exec) or a local HTTP service (--http); "
        "saved in the home and served again at start, until unserve",
    )
    serve.add_argument("name", help=_NAME_HELP)
    target = serve.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--exec",
        dest="exec_command",
        metavar="'PROGRAM ARGS'",
        help="run PROGRAM once per call: the request on its stdin, its stdout the reply "
        "(split like a shell would, but run without one)",
    )
    target.add_argument(
        "--http",
        metavar="URL",
        help="POST each request to URL (a JSON request as JSON); 2xx is the reply",
    )
    serve.add_argument(
        "--shell", action="store_true", help="run the --exec text through /bin/sh -c"
    )
    serve.add_argument(
        "--allow-remote",
        action="store_true",
        help="let --http forward to a host other than 127.0.0.1 / ::1 / localhost",
    )
    serve.add_argument(
        "--idempotent",
        action="store_true",
        help="calls may be retried on another provider when one fails",
    )
    serve.add_argument(
        "--replace",
        action="store_true",
        help="replace NAME if this node serves it already (otherwise that is an error)",
    )
    serve.add_argument(
        "--stream",
        action="store_true",
        help="--exec only: each line the program writes is one item of a stream",
    )
    serve.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds a call may run the program / wait for the HTTP service (default 30; "
        "the caller's deadline caps it)",
    )
    serve.add_argument(
        "--max-output",
        type=int,
        default=None,
        metavar="BYTES",
        help="largest reply taken from the program or HTTP service (default 1 MiB)",
    )
    unserve = add("unserve", "stop serving a service")
    unserve.add_argument("name", help=_NAME_HELP)
    add("services", "the services this node serves: calls, errors, p50 latency")
    find = add("find-service", "find providers of a service, through the DHT")
    find.add_argument("name", help=_NAME_HELP)
    call = add("call", "call a service on a provider found through the DHT (or --peer)")
    call.add_argument("name", help=_NAME_HELP)
    given = call.add_mutually_exclusive_group()
    given.add_argument("--input", help="the request, as text (default: stdin when piped)")
    given.add_argument(
        "--json-input", metavar="JSON", help='the request, as a JSON value: \'{"city": "Oslo"}\''
    )
    call.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds before the call fails (default 10; 60 with --stream)",
    )
    call.add_argument("--peer", metavar="ID", help="call this peer only (a peer id)")
    call.add_argument(
        "--stream", action="store_true", help="a stream service: print each item as it comes"
    )


# ---------------------------------------------------------------------------- output


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    secs = max(0.0, time.time() - ts)
    return f"{secs:.0f}s ago" if secs < 120 else f"{secs / 60:.0f}m ago"


def _emit(args: argparse.Namespace, data: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=2) if args.json else human(data))


# ---------------------------------------------------------------------------- commands


def _start_config(args: argparse.Namespace, home: Path) -> tuple[NodeConfig, str]:
    file = read_config_file(home)
    port = args.port if args.port is not None else int(file.get("port", 0))
    host = args.host or str(file.get("host", "0.0.0.0"))
    boots = args.bootstrap if args.bootstrap is not None else list(file.get("bootstrap", []))
    api_port = args.api_port if args.api_port is not None else file.get("api_port")
    # Warnings only by default: the banner says what a user needs.
    level = args.log_level or str(file.get("log_level", LogLevel.WARNING))
    if not 0 <= port < 65536:
        raise UsageError(f"--port must be 0..65535, got {port}")
    port_mapping = (
        not args.no_port_mapping
        and os.environ.get(NO_PORT_MAPPING_ENV, "") in ("", "0")
        and file.get("port_mapping", True) is not False
    )
    relay = RelayConfig(
        service=args.relay_service or str(file.get("relay_service", "auto")),
        client=args.relay_client or str(file.get("relay_client", "auto")),
        relays=tuple(parse_host_port(r) for r in args.relay or file.get("relays", [])),
    )
    config = NodeConfig(
        home=home,
        host=host,
        port=port,
        bootstrap=tuple(parse_host_port(b) for b in boots),
        api_port=int(api_port) if api_port is not None else None,
        port_mapping=port_mapping,
        relay=relay,
    )
    return config, level


def cmd_start(args: argparse.Namespace, home: Path) -> int:
    import asyncio

    config, level = _start_config(args, home)
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_run_node(config, json_mode=args.json))


async def _run_node(config: NodeConfig, *, json_mode: bool = False) -> int:
    import asyncio
    import signal

    from p2pnode.node import Node

    node = Node(config)
    await node.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.request_stop)
    try:
        info = node.describe()
        if json_mode:
            # One JSON object per line: this one when ready, one more when stopped.
            print(json.dumps({"event": "ready", **info}), flush=True)
        else:
            print(f"p2pnode {__version__} started", flush=False)
            print(f"  peer id:   {info['peer_id']}")
            print(f"  listening: {', '.join(info['addresses'])} (UDP DHT + TCP peers)")
            print(f"  control:   {info['api']} (token in {config.home / 'api.token'})")
            print(f"  join with: p2pnode start --home <other home> {info['bootstrap']}")
            others = info["join_addresses"][1:]
            if others:  # other interfaces: which one works depends on where the peer is
                print(f"             (or --bootstrap {' / '.join(others)})")
            print("ready", flush=True)
        _announce_reachability(node, json_mode)
        await node.wait_stop_requested()
    finally:
        log.info("stopping")
        await node.stop()
    print(json.dumps({"event": "stopped"}) if json_mode else "stopped", flush=True)
    return ExitCode.OK


def _announce_reachability(node: Any, json_mode: bool) -> None:
    """After "ready": one line per verdict change, with a reachable join address."""

    def changed(_event: object) -> None:
        status = node.reachability
        if json_mode:
            print(json.dumps({"event": "reachability", **status.to_json()}), flush=True)
            return
        line = f"reachability: {status.overall} (tcp {status.tcp}, udp {status.udp})"
        if status.addresses:
            line += f"; join with: --bootstrap {status.addresses[0]}"
        print(line, flush=True)

    node.on_reachability_change(changed)


def _reachability_lines(d: dict[str, Any]) -> list[str]:
    if "tcp" not in d:
        return [f"reachability: {d.get('reachability', 'unknown')}"]
    lines = [
        f"reachability: {d['reachability']} (tcp {d['tcp']}, udp {d['udp']}; DHT {d['dht_mode']})"
    ]
    addresses = d.get("reachable_addresses") or []
    lines.append(f"reach me at: {', '.join(addresses) if addresses else 'not known yet'}")
    return lines


def cmd_id(args: argparse.Namespace, client: ControlClient) -> int:
    def human(d: dict[str, Any]) -> str:
        return "\n".join(
            [
                f"peer id:   {d['peer_id']}",
                f"node id:   {d['node_id']}",
                f"addresses: {', '.join(d['addresses'])}",
                f"control:   {d['api']}",
                f"join with: {d['bootstrap']}",
                *_reachability_lines(d),
                f"version:   {d['version']}",
            ]
        )

    _emit(args, client.call("GET", "/v1/id"), human)
    return ExitCode.OK


def cmd_peers(args: argparse.Namespace, client: ControlClient) -> int:
    def human(d: dict[str, Any]) -> str:
        rows = [(p["peer_id"], p["address"], _ago(p["last_seen"])) for p in d["peers"]]
        return _table(rows, ("PEER ID", "ADDRESS", "LAST SEEN")) + f"\n{len(rows)} peer(s)"

    _emit(args, client.call("GET", "/v1/peers"), human)
    return ExitCode.OK


def cmd_connections(args: argparse.Namespace, client: ControlClient) -> int:
    def human(d: dict[str, Any]) -> str:
        rows = [(c["peer_id"], c["via"], c["direction"], c["address"]) for c in d["connections"]]
        table = _table(rows, ("PEER ID", "VIA", "DIRECTION", "ADDRESS"))
        return table + f"\n{len(rows)} connection(s)"

    _emit(args, client.call("GET", "/v1/connections"), human)
    return ExitCode.OK


def _duration(secs: float) -> str:
    secs = int(secs)
    days, rest = divmod(secs, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n] or ["0s"]
    return " ".join(shown[:2])


def _sum(counters: dict[str, int], prefix: str) -> int:
    return sum(v for k, v in counters.items() if k.startswith(prefix))


def _status_summary(d: dict[str, Any]) -> list[str]:
    dht, net, ex = d["dht"], d["net"], d["exchange"]
    requests_in = _sum(dht, "rpc_received.")
    reachable = d.get("reachability", "unknown")
    if "tcp" in d:
        reachable += f" (tcp {d['tcp']}, udp {d['udp']}; DHT {d['dht_mode']})"
        addresses = d.get("reachable_addresses") or []
        if addresses:
            reachable += f"; reach me at {', '.join(addresses)}"
    stale = f" ({ex['stale']} stale)" if ex.get("stale") else ""
    return [
        f"peer id:    {d['peer_id']}",
        f"uptime:     {_duration(d['uptime'])}",
        f"joined:     {'yes' if d['joined'] else 'not yet'}",
        f"peers:      {d['routing_table_size']} in the routing table, "
        f"{net.get('peers', 0)} connected",
        f"reachable:  {reachable}",
        f"transfers:  {ex.get('downloads_active', 0)} download(s) active; served "
        f"{ex.get('pieces_served', 0)} piece(s), {_size(ex.get('bytes_served', 0))}",
        f"DHT:        {requests_in} request(s) in, {_sum(dht, 'rpc_sent.')} out, "
        f"{_sum(dht, 'rpc_timeout.')} timed out, {_sum(dht, 'dropped.')} datagram(s) dropped",
        f"resources:  {d['resources']}{stale}",
        *_port_mapping_status(d.get("port_mapping") or {}),
        *_service_status(d.get("services") or []),
        f"memory:     {_size(d['rss_bytes'])} RSS",
    ]


def _port_mapping_status(pm: dict[str, Any]) -> list[str]:
    if not pm.get("enabled"):
        return [f"port map:   off ({pm.get('reason', 'turned off')})"] if pm else []
    rows = pm.get("mappings") or []
    if not rows:
        retry = pm.get("next_attempt_in")
        when = f"; next try in {_duration(retry)}" if retry else ""
        return [f"port map:   none (no router mapped the port yet{when})"]
    lines = []
    for r in rows:
        left = r.get("lease_remaining")
        lease = "permanent" if left is None else f"lease {_duration(left)} left"
        lines.append(
            f"port map:   {r['protocol']} {r['internal_port']} -> {r['external']} "
            f"via {r['method']}, {lease}"
        )
    return lines


def _errors_total(row: dict[str, Any]) -> int:
    errors = row.get("errors") or {}
    return sum(int(v) for v in errors.values()) if isinstance(errors, dict) else 0


def _p50(row: dict[str, Any]) -> str:
    p50 = row.get("p50_ms")
    return "-" if p50 is None else f"{float(p50):.1f} ms"


def _service_status(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["services:   none served"]
    lines = [f"services:   {len(rows)} served"]
    for r in rows:
        lines.append(
            f"  {r['name']}: {r.get('calls', 0)} call(s), {_errors_total(r)} error(s), "
            f"p50 {_p50(r)}, {r.get('in_flight', 0)} in flight"
        )
    return lines


def cmd_status(args: argparse.Namespace, client: ControlClient) -> int:
    def human(d: dict[str, Any]) -> str:
        lines = _status_summary(d)
        if not args.verbose:
            return "\n".join([*lines, "(every counter: --verbose or --json)"])
        sections = (("dht", "DHT"), ("net", "peer connection"), ("exchange", "exchange"))
        for key, title in sections:
            lines.append(f"{title} counters:")
            lines += [f"  {k}: {v}" for k, v in sorted(d[key].items())]
        return "\n".join(lines)

    _emit(args, client.call("GET", "/v1/status"), human)
    return ExitCode.OK


def cmd_stop(args: argparse.Namespace, client: ControlClient, home: Path) -> int:
    pid = client.call("POST", "/v1/stop", {})
    # Wait for the node to let go of its home so a following `start` works at once.
    deadline = time.monotonic() + 30
    while (home / "control.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    _emit(args, pid, lambda _: "stopped")
    return ExitCode.OK


def cmd_ui(args: argparse.Namespace, client: ControlClient) -> int:
    # A one-time link (60 s, one use): the API token itself never goes to the browser.
    link = client.call("POST", "/v1/ui/login-link", {})
    _emit(args, link, lambda d: f"{d['url']}\n(one use, valid {d['expires_in']:.0f} s)")
    if args.open:
        import webbrowser

        webbrowser.open(link["url"])
    return ExitCode.OK


def _put_text(d: dict[str, Any]) -> str:
    """Where a put landed, exactly (``here`` None: this node is not among the closest),
    after the record's address when it has one."""
    here, remote, asked = d.get("here"), int(d.get("remote", 0)), int(d.get("asked", 0))
    unproven = int(d.get("unproven", 0))
    # Closest nodes that could not prove their id (stock kademlia nodes) are not asked.
    skipped = f"{unproven} closest node(s) not asked: they could not prove their id"
    if not d["stored"]:
        why = ["refused by this node's store"] if here is False else []
        if asked:
            why.append(f"refused by all {asked} nodes asked")
        elif not unproven:
            why.append("no peers to ask")
        if unproven:
            why.append(skipped)
        return "not stored: " + ", ".join(why)
    if remote == 0:
        if asked:
            text = f"stored on this node only (none of the {asked} nodes asked accepted it)"
        elif unproven:
            text = f"stored on this node only ({skipped})"
        else:
            text = "stored on this node only (no peers)"
    else:
        text = f"stored on {remote} of {asked} nodes"
        if here is True:
            text += " and on this node"
        elif here is False:
            text += " (refused by this node's store)"
    if d.get("kind") == "plain":
        text += " (plain value: unauthenticated, anyone can overwrite it)"
    if d.get("address"):
        text = f"{d['address']}\n{text}"
    return text


def cmd_dht(args: argparse.Namespace, client: ControlClient) -> int:
    if args.dht_command == "put":
        if args.immutable:
            if args.value is not None:
                raise UsageError("`dht put --immutable VALUE` takes the value only")
            body = {"kind": "immutable", "value": args.name}
        else:
            if args.value is None:
                raise UsageError("`dht put NAME VALUE` needs a value")
            body = {"kind": "plain" if args.plain else "mutable", "key": args.name}
            body["value"] = args.value
        res = client.call("POST", "/v1/dht/put", body)
        if not res["stored"]:
            raise P2PError(_put_text(res))  # exit 1: nothing holds the value
        _emit(args, res, _put_text)
    elif args.dht_command == "find-peer":
        me = client.call("GET", "/v1/id")
        if args.peer_id.strip().lower().rstrip("=") == me["peer_id"]:
            # The DHT never lists a node in its own table: answer from here.
            host, _, port = me["addresses"][0].rpartition(":")
            res = {"peer_id": me["peer_id"], "host": host.strip("[]"), "port": int(port)}
        else:
            res = client.call("GET", f"/v1/dht/find_peer?id={quote(args.peer_id)}")
        _emit(args, res, _peer_line)
    else:
        plain = "&plain=1" if args.plain else ""
        res = client.call("GET", f"/v1/dht/get?key={quote(args.key)}{plain}")
        _emit(args, res, lambda d: str(d["value"]))
    return ExitCode.OK


def _peer_line(d: dict[str, Any]) -> str:
    relays = "".join(f"  via relay {_addr(r['host'], r['port'])}" for r in d.get("relays", []))
    return f"{d['peer_id']}  {_addr(d['host'], d['port'])}{relays}"


def _shown_state(r: dict[str, Any]) -> str:
    # "shared" alone would hide that it is no longer served, and why.
    if r.get("stale"):
        return "stale"
    if r["state"] == "shared" and not r["served"]:
        return "unshared"
    return str(r["state"])


def _resource_rows(resources: list[dict[str, Any]]) -> str:
    rows = [
        (r["id"], r["name"], _size(r["size"]), _shown_state(r), "yes" if r["served"] else "no")
        for r in resources
    ]
    notes = [
        f"{r['id']}: not served: {r['stale']} (share it again to serve the new content)"
        for r in resources
        if r.get("stale")
    ]
    return "\n".join([_table(rows, ("ID", "NAME", "SIZE", "STATE", "SERVED")), *notes])


def cmd_share(args: argparse.Namespace, client: ControlClient) -> int:
    path = args.path.expanduser().resolve()
    if not path.exists():
        raise UsageError(f"no such file or folder: {args.path}")
    body = {"path": str(path), "follow_links": args.follow_links}
    res = client.call("POST", "/v1/share", body)
    _emit(args, res, lambda d: d["id"])
    if not args.json and res.get("links"):  # the id alone on stdout; the policy on stderr
        print(f"symbolic links: {res['links']}", file=sys.stderr)
    return ExitCode.OK


def cmd_unshare(args: argparse.Namespace, client: ControlClient) -> int:
    res = client.call("POST", "/v1/unshare", {"id": args.id})
    _emit(args, res, lambda d: f"unshared {d['id']}")
    return ExitCode.OK


def cmd_ls(args: argparse.Namespace, client: ControlClient) -> int:
    _emit(args, client.call("GET", "/v1/ls"), lambda d: _resource_rows(d["resources"]))
    return ExitCode.OK


def cmd_providers(args: argparse.Namespace, client: ControlClient) -> int:
    def human(d: dict[str, Any]) -> str:
        rows = [(p["peer_id"], _addr(p["host"], p["port"])) for p in d["providers"]]
        return _table(rows, ("PEER ID", "ADDRESS")) + f"\n{len(rows)} provider(s)"

    _emit(args, client.call("GET", f"/v1/providers/{args.id}"), human)
    return ExitCode.OK


# ---------------------------------------------------------------------------- services


def cmd_serve(args: argparse.Namespace, client: ControlClient) -> int:
    body: dict[str, Any] = {"name": args.name, "idempotent": args.idempotent}
    if args.replace:
        body["replace"] = True
    if args.timeout is not None:
        body["timeout"] = args.timeout
    if args.max_output is not None:
        body["max_output"] = args.max_output
    if args.http is not None:
        if args.shell or args.stream:
            raise UsageError("--shell and --stream go with --exec, not --http")
        body["http"] = args.http
        body["allow_remote"] = args.allow_remote
    else:
        if args.allow_remote:
            raise UsageError("--allow-remote goes with --http")
        if args.shell:
            body["command"] = args.exec_command
        else:
            try:
                body["exec"] = shlex.split(args.exec_command)
            except ValueError as exc:
                raise UsageError(f"--exec: {exc}") from None
            if not body["exec"]:
                raise UsageError("--exec needs a program")
        body["stream"] = args.stream
    res = client.call("POST", "/v1/services/serve", body)
    _emit(args, res, lambda d: f"serving {d['name']} ({d['kind']}): {d['adapter']}")
    return ExitCode.OK


def cmd_unserve(args: argparse.Namespace, client: ControlClient) -> int:
    res = client.call("POST", "/v1/services/unserve", {"name": args.name})
    _emit(args, res, lambda d: f"stopped serving {d['name']}")
    return ExitCode.OK


def _services_table(d: dict[str, Any]) -> str:
    rows = []
    for r in d["services"]:
        errors = r.get("errors") or {}
        detail = ", ".join(f"{k} {v}" for k, v in sorted(errors.items()))
        shown = f"{_errors_total(r)}" + (f" ({detail})" if detail else "")
        rows.append(
            (
                r["name"],
                r["kind"],
                r.get("calls", 0),
                shown,
                _p50(r),
                r.get("in_flight", 0),
                r.get("adapter", "-"),
            )
        )
    headers = ("NAME", "KIND", "CALLS", "ERRORS", "P50", "IN FLIGHT", "RUNS")
    return _table(rows, headers) + f"\n{len(rows)} service(s)"


def cmd_services(args: argparse.Namespace, client: ControlClient) -> int:
    _emit(args, client.call("GET", "/v1/services"), _services_table)
    return ExitCode.OK


def cmd_find_service(args: argparse.Namespace, client: ControlClient) -> int:
    def human(d: dict[str, Any]) -> str:
        rows = [(p["peer_id"], _addr(p["host"], p["port"])) for p in d["providers"]]
        return _table(rows, ("PEER ID", "ADDRESS")) + f"\n{len(rows)} provider(s)"

    res = client.call("GET", f"/v1/services/find?name={quote(args.name)}")
    _emit(args, res, human)
    return ExitCode.OK


MAX_CALL_INPUT = 1024 * 1024


def _call_input(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields: --input text, --json-input JSON, else stdin when piped
    (text if it is UTF-8, else bytes), else an empty text."""
    import base64

    if args.json_input is not None:
        try:
            return {"json_input": json.loads(args.json_input)}
        except ValueError as exc:
            raise UsageError(f"--json-input is not JSON: {exc}") from None
    if args.input is not None:
        return {"input": args.input}
    if sys.stdin is None or sys.stdin.isatty():
        return {"input": ""}
    data = sys.stdin.buffer.read(MAX_CALL_INPUT + 1)
    if len(data) > MAX_CALL_INPUT:
        raise UsageError(f"input on stdin is larger than {MAX_CALL_INPUT} bytes")
    try:
        return {"input": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"input_b64": base64.b64encode(data).decode()}


def _write_reply(d: dict[str, Any], *, item: bool = False) -> None:
    """A reply as a user wants it: text as is, JSON indented (an item: one line),
    bytes raw. A text reply or item gets a final newline if it has none."""
    import base64

    if d.get("type") == "bytes":
        sys.stdout.flush()
        sys.stdout.buffer.write(base64.b64decode(d["reply_b64"]))
        sys.stdout.buffer.flush()
        return
    value = d.get("reply")
    if d.get("type") == "text" and isinstance(value, str):
        text = value
    else:
        text = json.dumps(value) if item else json.dumps(value, indent=2)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if item:
        sys.stdout.flush()


def cmd_call(args: argparse.Namespace, home: Path) -> int:
    from p2pnode.control.client import ControlClient

    if args.timeout is not None and not 0 < args.timeout <= 3600:
        raise UsageError("--timeout must be more than 0 and at most 3600 seconds")
    body: dict[str, Any] = {"name": args.name, **_call_input(args)}
    if args.timeout is not None:
        body["timeout"] = args.timeout
    if args.peer is not None:
        body["peer"] = args.peer
    # The control API answers when the call ends: wait a little past its deadline.
    default = 60.0 if args.stream else 10.0
    client = ControlClient(home, timeout=max(120.0, (args.timeout or default) + 30))
    if not args.stream:
        res = client.call("POST", "/v1/services/call", body)
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            _write_reply(res)
        return ExitCode.OK
    final: dict[str, Any] | None = None
    for event in client.stream("POST", "/v1/services/call_stream", body):
        if event.get("event") == StreamEvent.ITEM:
            if args.json:
                print(json.dumps(event), flush=True)
            else:
                _write_reply(event, item=True)
        elif event.get("event") in (StreamEvent.DONE, StreamEvent.ERROR):
            final = event
    if final is None:
        raise P2PError(f"the node stopped before the stream of {args.name!r} ended")
    if final["event"] == StreamEvent.ERROR:
        from p2pnode.control.client import raise_event_error

        raise_event_error(final)
    if args.json:
        print(json.dumps(final), flush=True)
    return ExitCode.OK


def progress_line(p: dict[str, Any]) -> str:
    """A download's progress event (``{"event": "progress", ...}``) as one line: the
    peers figure is ``peers_shown`` (exchange/display.py), "from N peers" once every
    piece is in."""
    state = str(p.get("state", "downloading"))
    total = max(1, int(p.get("total_bytes", 0)))
    done = int(p.get("done_bytes", 0))
    peers = peers_shown(p)
    line = (
        f"{100 * done / total:5.1f}%  {_size(done)} / {_size(total)}  "
        f"{_size(float(p.get('rate', 0)))}/s  "
    )
    if state == "downloading":
        eta = p.get("eta")
        return line + f"peers {peers}  ETA {'?' if eta is None else f'{eta:.0f}s'}"
    source = f"from {peers} peer{'' if peers == 1 else 's'}  " if peers else ""
    return line + source + state


class _ProgressBar:
    """One line on stderr, redrawn in place on a terminal, every few seconds otherwise;
    a change of state (finishing, done) is always drawn, so the last line says 100%.
    A change of phase (before the bytes: looking up, connecting...) is always drawn,
    and the byte progress right after it."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._last = 0.0

    def _write(self, line: str) -> None:
        sys.stderr.write(("\r" + line.ljust(78)) if self._tty else line + "\n")
        sys.stderr.flush()

    def phase(self, p: dict[str, Any]) -> None:
        self._write(phase_line(p))
        self._last = 0.0  # the next progress line is drawn at once

    def show(self, p: dict[str, Any]) -> None:
        now = time.monotonic()
        state = str(p.get("state", "downloading"))
        if state == "downloading" and not self._tty and now - self._last < 2.0:
            return
        self._last = now
        self._write(progress_line(p))

    def close(self) -> None:
        if self._tty:
            sys.stderr.write("\n")


def cmd_get(args: argparse.Namespace, client: ControlClient) -> int:
    # An existing folder as destination (the default: the current one) receives the
    # resource under its own name, like `cp FILE DIR`.
    dest = (args.output or Path.cwd()).expanduser().resolve()
    body: dict[str, Any] = {"id": args.id, "force": args.force, "dest": str(dest)}
    bar = None if args.json else _ProgressBar()
    final: dict[str, Any] | None = None
    again = shlex.join(
        ["p2pnode", "get", args.id, *(["-o", str(args.output)] if args.output else [])]
    )
    kept = f"verified pieces are kept; run `{again}` again to resume"
    try:
        for event in client.stream("POST", "/v1/get", body):
            kind = event.get("event")
            if kind in (StreamEvent.DONE, StreamEvent.ERROR):
                final = event
            elif args.json:
                # Progress and phases as JSON lines on stderr (stdout: the result;
                # an error is the last line).
                print(json.dumps(event), file=sys.stderr, flush=True)
            elif kind == StreamEvent.PROGRESS and bar is not None:
                bar.show(event)
            elif kind == StreamEvent.PHASE and bar is not None:
                bar.phase(event)
    except KeyboardInterrupt:
        # The node stops the download when we go away; say what is left of it.
        raise KeyboardInterrupt(f"download interrupted: {kept}") from None
    finally:
        if bar is not None:
            bar.close()
    if final is None:
        raise DownloadError(f"the node stopped before the download finished: {kept}")
    if final["event"] == StreamEvent.ERROR:
        from p2pnode.control.client import raise_event_error

        # The exchange names its Python parameter; on the command line it is --force.
        final["error"] = str(final.get("error", "")).replace("(use force", "(use --force")
        raise_event_error(final)
    res = final["resource"]
    _emit(args, res, lambda r: f"{r['id']}  {_size(r['size'])}  verified -> {r['path']}")
    return ExitCode.OK


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        # Flush here, not at exit: a reader gone away (`| head`) shows up as a
        # BrokenPipeError below instead of a traceback during interpreter shutdown.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The Python docs' recipe: point stdout at devnull so the final flush at
        # exit cannot fail again, and leave quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_errors = "--json" in argv
    args = build_parser().parse_args(argv)
    home: Path = (args.home or default_home()).expanduser().resolve()
    try:
        if args.command == "start":
            return cmd_start(args, home)
        from p2pnode.control.client import ControlClient

        client = ControlClient(home)
        handlers: dict[str, Callable[[], int]] = {
            "id": lambda: cmd_id(args, client),
            "peers": lambda: cmd_peers(args, client),
            "connections": lambda: cmd_connections(args, client),
            "status": lambda: cmd_status(args, client),
            "stop": lambda: cmd_stop(args, client, home),
            "dht": lambda: cmd_dht(args, client),
            "share": lambda: cmd_share(args, client),
            "unshare": lambda: cmd_unshare(args, client),
            "ls": lambda: cmd_ls(args, client),
            "providers": lambda: cmd_providers(args, client),
            "get": lambda: cmd_get(args, client),
            "ui": lambda: cmd_ui(args, client),
            "serve": lambda: cmd_serve(args, client),
            "unserve": lambda: cmd_unserve(args, client),
            "services": lambda: cmd_services(args, client),
            "find-service": lambda: cmd_find_service(args, client),
            "call": lambda: cmd_call(args, home),
        }
        return handlers[args.command]()
    except P2PError as exc:
        _report_error(args.json, str(exc), _error_code(exc))
        return ExitCode.ERROR
    except KeyboardInterrupt as exc:
        if args.json or exc.args:
            _report_error(args.json, str(exc) or "interrupted", ErrorCode.INTERRUPTED)
        return ExitCode.INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
