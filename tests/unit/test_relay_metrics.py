"""The relay's figures in the metrics: typed families, refusals and ends by reason."""

from __future__ import annotations

from tests.unit.test_metrics import sample, scrape, snapshot


def test_relay_stats_become_their_own_families() -> None:
    relay = {
        "enabled": 1,
        "reservations": 3,
        "circuits_pending": 1,
        "circuits_live": 2,
        "bytes_relayed": 5000,
        "refused.circuits_full": 4,
        "ended.bytes": 1,
        "client_reservations_held": 0,
    }
    fams = scrape(lambda: snapshot(relay=relay))
    assert fams["p2pnode_relay_reservations"].type == "gauge"
    assert sample(fams, "p2pnode_relay_reservations") == 3
    assert sample(fams, "p2pnode_relay_circuits", state="live") == 2
    assert sample(fams, "p2pnode_relay_circuits", state="pending") == 1
    assert sample(fams, "p2pnode_relay_relayed_bytes", "p2pnode_relay_relayed_bytes_total") == 5000
    refused = "p2pnode_relay_refused"
    assert sample(fams, refused, f"{refused}_total", reason="circuits_full") == 4
    ended = "p2pnode_relay_circuits_ended"
    assert sample(fams, ended, f"{ended}_total", reason="bytes") == 1


def test_a_snapshot_without_the_relay_still_scrapes() -> None:
    fams = scrape(snapshot)
    assert sample(fams, "p2pnode_relay_reservations") == 0
