"""How a download is shown, from the JSON of its events (``PhaseEvent.to_json``,
``Progress.to_json``, or the control API's ``{"event": ...}`` lines): pure, no
imports, so the CLI starts fast. The CLI and the status page (control/ui.py) both
use it, and a field a newer node adds or an older one lacks is no crash.
"""

from __future__ import annotations

from typing import Any


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def phase_line(p: dict[str, Any]) -> str:
    """A download's phase event as JSON (``PhaseEvent.to_json``, or the control
    API's ``{"event": "phase", ...}`` line) as one status line; an unknown phase (a
    newer node) as its name."""
    phase = str(p.get("phase", ""))
    n, of = int(p.get("lookup", 0)), int(p.get("lookups", 0))
    providers = int(p.get("providers", 0))
    count = f" ({n}/{of})" if of > 1 else ""
    if phase == "lookup":
        reason = p.get("reason")
        if reason == "none_found":
            return f"no provider found yet, looking again{count}..."
        if reason == "unreachable":
            failed = int(p.get("failed", 0))
            why = f"{_plural(failed, 'attempt')} failed" if failed else "dials still waiting"
            return f"no provider reachable yet ({why}), looking again{count}..."
        return "looking up providers..."
    if phase == "connecting":
        found = f"found {_plural(providers, 'provider')}"
        new = p.get("new")
        if new is None:
            return f"{found}, connecting..." if providers else f"{found}"
        if new == 0:
            return f"{found}, none new"
        return f"{found} ({new} new), connecting..."
    if phase == "manifest":
        via = p.get("via")
        how = f" ({via})" if via and via != "direct" else ""
        return f"fetching the manifest from {p.get('peer') or 'a provider'}{how}..."
    return f"{phase}..."


def peers_shown(p: dict[str, Any]) -> int:
    """The peers figure of a progress event. While downloading: the peers taking
    part now, or, when higher, those that already sent pieces (``peers_used``: a
    peer between two answers, or whose part is done, still counts), so it does not
    flicker to 0. Once every piece is in (finishing, done): the peers that sent
    pieces (``peers`` is 0 then: the workers ended). An older node sends ``peers``
    only."""
    now, used = int(p.get("peers", 0)), p.get("peers_used")
    if str(p.get("state", "downloading")) == "downloading":
        return max(now, int(used or 0))
    return int(used) if used is not None else now
