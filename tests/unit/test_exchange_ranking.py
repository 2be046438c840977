"""The provider ranking, the dial slots and the re-lookup rule: pure, time passed in."""

from __future__ import annotations

import pytest

from p2pnode.exchange.ranking import DialSlots, Failure, ProviderRanking, Relookup, Tier


def ids(n: int) -> list[bytes]:
    return [bytes([i]) * 20 for i in range(n)]


def order(ranking: ProviderRanking, peers: list[bytes], now: float) -> list[bytes]:
    return ranking.order(peers, now, key=lambda p: p)


def test_unknown_peers_keep_the_dht_order() -> None:
    peers = ids(5)
    assert order(ProviderRanking(), peers, 0.0) == peers


def test_good_untried_slow_then_failed() -> None:
    a, b, c, d, e, f = ids(6)
    ranking = ProviderRanking(slow_rtt=1.0, backoff=30.0)
    ranking.failed(a, Failure.UNREACHABLE, now=100.0)
    ranking.succeeded(b, rtt=3.0)  # slow
    ranking.succeeded(c, rtt=0.2)
    ranking.succeeded(d, rtt=0.05)
    ranking.failed(e, Failure.TIMEOUT, now=90.0)  # backs off until 120, before a (130)
    assert order(ranking, [a, b, c, d, e, f], 101.0) == [d, c, f, b, e, a]
    assert [ranking.tier(p, 101.0) for p in (d, f, b, a)] == [
        Tier.GOOD,
        Tier.UNTRIED,
        Tier.SLOW,
        Tier.BACKING_OFF,
    ]


def test_back_off_expires_and_doubles() -> None:
    a, b = ids(2)
    ranking = ProviderRanking(backoff=10.0, backoff_max=35.0)
    ranking.failed(a, Failure.UNREACHABLE, now=0.0)
    assert order(ranking, [a, b], 9.9) == [b, a]
    # Over: a is untried again, but after peers that never failed.
    assert ranking.tier(a, 10.0) is Tier.UNTRIED
    assert order(ranking, [a, b], 10.0) == [b, a]
    ranking.failed(a, Failure.UNREACHABLE, now=10.0)  # second in a row: 20 s
    assert ranking.tier(a, 29.9) is Tier.BACKING_OFF
    assert ranking.tier(a, 30.0) is Tier.UNTRIED
    ranking.failed(a, Failure.UNREACHABLE, now=30.0)  # 40 s, capped at 35
    assert ranking.tier(a, 64.9) is Tier.BACKING_OFF
    assert ranking.tier(a, 65.0) is Tier.UNTRIED


def test_a_lie_backs_off_longer_and_success_clears_failures() -> None:
    a, b = ids(2)
    ranking = ProviderRanking(backoff=10.0, backoff_max=1000.0)
    ranking.failed(a, Failure.BAD, now=0.0)
    ranking.failed(b, Failure.TIMEOUT, now=0.0)
    assert ranking.tier(a, 50.0) is Tier.BACKING_OFF
    assert ranking.tier(b, 50.0) is Tier.UNTRIED
    ranking.succeeded(a, rtt=0.1)
    assert ranking.tier(a, 50.0) is Tier.GOOD
    assert order(ranking, [b, a], 50.0) == [a, b]


def test_rtt_is_smoothed() -> None:
    (a,) = ids(1)
    ranking = ProviderRanking(slow_rtt=1.0)
    ranking.succeeded(a, rtt=0.1)
    assert ranking.srtt(a) == pytest.approx(0.1)
    ranking.succeeded(a, rtt=2.1)  # one slow answer does not make it slow
    assert ranking.srtt(a) == pytest.approx(0.6)
    assert ranking.tier(a, 0.0) is Tier.GOOD
    for _ in range(10):
        ranking.succeeded(a, rtt=2.1)
    assert ranking.tier(a, 0.0) is Tier.SLOW


def test_memory_is_bounded_least_recently_updated_forgotten() -> None:
    ranking = ProviderRanking(capacity=100)
    peers = [i.to_bytes(20, "big") for i in range(1000)]
    keep = peers[0]
    for i, peer in enumerate(peers):
        ranking.failed(peer, Failure.UNREACHABLE, now=0.0)
        if i % 50 == 0:
            ranking.succeeded(keep, rtt=0.01)  # refreshed: stays
    assert len(ranking) == 100
    assert ranking.tier(keep, 1.0) is Tier.GOOD
    assert ranking.tier(peers[1], 1.0) is Tier.UNTRIED  # forgotten
    assert ranking.tier(peers[-1], 1.0) is Tier.BACKING_OFF


def test_ranking_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        ProviderRanking(capacity=0)
    with pytest.raises(ValueError):
        ProviderRanking(backoff=10.0, backoff_max=5.0)


def test_dial_slots_window_and_limit() -> None:
    slots = DialSlots(window=2, dial_timeout=3.0, limit=3)
    slots.start("a", 0.0)
    slots.start("b", 0.0)
    assert not slots.may_start(0.0)  # two dialing
    slots.answered("a")
    assert slots.may_start(0.1)
    slots.start("c", 0.1)
    assert slots.open == 3 and not slots.may_start(0.2)
    assert slots.stale(2.9) is None
    # b is past the dial timeout: no longer holds a window slot, but the limit holds.
    assert slots.stale(3.0) == "b"
    assert slots.fresh_dials(3.0) == 1
    assert not slots.may_start(3.0)
    slots.end("b")
    assert slots.may_start(3.0)
    assert slots.next_change(3.0) == pytest.approx(0.1)  # c turns stale at 3.1
    slots.end("c")
    assert slots.next_change(3.0) is None and not slots.is_dialing("c")


def test_silent_dials_cost_one_timeout_per_window() -> None:
    """Twelve silent addresses with a window of 4 and room for many: three dial
    timeouts in all, not twelve."""
    slots = DialSlots(window=4, dial_timeout=3.0, limit=16)
    now, started = 0.0, 0
    while started < 12:
        while started < 12 and slots.may_start(now):
            slots.start(started, now)
            started += 1
        if started < 12:
            wait = slots.next_change(now)
            assert wait is not None
            now += wait
    assert now == pytest.approx(6.0)  # the third window starts at 6 s, ends by 9 s


def test_dial_slots_name_each_stale_dial() -> None:
    slots = DialSlots(window=4, dial_timeout=1.0, limit=8)
    slots.start("old", 0.0)
    slots.start("new", 0.5)
    assert slots.is_stale("old", 1.0) and not slots.is_stale("new", 1.0)
    slots.answered("old")
    assert not slots.is_stale("old", 5.0) and slots.open == 2


def test_relookup_waits_until_stuck_then_spaces_its_lookups() -> None:
    r = Relookup(attempts=2, delay=1.0, now=10.0)
    assert not r.due(10.5, stuck=True)  # too soon after the first lookup
    assert not r.due(20.0, stuck=False)  # something is still worth waiting for
    assert r.next_at() == 11.0 and r.due(11.0, stuck=True)
    r.start()
    assert r.next_at() is None and not r.due(50.0, stuck=True)  # one at a time
    with pytest.raises(RuntimeError):
        r.start()
    r.end(12.0)
    assert r.next_at() == 14.0  # the second: 2 x delay after the first ended
    assert not r.due(13.9, stuck=True) and r.due(14.0, stuck=True)
    r.start()
    r.end(14.5)
    assert r.made == 2 and r.next_at() is None and not r.due(1e9, stuck=True)


def test_relookup_with_no_attempts_never_looks_up() -> None:
    r = Relookup(attempts=0, delay=0.0, now=0.0)
    assert r.next_at() is None and not r.due(100.0, stuck=True)
    with pytest.raises(ValueError):
        Relookup(attempts=-1, delay=1.0, now=0.0)


def test_relookup_news_is_an_address_not_tried_for_that_peer() -> None:
    a, b = ids(2)
    direct = ("203.0.113.2", 4001)
    relay = ("203.0.113.1", 4001, bytes(20))
    other_relay = ("198.51.100.7", 4001, bytes([7]) * 20)
    r = Relookup(attempts=1, delay=1.0, now=0.0)
    assert r.is_news(a, [direct])  # never tried
    r.tried(a, [direct])
    assert not r.is_news(a, [direct])  # the same stale record again
    assert r.is_news(a, [direct, relay])  # it announced a relay since
    assert r.is_news(b, [direct])  # another peer at the same address is another peer
    r.tried(a, [direct, relay])
    assert not r.is_news(a, [direct, relay]) and not r.is_news(a, [relay])
    assert r.is_news(a, [direct, other_relay])
    assert r.is_news(a, [("203.0.113.2", 4002)])  # a new direct address
