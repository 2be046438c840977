"""A download's phase events (exchange/phase.py): how the CLI renders them (pure),
and the order a fetch emits them in (real stores and a piece server, no sockets)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from p2pnode.cli import phase_line, progress_line
from p2pnode.clock import MonotonicClock
from p2pnode.dht.discovery import ProviderRecord
from p2pnode.errors import NotFoundError, PeerUnreachable
from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.fetcher import Fetcher, Progress
from p2pnode.exchange.messages import GetManifest, GetPiece
from p2pnode.exchange.phase import LookupReason, Phase, PhaseEvent, PhaseReporter
from p2pnode.exchange.server import PieceServer
from p2pnode.exchange.store import Store
from p2pnode.net.host import PeerAddress
from p2pnode.wire.messages import Message
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
    phases = PhaseReporter(RID, got.append, budget=3)
    phases.lookup()
    phases.found(2)
    phases.found(2)  # the same again: nothing new to say
    phases.connected("a@h:1")
    phases.connected("b@h:2")  # already asking one for the manifest
    phases.lookup(reason=LookupReason.UNREACHABLE, failed=2)
    phases.found(2, new=0)
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
    assert phases.made == 2 and phases.left == 1


def test_one_budget_one_total_over_the_stages() -> None:
    """However the lookups fall between the stages (none found, the manifest's
    providers unreachable, the pieces' providers gone), the total never moves:
    never "(2/3)" then "(3/4)"."""
    got: list[PhaseEvent] = []
    phases = PhaseReporter(RID, got.append, budget=3)
    phases.lookup()
    phases.lookup(reason=LookupReason.NONE_FOUND)
    phases.found(1)
    phases.connected("a@h:1")
    phases.lookup(reason=LookupReason.UNREACHABLE, failed=1)
    phases.found(1, new=0)
    assert phases.left == 0  # the stages after this one may look up no more
    assert {e.lookups for e in got} == {3}
    assert [e.lookup for e in got] == [1, 2, 2, 2, 3, 3]
    lines = [_line(e) for e in got]
    assert lines[1].endswith("(2/3)...") and lines[4].endswith("(3/3)..."), lines


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


def _fetcher(
    leech: Store, requester: Any, providers: Any, config: ExchangeConfig = CONFIG
) -> Fetcher:
    return Fetcher(
        store=leech,
        requester=requester,
        providers=providers,
        config=config,
        clock=MonotonicClock(),
        executor=None,
    )


async def test_a_fetch_says_lookup_connect_manifest_then_bytes(tmp_path: Path) -> None:
    store, manifest, data = _share(tmp_path, "provider", 3)
    pid = b"P" * 20
    requester = DialingRequester(
        b"L" * 20, {pid: PieceServer(store, None, on_stale=lambda r, w: None)}
    )
    # The first lookup misses (loss, churn): looked up again, then found.
    providers = Providers([], [ProviderRecord(pid, "127.0.0.1", 4001)])
    leech = Store(tmp_path / "leech")
    fetcher = _fetcher(leech, requester, providers)
    events: list[Any] = []
    fetch = fetcher.fetch(
        manifest.resource_id, tmp_path / "out.bin", progress=events.append, phase=events.append
    )
    await asyncio.wait_for(fetch, 10)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert _kinds(events) == [
        "lookup:1/3",
        "lookup:2/3",
        "connecting:2/3",
        "manifest:2/3",
        "progress",
    ]
    assert events[1].reason == LookupReason.NONE_FOUND
    assert events[2].providers == 1 and events[2].new is None
    assert events[3].peer.endswith("@127.0.0.1:4001")
    assert events[-1].state == "done"
    leech.close()
    store.close()


async def test_lookups_share_one_budget_across_the_stages(tmp_path: Path) -> None:
    """The first lookup misses, the second finds a provider that cannot be reached:
    the manifest stage may look up once more (3 in all with rediscover_attempts=2),
    not rediscover_attempts more, and every event says "/3"."""
    store, manifest, _ = _share(tmp_path, "provider", 3)
    pid = b"P" * 20
    requester = DialingRequester(
        b"L" * 20, {pid: PieceServer(store, None, on_stale=lambda r, w: None)}
    )
    requester.unreachable.add(pid)
    providers = Providers([], [ProviderRecord(pid, "127.0.0.1", 4001)])
    leech = Store(tmp_path / "leech")
    fetcher = _fetcher(leech, requester, providers)
    events: list[Any] = []
    fetch = fetcher.fetch(manifest.resource_id, tmp_path / "out.bin", phase=events.append)
    with pytest.raises(NotFoundError) as caught:
        await asyncio.wait_for(fetch, 10)
    assert _kinds(events) == [
        "lookup:1/3",
        "lookup:2/3",
        "connecting:2/3",
        "lookup:3/3",
        "connecting:3/3",
    ]
    assert providers.lookups == 3
    assert "in 3 DHT lookup(s)" in str(caught.value), caught.value
    leech.close()
    store.close()


def _progress(state: str, peers: int, used: int | None, done: int = 50) -> dict[str, Any]:
    p: dict[str, Any] = {
        "event": "progress",
        "done_bytes": done,
        "total_bytes": 100,
        "rate": 10.0,
        "peers": peers,
        "eta": 5.0,
        "state": state,
    }
    if used is not None:
        p["peers_used"] = used
    return p


def test_the_peers_figure_does_not_flicker_to_zero() -> None:
    """A download from 2 peers, as its progress events come (``peers``: those busy
    at that instant; ``peers_used``: those that sent pieces)."""
    events = [
        _progress("downloading", 0, 0, done=0),  # before any peer answered
        _progress("downloading", 2, 1),
        _progress("downloading", 1, 2),  # one between two answers, or its part done
        _progress("downloading", 2, 2),
        _progress("finishing", 0, 2, done=100),  # every worker ended
        _progress("done", 0, 2, done=100),
    ]
    figures = [progress_line(p).split("/s  ")[1] for p in events]
    assert figures == [
        "peers 0  ETA 5s",
        "peers 2  ETA 5s",
        "peers 2  ETA 5s",
        "peers 2  ETA 5s",
        "from 2 peers  finishing",
        "from 2 peers  done",
    ]
    assert progress_line(_progress("done", 0, 1, done=100)).endswith("  from 1 peer  done")
    # An older node (no peers_used): its figure as it is.
    assert progress_line(_progress("downloading", 3, None)).endswith("peers 3  ETA 5s")
    assert progress_line(_progress("done", 0, None, done=100)).endswith("/s  done")


async def test_the_final_progress_counts_the_peers_the_bytes_came_from(tmp_path: Path) -> None:
    store, manifest, data = _share(tmp_path, "provider", 8)
    servers = {
        key: PieceServer(store, None, on_stale=lambda r, w: None) for key in (b"A" * 20, b"B" * 20)
    }
    requester = DialingRequester(b"L" * 20, servers)
    providers = Providers([ProviderRecord(key, "127.0.0.1", 4001) for key in servers])
    leech = Store(tmp_path / "leech")
    config = replace(CONFIG, requests_per_peer=1, inflight_bytes_per_peer=1)
    fetcher = _fetcher(leech, requester, providers, config)
    events: list[Progress] = []
    fetch = fetcher.fetch(manifest.resource_id, tmp_path / "out.bin", progress=events.append)
    await asyncio.wait_for(fetch, 10)
    assert (tmp_path / "out.bin").read_bytes() == data
    senders = {key for key, msg in requester.sent if isinstance(msg, GetPiece)}
    assert len(senders) == 2  # both served pieces (one request each at a time)
    final = events[-1]
    assert final.state == "done" and final.peers == 0  # the workers ended
    assert final.peers_used == 2 and final.to_json()["peers_used"] == 2
    used = [e.peers_used for e in events]
    assert used == sorted(used), used  # never decreases
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
    fetcher = _fetcher(leech, requester, providers)
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


# -- a re-lookup under way when the last piece worker ends (found in review) ----------


class OldAddressHangs(DialingRequester):
    """The provider's old address (port 4001) answers the manifest, then its piece
    requests hang for 0.5 s and fail (a NAT mapping gone); port 4002 works."""

    async def request(
        self, peer: PeerAddress, msg: Message, timeout: float | None = None
    ) -> Message:
        if peer.port == 4001 and not isinstance(msg, GetManifest):
            await asyncio.sleep(0.5)
            raise PeerUnreachable(f"{peer}: timed out")
        return await super().request(peer, msg, timeout)


class SlowSecondLookup:
    def __init__(self, first: list[ProviderRecord], then: list[ProviderRecord]) -> None:
        self.answers = [first, then]
        self.lookups = 0

    async def find_providers(self, key: bytes, want: int = 20) -> list[ProviderRecord]:
        self.lookups += 1
        if self.lookups > 1:
            await asyncio.sleep(1.0)  # a lookup under loss: slower than the failing dial
        return list(self.answers[min(self.lookups, 2) - 1])

    def remove_provider(self, key: bytes) -> None:
        pass


async def test_a_relookup_in_flight_when_the_last_worker_ends_is_not_thrown_away(
    tmp_path: Path,
) -> None:
    store, manifest, data = _share(tmp_path, "provider", 3)
    pid = b"P" * 20
    requester = OldAddressHangs(
        b"L" * 20, {pid: PieceServer(store, None, on_stale=lambda r, w: None)}
    )
    providers = SlowSecondLookup(
        [ProviderRecord(pid, "127.0.0.1", 4001)], [ProviderRecord(pid, "127.0.0.1", 4002)]
    )
    leech = Store(tmp_path / "leech")
    config = replace(CONFIG, rediscover_attempts=1, dial_timeout=0.1)
    fetcher = _fetcher(leech, requester, providers, config)
    try:
        await asyncio.wait_for(fetcher.fetch(manifest.resource_id, tmp_path / "out.bin"), 10)
        assert (tmp_path / "out.bin").read_bytes() == data
    finally:
        leech.close()
        store.close()
