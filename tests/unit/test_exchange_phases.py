"""A download's phase events (exchange/phase.py): how the CLI renders them (pure),
and the order a fetch emits them in (real stores and a piece server, no sockets)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from p2pnode.cli import phase_line
from p2pnode.clock import MonotonicClock
from p2pnode.dht.discovery import ProviderRecord
from p2pnode.errors import NotFoundError, PeerUnreachable
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.fetcher import Fetcher, Progress
from p2pnode.exchange.phase import LookupReason, Phase, PhaseEvent, PhaseReporter
from p2pnode.exchange.server import PieceServer
from p2pnode.exchange.store import Store
from p2pnode.net.host import PeerAddress
from tests.unit.test_exchange_cancel import DirectRequester, _share

RID = bytes(range(32))


def _line(event: PhaseEvent) -> str:
    # As the CLI gets it: through the control API's JSON line.
    return phase_line(json.loads(json.dumps({"event": "phase", **event.to_json()})))


def test_phase_lines() -> None:
    ev = PhaseEvent
    assert _line(ev(RID, Phase.LOOKUP, lookup=1, lookups=3)) == "looking up providers..."
    assert (
        _line(ev(RID, Phase.LOOKUP, lookup=2, lookups=3, reason=LookupReason.NONE_FOUND))
        == "no provider found yet, looking again (2/3)..."
    )
    assert (
        _line(ev(RID, Phase.LOOKUP, lookup=2, lookups=3, reason=LookupReason.UNREACHABLE, failed=2))
        == "no provider reachable yet (2 attempts failed), looking again (2/3)..."
    )
    assert (
        _line(ev(RID, Phase.LOOKUP, lookup=3, lookups=3, reason=LookupReason.UNREACHABLE))
        == "no provider reachable yet (dials still waiting), looking again (3/3)..."
    )
    assert _line(ev(RID, Phase.CONNECTING, providers=3)) == "found 3 providers, connecting..."
    assert _line(ev(RID, Phase.CONNECTING, providers=1)) == "found 1 provider, connecting..."
    assert (
        _line(ev(RID, Phase.CONNECTING, providers=2, new=1))
        == "found 2 providers (1 new), connecting..."
    )
    assert _line(ev(RID, Phase.CONNECTING, providers=1, new=0)) == "found 1 provider, none new"
    assert (
        _line(ev(RID, Phase.MANIFEST, peer="abcdefgh@127.0.0.1:4001"))
        == "fetching the manifest from abcdefgh@127.0.0.1:4001..."
    )
    assert (
        _line(ev(RID, Phase.MANIFEST, peer="abcdefgh@192.0.2.1:4001", via="relayed"))
        == "fetching the manifest from abcdefgh@192.0.2.1:4001 (relayed)..."
    )
    assert _line(ev(RID, Phase.MANIFEST, peer="p@h:1", via="direct")) == (
        "fetching the manifest from p@h:1..."
    )
    # A phase a newer node may add: its name, not a crash.
    assert phase_line({"event": "phase", "phase": "punching"}) == "punching..."


def test_phase_json_keeps_clear_of_progress_keys() -> None:
    """A consumer keeping the latest of both in one dict is not misled: only "id" is shared."""
    phase = PhaseEvent(RID, Phase.MANIFEST, reason=LookupReason.UNREACHABLE, new=1, peer="p")
    progress = Progress(RID, "f", 0, 1, 0, 1, 0.0, 0, None)
    assert set(phase.to_json()) & set(progress.to_json()) == {"id"}


def test_reporter_reports_changes_only() -> None:
    got: list[PhaseEvent] = []
    phases = PhaseReporter(RID, got.append)
    phases.lookup(more=2)
    phases.found(2, more=2)
    phases.found(2, more=2)  # the same again: nothing new to say
    phases.connected("a@h:1")
    phases.connected("b@h:2")  # already asking one for the manifest
    phases.lookup(more=1, reason=LookupReason.UNREACHABLE, failed=2)
    phases.found(2, new=0, more=1)
    phases.connected("b@h:2")
    assert [(e.phase, e.lookup, e.lookups) for e in got] == [
        (Phase.LOOKUP, 1, 3),
        (Phase.CONNECTING, 1, 3),
        (Phase.MANIFEST, 1, 3),
        (Phase.LOOKUP, 2, 3),
        (Phase.CONNECTING, 2, 3),
        (Phase.MANIFEST, 2, 3),
    ]
    assert got[2].peer == "a@h:1" and got[5].peer == "b@h:2" and got[3].failed == 2


class Providers:
    """Answers each lookup with the next list (the last one again when out)."""

    def __init__(self, *answers: list[ProviderRecord]) -> None:
        self.answers = list(answers)
        self.lookups = 0

    async def find_providers(self, key: bytes, want: int = 20) -> list[ProviderRecord]:
        self.lookups += 1
        return list(self.answers.pop(0) if len(self.answers) > 1 else self.answers[0])

    def remove_provider(self, key: bytes) -> None:
        pass


class DialingRequester(DirectRequester):
    """Dials first, as PeerHost does (``connect``); ``unreachable`` peers refuse."""

    def __init__(self, own: bytes, servers: dict[bytes, PieceServer]) -> None:
        super().__init__(own, servers)
        self.unreachable: set[bytes] = set()

    async def connect(self, peer: PeerAddress) -> object:
        await asyncio.sleep(0)
        if peer.node_id in self.unreachable:
            raise PeerUnreachable(f"{peer}: connection refused")
        return object()


CONFIG = ExchangeConfig(
    rediscover_attempts=2,
    rediscover_delay=0.0,
    progress_interval=0.0,
    fsync=False,
    stale_check_interval=0,
)


def _kinds(events: list[Any]) -> list[str]:
    out = []
    for e in events:
        if isinstance(e, PhaseEvent):
            out.append(f"{e.phase}:{e.lookup}/{e.lookups}")
        elif not out or out[-1] != "progress":
            out.append("progress")
    return out


async def test_a_fetch_says_lookup_connect_manifest_then_bytes(tmp_path: Path) -> None:
    store, manifest, data = _share(tmp_path, "provider", 3)
    pid = b"P" * 20
    requester = DialingRequester(
        b"L" * 20, {pid: PieceServer(store, None, on_stale=lambda r, w: None)}
    )
    # The first lookup misses (loss, churn): looked up again, then found.
    providers = Providers([], [ProviderRecord(pid, "127.0.0.1", 4001)])
    leech = Store(tmp_path / "leech")
    fetcher = Fetcher(
        store=leech,
        requester=requester,
        providers=providers,
        config=CONFIG,
        clock=MonotonicClock(),
        executor=None,
    )
    events: list[Any] = []
    fetch = fetcher.fetch(
        manifest.resource_id, tmp_path / "out.bin", progress=events.append, phase=events.append
    )
    await asyncio.wait_for(fetch, 10)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert _kinds(events) == [
        "lookup:1/3",
        "lookup:2/3",
        "connecting:2/4",
        "manifest:2/4",
        "progress",
    ]
    assert events[1].reason == LookupReason.NONE_FOUND
    assert events[2].providers == 1 and events[2].new is None
    assert events[3].peer.endswith("@127.0.0.1:4001")
    assert events[-1].state == "done"
    leech.close()
    store.close()


async def test_unreachable_providers_are_looked_up_again_and_the_error_says_so(
    tmp_path: Path,
) -> None:
    store, manifest, _ = _share(tmp_path, "provider", 3)
    pid = b"P" * 20
    requester = DialingRequester(
        b"L" * 20, {pid: PieceServer(store, None, on_stale=lambda r, w: None)}
    )
    requester.unreachable.add(pid)
    providers = Providers([ProviderRecord(pid, "127.0.0.1", 4001)])
    leech = Store(tmp_path / "leech")
    fetcher = Fetcher(
        store=leech,
        requester=requester,
        providers=providers,
        config=CONFIG,
        clock=MonotonicClock(),
        executor=None,
    )
    events: list[Any] = []
    fetch = fetcher.fetch(
        manifest.resource_id, tmp_path / "out.bin", progress=events.append, phase=events.append
    )
    with pytest.raises(NotFoundError) as caught:
        await asyncio.wait_for(fetch, 10)
    assert _kinds(events) == [
        "lookup:1/3",
        "connecting:1/3",
        "lookup:2/3",
        "connecting:2/3",
        "lookup:3/3",
        "connecting:3/3",
    ]
    again = events[2]
    assert again.reason == LookupReason.UNREACHABLE and again.failed == 1
    assert events[3].new == 0 and providers.lookups == 3
    message = str(caught.value)
    assert "1 provider(s) found in 3 DHT lookup(s)" in message, message
    assert "1 cannot connect" in message, message
    leech.close()
    store.close()
