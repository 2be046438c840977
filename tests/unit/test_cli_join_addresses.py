"""The addresses `start` suggests for joining ("join with:")."""

from __future__ import annotations

from p2pnode.node import join_candidates


def test_public_first_then_private_and_no_loopback_or_link_local() -> None:
    got = join_candidates(
        ["127.0.0.1", "::1", "192.168.1.7", "fe80::1%eth0", "203.0.113.9", "fd00::2", "8.8.4.4"]
    )
    # 203.0.113.9 is a documentation range (not global); 8.8.4.4 is.
    assert got == ["8.8.4.4", "192.168.1.7", "203.0.113.9", "fd00::2"]


def test_nothing_but_loopback_gives_nothing() -> None:
    assert join_candidates(["127.0.0.1", "::1", "not an ip"]) == []
