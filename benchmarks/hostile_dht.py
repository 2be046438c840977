"""The DHT attacks of issue 10 for bench_hostile.py (``--attacks dht-...``).

Each row is a fresh network of HONEST_COUNT full nodes (``p2pnode.Node``: DHT,
PeerHost, Exchange), each in its own process on its own loopback address
(127.0.1.1 ... 127.0.5.1, so each is one host to the others' diversity filter,
which has its loopback exemption off: ``DhtConfig(diversity_exempt_loopback=False)``,
as on an open network), driven by JSON commands on its stdin. Node 0 publishes and
provides, the last node downloads. The attacker is one more process, on 127.0.0.x,
speaking the DHT's wire format by hand:

``dht-overwrite``        stores of a signed record's key (the publisher's latest
                         record with its value changed, another key's record under
                         that name, the publisher's own older record, a plain value)
                         and of a plain value's key, to every node: with no token
                         (a stock 3-argument store), a made-up token, and the token
                         127.0.0.2 earned by identify. Honest operation: every
                         node's get_record of the address, and the publisher's get
                         of its plain value.
``dht-provider-spam``    64 add_provider per node for the provided key from
                         127.0.0.2, random ids, port 9: without a token, with a
                         made-up one, with the earned token and made-up records,
                         then with the token and validly signed records of 64 fresh
                         keys. Honest operation: the download of that resource.
``dht-sybil``            20 UDP sockets on 127.0.0.2 with ids next to a record key
                         that shares 16 bits with a resource key (two rows: claimed
                         ids, and ground Ed25519 keys sharing 10 leading bits),
                         answering every RPC with each other, forged values and
                         "stored". Honest operation: a signed record put afterwards,
                         read back from every node, and a resource shared afterwards
                         next to that key, downloaded.
``dht-spoofed-provider`` add_provider records (fresh keys, validly signed) naming a
                         victim at 127.0.0.9 that listens on TCP, sent from 127.0.0.3
                         with the token 127.0.0.2 earned, records naming 127.0.0.3
                         with that foreign token, and (as root) raw datagrams whose
                         source is forged to be the victim. Honest operation: the
                         download of that resource, and the TCP connects that
                         reached the victim (want 0).
``dht-store-flood``      1,000 stores of 4 KiB values under random keys per node
                         from each of 11 addresses (127.0.0.2-12), with earned
                         tokens. Honest operation: a signed put afterwards (where it
                         was stored: ``PutOutcome`` here / remote of asked) read back
                         by the downloader.

Every honest operation is also run once before the attack, on the same network, for
its clean time. Counters are the honest nodes' DHT counters summed, from just before
the attack to after the honest operation. Bounded: fixed counts, ``--attack-max-seconds``
for the attacker, a timeout on every node command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped,unused-ignore]
import psutil

# The attacker's tools are the hostile tests' own (tests/dht_attacker.py).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.dht_attacker import Sybil, dht_datagram, grind, raw_socket, raw_udp

DHT_ATTACKS = (
    "dht-overwrite",
    "dht-provider-spam",
    "dht-sybil",
    "dht-spoofed-provider",
    "dht-store-flood",
)
HONEST_COUNT = 5
HONEST_HOSTS = tuple(f"127.0.{i}.1" for i in range(1, HONEST_COUNT + 1))
ATTACKER = "127.0.0.2"
SPOOFER = "127.0.0.3"
VICTIM = "127.0.0.9"
FLOOD_HOSTS = tuple(f"127.0.0.{i}" for i in range(2, 13))
SPAM_PER_VARIANT = 64
SYBILS = 20
GROUND_BITS = 10  # ~1,000 key pairs per Sybil
SHARED_BITS = 16  # between the Sybils' record key and the resource key
FLOOD_STORES = 1000
FLOOD_VALUE = 4096
FLOOD_WINDOW = 4  # stores in flight per (source, node): 11 sources, ~200 KiB
FLOOD_ANSWER_TIMEOUT = 0.5
ANSWER_TIMEOUT = 2.0
COMMAND_TIMEOUT = 120.0
MiB = 1024 * 1024
SCRIPT = str(Path(__file__).resolve())

# Counters shown (honest nodes' DHT stats, summed over the nodes).
SHOWN = (
    "stores_accepted",
    "stores_refused",
    "stores_refused_token",
    "providers_accepted",
    "providers_refused",
    "providers_refused_",
    "provider_store.",
    "dropped.",
    "proofs_failed",
    "table_refused.",
    "value_store.",
    "records_rejected.",
    "verify_dropped",
)
ABSOLUTE = (
    "contacts",
    "contacts_at_127.0.0.2",
    "unproven_contacts",
    "stored_values",
    "stored_value_bytes",
)


def now() -> float:
    from p2pnode.clock import MONOTONIC

    return MONOTONIC.now()  # the DHT's clock (Unix seconds): record expiry is on it


# --- the honest node (child process) -----------------------------------------------------


async def node_main(args: argparse.Namespace) -> None:
    from p2pnode import Node, NodeConfig
    from p2pnode.dht import DhtConfig
    from p2pnode.exchange.config import ExchangeConfig

    bootstrap = tuple((h, int(p)) for h, p in (b.rsplit(":", 1) for b in args.bootstrap))
    config = NodeConfig(
        home=Path(args.home),
        host=args.host,
        port=0,
        bootstrap=bootstrap,
        dht=DhtConfig(diversity_exempt_loopback=False),
        exchange=ExchangeConfig(fsync=False),
        control_api=False,
    )
    node = Node(config)
    await node.start()
    try:
        if bootstrap:
            await node.wait_joined(timeout=30)
        _reply({"host": args.host, "port": node.port, "peer_id": node.node_id.hex()})
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            t0 = time.perf_counter()
            try:
                answer = await asyncio.wait_for(_command(node, command), COMMAND_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - reported to the bench, shown in the row
                answer = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            answer["seconds"] = time.perf_counter() - t0
            _reply(answer)
    finally:
        await node.stop()


def _reply(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def _shown(value: object) -> object:
    return value if value is None or isinstance(value, str | int | float) else repr(value)


async def _command(node: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    from kademlia.utils import digest

    from p2pnode.dht import records as rec
    from p2pnode.exchange.manifest import dht_key, resource_id_from_str, resource_id_to_str

    dht = node.discovery
    op = cmd["op"]
    if op == "join":
        await dht.bootstrap([(h, p) for h, p in cmd["addrs"]])
        return {"contacts": len(dht.contacts())}
    if op == "closest":
        return {"found": len(await dht.closest(bytes.fromhex(cmd["key"])))}
    if op == "put_mutable":
        outcome = await dht.put_mutable(cmd["name"], cmd["value"])
        key = rec.parse_address(outcome.address)[0]
        envelope = dht.core.storage.get(key) if outcome.here else None
        out = outcome.to_json()
        out["key"] = key.hex()
        out["envelope"] = envelope.hex() if isinstance(envelope, bytes) else None
        return out
    if op == "put":
        return dict((await dht.put_outcome(cmd["key"], cmd["value"])).to_json())
    if op == "get_record":
        return {"value": _shown(await dht.get_record(cmd["address"]))}
    if op == "get":
        return {"value": _shown(await dht.get(cmd["key"]))}
    if op == "held":  # what this node's own store holds under a plain key
        return {"value": _shown(dht.core.storage.get(digest(cmd["key"])))}
    if op == "holds_record":  # whether this node's own store has that record, valid
        key = rec.parse_address(cmd["address"])[0]
        held = dht.core.storage.get(key)
        with contextlib.suppress(rec.RecordError):
            record = rec.open_value(key, held, now(), dht.config.value_ttl)
            return {"value": _shown(getattr(record, "value", None))}
        return {"value": None}
    if op == "share":
        info = await node.exchange.share(Path(cmd["file"]))
        holders = await dht.add_provider(dht_key(info.resource_id), node.port)
        return {"rid": resource_id_to_str(info.resource_id), "holders": holders}
    if op == "download":
        rid = resource_id_from_str(cmd["rid"])
        await asyncio.wait_for(node.exchange.get(rid, Path(cmd["dest"])), cmd["timeout"])
        return {"ok": True}
    if op == "providers":  # what a downloader's provider lookup finds
        found = await node.exchange.providers(resource_id_from_str(cmd["rid"]))
        want = bytes.fromhex(cmd["honest"])
        fake = sum(1 for r in found if r.node_id != want)
        return {"found": len(found), "fake": fake, "honest": any(r.node_id == want for r in found)}
    if op == "stats":
        stats = dht.stats()
        stats["rss"] = psutil.Process().memory_info().rss
        stats["contacts_at_127.0.0.2"] = sum(1 for c in dht.contacts() if c.host == ATTACKER)
        return {"stats": stats}
    raise ValueError(f"unknown command {op!r}")


class HonestNode:
    """The bench's handle on one node process."""

    def __init__(self, index: int, home: Path, bootstrap: list[str]) -> None:
        self.host = HONEST_HOSTS[index]
        argv = ["--role", "dht-node", "--host", self.host, "--home", str(home)]
        for entry in bootstrap:
            argv += ["--bootstrap", entry]
        self.proc = subprocess.Popen(
            [sys.executable, SCRIPT, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        info = self._line()
        self.port = int(info["port"])
        self.peer_id = bytes.fromhex(info["peer_id"])

    @property
    def addr(self) -> list[object]:
        return [self.host, self.port]

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"node {self.host} exited with {self.proc.wait()}")
        return dict(json.loads(line))

    def call(self, op: str, **kwargs: object) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._line()

    def stats(self) -> dict[str, int]:
        answer = self.call("stats")
        return {k: int(v) for k, v in answer.get("stats", {}).items()}

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- the attacker (child process) ----------------------------------------------------------


class RawDht(asyncio.DatagramProtocol):
    """One attacker socket speaking the DHT's wire format by hand."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.node_id = os.urandom(20)
        self.waiting: dict[bytes, asyncio.Future[object]] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        future = self.waiting.pop(data[1:21], None)
        if data[:1] == b"\x01" and future is not None and not future.done():
            with contextlib.suppress(ValueError, msgpack.ExtraData):
                future.set_result(msgpack.unpackb(data[21:]))

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error of an earlier datagram: the answer just never comes

    def send(self, to: tuple[str, int], name: str, *args: object) -> bytes:
        msg_id = os.urandom(20)
        self.transport.sendto(dht_datagram(name, *args, msg_id=msg_id), to)
        return msg_id

    async def ask(
        self, to: tuple[str, int], name: str, *args: object, timeout: float = ANSWER_TIMEOUT
    ) -> object:
        """The answer, or None if none came within ``timeout``."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        msg_id = self.send(to, name, *args)
        self.waiting[msg_id] = future
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            self.waiting.pop(msg_id, None)
            return None

    async def earn_token(self, to: tuple[str, int]) -> bytes | None:
        """What any host can get: the token for its own address, from identify."""
        answer = await self.ask(to, "identify", self.node_id, os.urandom(16))
        if isinstance(answer, list) and len(answer) == 4 and isinstance(answer[2], bytes):
            return answer[2]
        return None


class Answers:
    """What the honest nodes answered to one kind of datagram."""

    sent: int = 0
    accepted: int = 0  # answered true
    refused: int = 0  # answered false
    silent: int = 0  # no answer (dropped)

    def add(self, answer: object) -> None:
        self.sent += 1
        if answer is True:
            self.accepted += 1
        elif answer is False:
            self.refused += 1
        else:
            self.silent += 1

    def text(self) -> str:
        return (
            f"{self.sent} sent: {self.accepted} accepted, {self.refused} refused, "
            f"{self.silent} no answer"
        )


class DhtAttacker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.plan: dict[str, Any] = json.loads(Path(args.dht_plan).read_text())
        self.nodes = [(h, int(p)) for h, p in self.plan["nodes"]]
        self.answers: dict[str, Answers] = {}
        self.transports: list[Any] = []
        self.deadline = time.monotonic() + args.attack_max_seconds
        self.ops = 0

    def tally(self, what: str, answer: object) -> None:
        self.answers.setdefault(what, Answers()).add(answer)
        self.ops += 1

    def left(self) -> float:
        return self.deadline - time.monotonic()

    async def socket(self, host: str, factory: Any = RawDht) -> Any:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(factory, local_addr=(host, 0))
        self.transports.append(transport)
        return proto

    async def run(self) -> None:
        print(json.dumps({"ready": True}), flush=True)
        loop = asyncio.get_running_loop()
        if (await loop.run_in_executor(None, sys.stdin.readline)).strip() != "go":
            return
        cpu0 = _cpu()
        t0 = time.monotonic()
        attack = getattr(self, "attack_" + self.args.kind.removeprefix("dht-").replace("-", "_"))
        extra: dict[str, Any] = {}
        try:
            async with asyncio.timeout(max(0.0, self.left())):
                extra = await attack() or {}
        except TimeoutError:
            extra = {"timed_out": True}
        report = {
            "ops": self.ops,
            "seconds": time.monotonic() - t0,
            "cpu": _cpu() - cpu0,
            "answers": {k: vars(v) for k, v in self.answers.items()},
            **extra,
        }
        print(json.dumps(report), flush=True)
        # Sockets stay open (Sybils keep answering) until the bench is done with
        # the honest operation: stdin closes, or the time cap.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, self.left())):
                await loop.run_in_executor(None, sys.stdin.read)
        for transport in self.transports:
            transport.close()

    # -- 1: overwrite ----------------------------------------------------------------

    async def attack_overwrite(self) -> None:
        from p2pnode.dht import records as rec
        from p2pnode.identity import Identity

        key = bytes.fromhex(self.plan["key"])
        record = rec.open_value(key, bytes.fromhex(self.plan["envelope"]), now(), 24 * 3600.0)
        assert isinstance(record, rec.MutableRecord)
        tampered = rec.MutableRecord(
            record.peer_id, record.public_key, record.name, "pwned", record.seq + 1000,
            record.expires, record.signature,
        )  # fmt: skip
        other = rec.sign_mutable(
            Identity.generate(), record.name, "pwned", record.seq + 1000, record.expires
        )
        forged: list[tuple[str, bytes, object]] = [
            ("plain value", key, "pwned"),
            ("tampered envelope", key, rec.to_value(tampered)),
            ("other key's record", key, rec.to_value(other)),
            ("stale seq", key, bytes.fromhex(self.plan["stale"])),
            ("plain key (publisher's)", bytes.fromhex(self.plan["plain_key"]), "pwned"),
        ]
        attacker = await self.socket(ATTACKER)
        for node in self.nodes:
            token = await attacker.earn_token(node)
            for what, dkey, value in forged:
                self.tally(
                    f"store, no token: {what}",
                    await attacker.ask(node, "store", attacker.node_id, dkey, value),
                )
                self.tally(
                    f"store, made-up token: {what}",
                    await attacker.ask(node, "store", attacker.node_id, dkey, value, os.urandom(8)),
                )
                if token is not None:
                    answer = await attacker.ask(node, "store", attacker.node_id, dkey, value, token)
                    self.tally(f"store, earned token: {what}", answer)

    # -- 2: provider spam ------------------------------------------------------------

    async def attack_provider_spam(self) -> None:
        from p2pnode.dht import records as rec
        from p2pnode.identity import Identity

        key = bytes.fromhex(self.plan["key"])
        spammer = await self.socket(ATTACKER)

        def made_up() -> list[object]:  # the right shape, a random signature
            return [
                os.urandom(20),
                os.urandom(32),
                [[ATTACKER, 9]],
                1,
                int(now() + 3600),
                os.urandom(64),
            ]

        for node in self.nodes:
            for _ in range(SPAM_PER_VARIANT):
                spammer.send(node, "add_provider", os.urandom(20), key, made_up())  # no token
                self.tally("no token (not even a valid request)", None)
            for _ in range(SPAM_PER_VARIANT):
                answer = await spammer.ask(
                    node, "add_provider", os.urandom(20), key, made_up(), os.urandom(8)
                )
                self.tally("made-up token", answer)
            token = await spammer.earn_token(node)
            if token is None:
                continue
            for _ in range(SPAM_PER_VARIANT):
                answer = await spammer.ask(
                    node, "add_provider", os.urandom(20), key, made_up(), token
                )
                self.tally("earned token, made-up records", answer)
            for _ in range(SPAM_PER_VARIANT):
                signed = rec.sign_provider_record(
                    Identity.generate(), key, [(ATTACKER, 9)], int(now() * 1000), int(now() + 3600)
                )
                answer = await spammer.ask(
                    node, "add_provider", os.urandom(20), key, signed.to_wire(), token
                )
                self.tally("earned token, signed by 64 fresh keys", answer)

    # -- 3: Sybils -------------------------------------------------------------------

    async def attack_sybil(self) -> dict[str, Any]:
        from p2pnode.dht import records as rec

        target = bytes.fromhex(self.plan["key"])
        proven = bool(self.plan["ground"])
        forged: list[object] = ["pwned", rec.RECORD_MAGIC + b"\x01junk"]
        sybils: list[tuple[Sybil, int]] = []
        t0 = time.monotonic()
        for _ in range(SYBILS):
            identity = grind(target, GROUND_BITS) if proven else None
            node_id = identity.node_id if identity is not None else target[:18] + os.urandom(2)
            sybil = await self.socket(ATTACKER, lambda i=identity, n=node_id: Sybil(n, i, forged))
            sybils.append((sybil, sybil.transport.get_extra_info("sockname")[1]))
        grind_s = time.monotonic() - t0
        fellows = [[s.node_id, ATTACKER, port] for s, port in sybils]
        for sybil, _ in sybils:
            sybil.fellows = fellows
        # Each announces itself to every node (the nodes verify it with a ping,
        # then ask it to prove its id), and asks for the target (so it is noticed).
        for sybil, _ in sybils:
            for node in self.nodes:
                sybil.transport.sendto(dht_datagram("ping", sybil.node_id), node)
                sybil.transport.sendto(dht_datagram("find_node", sybil.node_id, target), node)
                self.ops += 2
        await asyncio.sleep(3.0)  # the verification pings and identify calls
        return {"sybil_requests": sum(s.requests for s, _ in sybils), "grind_seconds": grind_s}

    # -- 4: spoofed provider ---------------------------------------------------------

    async def attack_spoofed_provider(self) -> dict[str, Any]:
        from p2pnode.dht import records as rec
        from p2pnode.identity import Identity

        key = bytes.fromhex(self.plan["key"])
        victim = (VICTIM, int(self.plan["victim_port"]))
        earner = await self.socket(ATTACKER)
        spoofer = await self.socket(SPOOFER)
        raw = raw_socket()

        def record(host: str, port: int) -> list[object]:
            signed = rec.sign_provider_record(
                Identity.generate(), key, [(host, port)], int(now() * 1000), int(now() + 3600)
            )
            return signed.to_wire()

        try:
            for node in self.nodes:
                token = await earner.earn_token(node) or os.urandom(8)
                for _ in range(SPAM_PER_VARIANT):
                    answer = await spoofer.ask(
                        node, "add_provider", os.urandom(20), key, record(*victim), token
                    )
                    self.tally("from 127.0.0.3, victim's address, 127.0.0.2's token", answer)
                    answer = await spoofer.ask(
                        node, "add_provider", os.urandom(20), key, record(SPOOFER, victim[1]), token
                    )
                    self.tally("from 127.0.0.3, its own address, 127.0.0.2's token", answer)
                    if raw is not None:
                        data = dht_datagram(
                            "add_provider", os.urandom(20), key, record(*victim), token
                        )
                        raw.sendto(raw_udp(victim, node, data), (node[0], 0))
                        self.tally("raw, source forged to the victim (answer goes to it)", None)
                await spoofer.ask(node, "ping", spoofer.node_id)  # the raw ones were read
        finally:
            if raw is not None:
                raw.close()
        return {"raw": raw is not None}

    # -- 5: store flood --------------------------------------------------------------

    async def attack_store_flood(self) -> None:
        values = [os.urandom(FLOOD_VALUE) for _ in range(16)]

        async def flood(sock: RawDht, node: tuple[str, int], token: bytes) -> None:
            sent = 0

            async def lane() -> None:  # one store in flight at a time
                nonlocal sent
                while sent < FLOOD_STORES:
                    sent += 1
                    value = values[sent % len(values)]
                    args = (sock.node_id, os.urandom(20), value, token)
                    answer = await sock.ask(node, "store", *args, timeout=FLOOD_ANSWER_TIMEOUT)
                    self.tally("4 KiB store, earned token", answer)

            await asyncio.gather(*(lane() for _ in range(FLOOD_WINDOW)))

        async def from_host(index: int, host: str) -> None:
            sock = await self.socket(host)
            # Each source starts at another node, so the nodes share the load.
            for n in range(len(self.nodes)):
                node = self.nodes[(index + n) % len(self.nodes)]
                token = None
                for _ in range(3):  # an answer lost to a full socket buffer
                    token = token or await sock.earn_token(node)
                if token is None:
                    self.tally("no token earned", None)
                    continue
                await flood(sock, node, token)

        await asyncio.gather(*(from_host(i, h) for i, h in enumerate(FLOOD_HOSTS)))


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --- the bench side ------------------------------------------------------------------------


@dataclass
class DhtCase:
    label: str
    kind: str
    operation: str = ""  # what the honest operation was
    result: str = ""  # what it gave
    ok: bool = False
    clean_s: float = 0.0  # the honest operation before the attack
    attacked_s: float = 0.0  # ... and after it
    notes: list[str] = field(default_factory=list)
    attacker: dict[str, Any] = field(default_factory=dict)
    deltas: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    rss_max: int = 0  # the largest honest node's RSS after the attack
    error: str = ""


class VictimListener:
    """A TCP listener at the victim's address counting the connects reaching it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((VICTIM, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.count += 1
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


class DhtHarness:
    def __init__(self, args: argparse.Namespace, base: Path, files: tuple[Path, Path]) -> None:
        self.args = args
        self.base = base
        self.clean_file, self.fresh_file = files
        from p2pnode.exchange.manifest import build_manifest, dht_key

        manifest, _ = build_manifest(self.fresh_file)
        self.fresh_key = dht_key(manifest.resource_id)

    def cases(self, kinds: list[str]) -> list[DhtCase]:
        out = []
        for kind in kinds:
            if kind == "dht-sybil":
                out.append(self.run(DhtCase("dht-sybil (claimed ids)", kind), ground=False))
                out.append(self.run(DhtCase("dht-sybil (ground keys)", kind), ground=True))
            else:
                out.append(self.run(DhtCase(kind, kind)))
        return out

    def run(self, case: DhtCase, ground: bool = False) -> DhtCase:
        home = Path(tempfile.mkdtemp(prefix=f"{case.kind}-", dir=self.base))
        nodes: list[HonestNode] = []
        victim: VictimListener | None = None
        try:
            nodes.append(HonestNode(0, home / "n0", []))
            entry = f"{nodes[0].host}:{nodes[0].port}"
            for i in range(1, HONEST_COUNT):
                nodes.append(HonestNode(i, home / f"n{i}", [entry]))
            for node in nodes:
                node.call("join", addrs=[n.addr for n in nodes if n is not node])
            if case.kind == "dht-spoofed-provider":
                victim = VictimListener()
            scenario = getattr(self, "_" + case.kind.removeprefix("dht-").replace("-", "_"))
            scenario(case, nodes, home, ground=ground, victim=victim)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            case.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            if victim is not None:
                victim.close()
            for node in nodes:
                node.stop()
            shutil.rmtree(home, ignore_errors=True)
        return case

    # -- the attack window, common to all rows ------------------------------------------

    @contextlib.contextmanager
    def attack(self, case: DhtCase, nodes: list[HonestNode], plan: dict[str, Any]) -> Any:
        """Run the attacker until its report; the body (the honest operation) runs
        while its sockets are still open; counters from before it to after the body."""
        plan = {"nodes": [n.addr for n in nodes], **plan}
        path = self.base / f"plan-{case.kind}-{os.getpid()}.json"
        path.write_text(json.dumps(plan))
        before = [n.stats() for n in nodes]
        argv = ["--role", "dht-attack", "--kind", case.kind, "--dht-plan", str(path)]
        argv += ["--attack-max-seconds", str(self.args.attack_max_seconds)]
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            if not proc.stdout.readline():
                raise RuntimeError(f"the attacker exited with {proc.wait()}")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the attacker exited with {proc.wait()}")
            case.attacker = json.loads(line)
            yield
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            path.unlink(missing_ok=True)
        after = [n.stats() for n in nodes]
        case.rss_max = max(a.get("rss", 0) for a in after)
        for b, a in zip(before, after, strict=True):
            for k, v in a.items():
                if k in ABSOLUTE:
                    case.after[k] = case.after.get(k, 0) + v
                elif v != b.get(k, 0):
                    case.deltas[k] = case.deltas.get(k, 0) + v - b.get(k, 0)

    def _download(
        self, node: HonestNode, rid: str, home: Path, tag: str
    ) -> tuple[bool, float, str]:
        answer = node.call(
            "download", rid=rid, dest=str(home / f"out-{tag}"), timeout=self.args.download_timeout
        )
        return bool(answer.get("ok")), float(answer["seconds"]), str(answer.get("error", ""))

    # -- the rows ----------------------------------------------------------------------

    def _overwrite(self, case: DhtCase, nodes: list[HonestNode], home: Path, **_: object) -> None:
        publisher, reader = nodes[0], nodes[-1]
        first = publisher.call("put_mutable", name="greeting", value="hello v1")
        latest = publisher.call("put_mutable", name="greeting", value="hello v2")
        plain = publisher.call("put", key="plain greeting", value="hello")
        if not (first.get("envelope") and latest.get("envelope")):
            raise RuntimeError(f"the publisher did not keep its records: {first} {latest}")
        address = latest["address"]
        case.operation = (
            f"get_record(<publisher>/greeting) on {HONEST_COUNT} nodes; publisher's get"
        )
        clean = reader.call("get_record", address=address)
        case.clean_s = clean["seconds"]
        from kademlia.utils import digest

        plan = {
            "key": latest["key"],
            "envelope": latest["envelope"],
            "stale": first["envelope"],
            "plain_key": digest("plain greeting").hex(),
        }
        case.notes.append(
            f"put latest: here={latest['here']} remote={latest['remote']}/{latest['asked']}; "
            f"plain put: here={plain['here']} remote={plain['remote']}/{plain['asked']}"
        )
        with self.attack(case, nodes, plan):
            got = reader.call("get_record", address=address)
            case.attacked_s = got["seconds"]
            values = [got["value"]] + [
                n.call("get_record", address=address)["value"] for n in nodes[:-1]
            ]
            own = publisher.call("get", key="plain greeting")["value"]
            elsewhere = reader.call("held", key="plain greeting")["value"]
        intact = sum(1 for v in values if v == "hello v2")
        forged = sum(1 for v in values if v not in ("hello v2", None))
        missing = sum(1 for v in values if v is None)
        verdict = (
            "ok"
            if got["value"] == "hello v2"
            else ("missing" if got["value"] is None else "FORGED")
        )
        case.ok = intact == len(values) and own == "hello"
        case.result = (
            f"downloader {verdict}; all nodes {intact} ok / {forged} forged / {missing} missing; "
            f"publisher's plain get {own!r}"
        )
        case.notes.append(
            f"the downloader's own store now holds the plain key as {elsewhere!r} (a plain "
            "value is unauthenticated on the nodes that did not put it: by design)"
        )

    def _provider_spam(
        self, case: DhtCase, nodes: list[HonestNode], home: Path, **_: object
    ) -> None:
        provider, downloader = nodes[0], nodes[-1]
        clean = provider.call("share", file=str(self.clean_file))
        spammed = provider.call("share", file=str(self.fresh_file))
        from p2pnode.exchange.manifest import dht_key, resource_id_from_str

        key = dht_key(resource_id_from_str(spammed["rid"]))
        case.operation = f"download {self.args.dht_size_mib} MiB (the spammed key)"
        ok, case.clean_s, err = self._download(downloader, clean["rid"], home, "clean")
        if not ok:
            case.notes.append(f"clean download failed: {err}")
        with self.attack(case, nodes, {"key": key.hex()}):
            seen = downloader.call("providers", rid=spammed["rid"], honest=provider.peer_id.hex())
            ok, case.attacked_s, err = self._download(downloader, spammed["rid"], home, "spammed")
        case.ok = ok
        case.result = f"{_found(seen)}; {'downloaded' if ok else 'FAILED: ' + err}"

    def _sybil(
        self, case: DhtCase, nodes: list[HonestNode], home: Path, *, ground: bool, **_: object
    ) -> None:
        from p2pnode.dht import records as rec

        publisher, downloader = nodes[0], nodes[-1]
        # A record name whose key shares SHARED_BITS with the fresh resource's key:
        # the Sybils, next to the record key, are the closest to both.
        want = int.from_bytes(self.fresh_key, "big") >> (160 - SHARED_BITS)
        name = next(
            f"takeover-{i}"
            for i in range(1 << (SHARED_BITS + 8))
            if int.from_bytes(rec.mutable_key(publisher.peer_id, f"takeover-{i}"), "big")
            >> (160 - SHARED_BITS)
            == want
        )
        target = rec.mutable_key(publisher.peer_id, name)
        clean = publisher.call("share", file=str(self.clean_file))
        clean_put = publisher.call("put_mutable", name="clean-record", value="honest value")
        clean_get = downloader.call("get_record", address=clean_put["address"])
        ok, case.clean_s, err = self._download(downloader, clean["rid"], home, "clean")
        if not ok:
            case.notes.append(f"clean download failed: {err}")
        case.operation = (
            "put + get_record next to the Sybils; download "
            f"{self.args.dht_size_mib} MiB shared next to them"
        )
        case.notes.append(
            f"clean: put {clean_put['remote']}/{clean_put['asked']} remote, get_record "
            f"{clean_get['seconds']:.2f} s -> {clean_get['value']!r}"
        )
        with self.attack(case, nodes, {"key": target.hex(), "ground": ground}):
            for node in nodes:  # ordinary traffic through that region of the key space
                node.call("closest", key=target.hex())
            put = publisher.call("put_mutable", name=name, value="honest value")
            values = [n.call("get_record", address=put["address"])["value"] for n in nodes]
            holders = [n.call("holds_record", address=put["address"])["value"] for n in nodes]
            fresh = publisher.call("share", file=str(self.fresh_file))
            ok, case.attacked_s, err = self._download(downloader, fresh["rid"], home, "fresh")
        intact = sum(1 for v in values if v == "honest value")
        forged = sum(1 for v in values if v not in ("honest value", None))
        case.ok = ok and intact == len(values)
        case.result = (
            f"put here={put.get('here')} remote={put.get('remote')}/{put.get('asked')} "
            f"unproven={put.get('unproven')}, held by "
            f"{sum(1 for v in holders if v == 'honest value')}/{len(nodes)} honest nodes; "
            f"get_record {intact} ok / {forged} forged / "
            f"{len(values) - intact - forged} missing; fresh share announced to "
            f"{fresh.get('holders')}, download {'ok' if ok else 'FAILED: ' + err}"
        )

    def _spoofed_provider(
        self,
        case: DhtCase,
        nodes: list[HonestNode],
        home: Path,
        *,
        victim: VictimListener,
        **_: object,
    ) -> None:
        provider, downloader = nodes[0], nodes[-1]
        clean = provider.call("share", file=str(self.clean_file))
        target = provider.call("share", file=str(self.fresh_file))
        from p2pnode.exchange.manifest import dht_key, resource_id_from_str

        key = dht_key(resource_id_from_str(target["rid"]))
        case.operation = (
            f"download {self.args.dht_size_mib} MiB (the key claimed); connects to the victim"
        )
        ok, case.clean_s, err = self._download(downloader, clean["rid"], home, "clean")
        if not ok:
            case.notes.append(f"clean download failed: {err}")
        with self.attack(case, nodes, {"key": key.hex(), "victim_port": victim.port}):
            seen = downloader.call("providers", rid=target["rid"], honest=provider.peer_id.hex())
            ok, case.attacked_s, err = self._download(downloader, target["rid"], home, "target")
            time.sleep(0.5)  # a connect in flight reaches the listener
        case.ok = ok and victim.count == 0
        raw = (
            "with raw spoofed sources" if case.attacker.get("raw") else "no raw sockets (not root)"
        )
        case.result = (
            f"{_found(seen)}; {'downloaded' if ok else 'FAILED: ' + err}; "
            f"{victim.count} TCP connects reached "
            f"the victim ({raw})"
        )

    def _store_flood(self, case: DhtCase, nodes: list[HonestNode], home: Path, **_: object) -> None:
        publisher, reader = nodes[0], nodes[-1]
        before = publisher.call("put_mutable", name="before-flood", value="honest value")
        clean = reader.call("get_record", address=before["address"])
        case.clean_s = before["seconds"] + clean["seconds"]
        case.operation = "signed put after the flood, get_record by the downloader"
        case.notes.append(
            f"clean: put here={before['here']} remote={before['remote']}/{before['asked']}, "
            f"read back {clean['value']!r}"
        )
        with self.attack(case, nodes, {}):
            put = publisher.call("put_mutable", name="after-flood", value="honest value")
            got = reader.call("get_record", address=put["address"]) if put.get("address") else {}
            case.attacked_s = put["seconds"] + got.get("seconds", 0.0)
        case.ok = bool(put.get("stored")) and got.get("value") == "honest value"
        case.result = (
            f"put here={put.get('here')} remote={put.get('remote')}/{put.get('asked')}"
            f"{' ' + put['error'] if 'error' in put else ''}; read back {got.get('value')!r}"
        )


# --- report ----------------------------------------------------------------------------------


def _found(answer: dict[str, Any]) -> str:
    if "error" in answer:
        return f"find_providers failed: {answer['error']}"
    honest = "in" if answer["honest"] else "NOT in"
    return (
        f"find_providers {answer['found']} (honest provider {honest} them, {answer['fake']} others)"
    )


def _secs(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


def _attacker_text(case: DhtCase) -> str:
    a = case.attacker
    if not a:
        return "-"
    return (
        f"{a.get('ops', 0):,} datagrams in {a.get('seconds', 0):.1f} s, {a.get('cpu', 0):.1f} CPU s"
    )


def print_report(cases: list[DhtCase]) -> None:
    print(
        f"\nDHT attacks (issue 10): {HONEST_COUNT} honest nodes, one per address "
        f"({HONEST_HOSTS[0]} .. {HONEST_HOSTS[-1]}), diversity_exempt_loopback=False, "
        "other DHT settings default; attackers from 127.0.0.2-12"
    )
    head = (
        f"{'case':26s} {'ok':>3s} {'clean':>7s} {'attacked':>8s} {'RSS max':>7s}  "
        "honest operation -> result  | attacker sent"
    )
    print(head)
    print("-" * len(head))
    for c in cases:
        if c.error:
            print(f"{c.label:26s} {'no':>3s} {'-':>7s} {'-':>8s} {'-':>7s}  ERROR {c.error}")
            continue
        print(
            f"{c.label:26s} {'yes' if c.ok else 'NO':>3s} {_secs(c.clean_s):>7s}"
            f" {_secs(c.attacked_s):>8s}"
            f" {c.rss_max / MiB:5.0f}Mi  {c.operation} -> {c.result}  | {_attacker_text(c)}"
        )
        for note in c.notes:
            print(f"{'':26s}   ({note})")
    print("\nwhat the honest nodes answered (attacker's view):")
    for c in cases:
        for what, a in (c.attacker.get("answers") or {}).items():
            n = Answers(**a)
            print(f"  {c.label}: {what}: {n.text()}")
        extra = {
            k: v
            for k, v in c.attacker.items()
            if k in ("sybil_requests", "grind_seconds", "timed_out")
        }
        if extra:
            parts = (
                f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items()
            )
            print(f"  {c.label}: {', '.join(parts)}")
    print("\nDHT counters moved, summed over the honest nodes (attack + honest operation):")
    for c in cases:
        moved = {k: v for k, v in sorted(c.deltas.items()) if v and k.startswith(SHOWN)}
        shown = ", ".join(f"{k} {v:,}" for k, v in moved.items())
        held = ", ".join(f"{k} {v:,}" for k, v in c.after.items())
        print(f"  {c.label}: {shown or '-'}; after: {held}")


def make_files(base: Path, size: int) -> tuple[Path, Path]:
    out = []
    for name in ("clean.bin", "fresh.bin"):
        path = base / name
        with open(path, "wb") as f:
            left = size
            while left > 0:
                chunk = os.urandom(min(left, 4 * MiB))
                f.write(chunk)
                left -= len(chunk)
        out.append(path)
    return out[0], out[1]


def run(args: argparse.Namespace, base: Path, kinds: list[str]) -> list[DhtCase]:
    files = make_files(base, args.dht_size_mib * MiB)
    return DhtHarness(args, base, files).cases(kinds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", required=True, choices=("dht-node", "dht-attack"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--home", default="")
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--kind", default="")
    parser.add_argument("--dht-plan", default="")
    parser.add_argument("--attack-max-seconds", type=float, default=120.0)
    args = parser.parse_args()
    if args.role == "dht-node":
        asyncio.run(node_main(args))
    else:
        asyncio.run(DhtAttacker(args).run())


if __name__ == "__main__":
    main()
