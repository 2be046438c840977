"""Port mapping counters in GET /metrics (p2pnode/control/metrics.py)."""

from __future__ import annotations

from tests.unit.test_metrics import sample, scrape, snapshot


def test_port_mapping_counters_get_families_by_outcome() -> None:
    stats = {
        "attempts": 3,
        "attempts_mapped": 1,
        "attempts_failed": 2,
        "renewals_ok": 4,
        "removals": 2,
        "no_gateway": 2,
    }
    fams = scrape(lambda: snapshot(portmap=stats))
    attempts = "p2pnode_portmap_attempts"
    assert fams[attempts].type == "counter"
    assert sample(fams, attempts, f"{attempts}_total", outcome="mapped") == 1
    assert sample(fams, attempts, f"{attempts}_total", outcome="failed") == 2
    renewals = "p2pnode_portmap_renewals"
    assert sample(fams, renewals, f"{renewals}_total", outcome="failed") == 0
    removals = "p2pnode_portmap_removals"
    assert sample(fams, removals, f"{removals}_total", outcome="ok") == 2
    started = "p2pnode_portmap_started"
    assert sample(fams, started, f"{started}_total") == 3
    events = "p2pnode_portmap_events"
    assert sample(fams, events, f"{events}_total", event="no_gateway") == 2


def test_no_port_mapping_families_when_it_does_not_run() -> None:
    fams = scrape(lambda: snapshot(portmap={}))
    assert not [name for name in fams if name.startswith("p2pnode_portmap")]
    assert not [name for name in scrape(snapshot) if name.startswith("p2pnode_portmap")]
