"""What a download is doing before (and between) its bytes: pure data events.

A ``get`` spends its first seconds looking providers up in the DHT, dialing them
(seconds behind NAT: relays, hole punching) and asking for the manifest; when
every known provider is unreachable it looks them up again (``Relookup``,
exchange/ranking.py). The fetcher reports each change of phase as a ``PhaseEvent``
to a callback of its own (``phase=``, beside the byte ``Progress`` one, which keeps
getting ``Progress`` only); the control API streams both, a phase as an
``{"event": "phase", ...}`` line, and the CLI renders them (cli.py). Rules:

- An event only when the phase changes (``PhaseReporter`` drops repeats): one per
  lookup, one when a lookup's answer is in, one when the first provider of a
  round answers the dial. Bounded by the lookups and the providers tried.
- ``lookup`` counts the download's DHT lookups, the first being 1; ``lookups`` is
  the most the whole download may make (``1 + rediscover_attempts``), the same in
  every event of a download: finding providers, asking for the manifest and the
  pieces draw on that one budget (so "2/3" means one more may follow, whatever the
  stage, and the numbering never goes from "2/3" to "3/4").
- exchange/display.py renders an event's JSON (the CLI's line, the status page's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    LOOKUP = "lookup"  # asking the DHT who provides the resource
    CONNECTING = "connecting"  # providers found: dialing them
    MANIFEST = "manifest"  # a provider answered the dial: asking it for the manifest


class LookupReason(StrEnum):
    """Why a lookup is made again."""

    NONE_FOUND = "none_found"  # the previous lookup found no provider
    UNREACHABLE = "unreachable"  # no provider found so far answered (or all failed)


@dataclass(frozen=True)
class PhaseEvent:
    resource_id: bytes
    phase: Phase
    lookup: int = 0  # the download's lookup this phase is, or follows (1: the first)
    lookups: int = 0  # the most lookups the download may make (its whole budget)
    providers: int = 0  # providers the last lookup found
    new: int | None = None  # of those, not tried yet (None: the first lookup's answer)
    failed: int = 0  # attempts that failed so far (with LOOKUP: why it is made again)
    reason: LookupReason | None = None  # with a LOOKUP made again
    peer: str | None = None  # with MANIFEST: the provider asked ("<peer id>@host:port")
    via: str | None = None  # with MANIFEST: how it was reached (direct, relayed, punched)

    def to_json(self) -> dict[str, Any]:
        # Here, not at the top: the CLI imports phase_line and starts faster without
        # the manifest's imports (msgpack, blake3).
        from p2pnode.exchange.manifest import resource_id_to_str

        # No key shared with Progress.to_json but "id": a consumer keeping the latest
        # of both in one dict is not misled.
        out: dict[str, Any] = {
            "id": resource_id_to_str(self.resource_id),
            "phase": self.phase,
            "lookup": self.lookup,
            "lookups": self.lookups,
            "providers": self.providers,
            "failed": self.failed,
        }
        if self.new is not None:
            out["new"] = self.new
        if self.reason is not None:
            out["reason"] = self.reason
        if self.peer is not None:
            out["peer"] = self.peer
        if self.via is not None:
            out["via"] = self.via
        return out


class PhaseReporter:
    """Passes phase events to ``emit``, dropping one equal to the last; keeps the
    download's lookup budget (``budget`` lookups in all, ``made`` so far, ``left``)
    for the events, the stages that look up again, and the final error."""

    def __init__(
        self, resource_id: bytes, emit: Callable[[PhaseEvent], None] | None, *, budget: int = 1
    ) -> None:
        if budget < 1:
            raise ValueError("budget >= 1 (the first lookup)")
        self.resource_id = resource_id
        self._emit = emit
        self.budget = budget
        self.made = 0  # lookups started
        self.last: PhaseEvent | None = None

    @property
    def left(self) -> int:
        """Lookups the download may still make."""
        return max(0, self.budget - self.made)

    def _report(self, event: PhaseEvent) -> None:
        if event == self.last:
            return
        self.last = event
        if self._emit is not None:
            self._emit(event)

    def lookup(self, *, reason: LookupReason | None = None, failed: int = 0) -> None:
        """A lookup starts (one of the budget: the caller checked ``left``)."""
        self.made += 1
        self._report(
            PhaseEvent(
                self.resource_id,
                Phase.LOOKUP,
                lookup=self.made,
                lookups=max(self.budget, self.made),
                reason=reason,
                failed=failed,
            )
        )

    def found(self, providers: int, *, new: int | None = None) -> None:
        """A lookup's answer is in: dialing what it found (and what still dials)."""
        self._report(
            PhaseEvent(
                self.resource_id,
                Phase.CONNECTING,
                lookup=self.made,
                lookups=max(self.budget, self.made),
                providers=providers,
                new=new,
            )
        )

    def connected(self, peer: str, via: str | None = None) -> None:
        """A provider answered the dial: asking it for the manifest (reported for the
        first such provider after each lookup only)."""
        if self.last is not None and self.last.phase is Phase.MANIFEST:
            return
        last = self.last
        self._report(
            PhaseEvent(
                self.resource_id,
                Phase.MANIFEST,
                lookup=self.made,
                lookups=max(self.budget, self.made),
                providers=last.providers if last is not None else 0,
                peer=peer,
                via=via,
            )
        )
