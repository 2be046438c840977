"""The download policy, driven by hand: no sockets, no event loop, time as numbers."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.exchange.config import ExchangeConfig
from p2pnode.exchange.picker import Picker
from p2pnode.exchange.policy import (
    Action,
    Decision,
    DownloadPolicy,
    FailureKind,
    PieceOutcome,
    rediscover_delay,
)

CONFIG = replace(
    ExchangeConfig(),
    max_failures=3,
    busy_backoff=0.5,
    busy_backoff_max=3.0,
    busy_give_up=10.0,
    rediscover_attempts=2,
    rediscover_delay=1.0,
)


def make(
    count: int = 8, *, window: int = 4, peers: tuple[str, ...] = ("a", "b"), **config: Any
) -> DownloadPolicy:
    cfg = replace(CONFIG, **config)
    picker = Picker(
        count,
        window=window,
        max_failures=cfg.max_failures,
        endgame_copies=cfg.endgame_copies,
    )
    policy = DownloadPolicy(cfg, picker)
    for peer in peers:
        assert policy.join(peer, None)
    return policy


# -- answers that carry a piece ---------------------------------------------------


def test_ok_accepts_the_piece() -> None:
    policy = make()
    picker = policy.picker
    assert picker.next_requests("a") == [0, 1, 2, 3]
    assert policy.on_piece("a", 0, PieceOutcome.OK) == Decision(Action.ACCEPT)
    assert not picker.is_missing(0)
    assert picker.outstanding("a") == {1, 2, 3}


def test_duplicate_is_ignored_and_frees_the_slot() -> None:
    policy = make()
    picker = policy.picker
    picker.next_requests("a")
    picker.piece_done(None, 2)  # arrived from elsewhere meanwhile
    assert policy.on_piece("a", 2, PieceOutcome.DUPLICATE).action is Action.IGNORE
    assert picker.outstanding("a") == {0, 1, 3}
    # OK for a piece already done (verified before another copy landed) is a duplicate too.
    policy.picker.piece_done(None, 3)
    assert policy.on_piece("a", 3, PieceOutcome.OK).action is Action.IGNORE
    assert picker.outstanding("a") == {0, 1}


def test_bad_piece_bans_the_peer() -> None:
    policy = make()
    picker = policy.picker
    picker.next_requests("a")
    assert policy.on_piece("a", 1, PieceOutcome.BAD).action is Action.BAN
    assert "a" in picker.banned and "a" not in picker.peers
    assert picker.next_requests("b") == [0, 1, 2, 3]  # its pieces went to the others
    assert not policy.join("a", None)  # never again in this download


# -- failures --------------------------------------------------------------------


@pytest.mark.parametrize("kind", [FailureKind.TIMEOUT, FailureKind.REMOTE])
def test_strikes_then_drop_after_max_failures(kind: FailureKind) -> None:
    policy = make(window=4, max_failures=3)
    picker = policy.picker
    picker.next_requests("a")
    assert policy.on_failure("a", 0, kind, 1.0).action is Action.STRIKE
    assert picker.window_of("a") == 2
    assert picker.next_requests("b") == [0, 4, 5, 6]  # retried elsewhere, first
    assert policy.on_failure("a", 1, kind, 2.0).action is Action.STRIKE
    assert policy.on_failure("a", 2, kind, 3.0).action is Action.DROP
    assert "a" not in picker.peers and "a" not in picker.banned
    assert picker.is_missing(3) and picker.requesters(3) == frozenset()


def test_a_piece_between_strikes_resets_them() -> None:
    policy = make(window=4, max_failures=2)
    picker = policy.picker
    picker.next_requests("a")
    assert policy.on_failure("a", 0, FailureKind.TIMEOUT, 1.0).action is Action.STRIKE
    assert policy.on_piece("a", 1, PieceOutcome.OK).action is Action.ACCEPT
    assert policy.on_failure("a", 2, FailureKind.TIMEOUT, 2.0).action is Action.STRIKE
    assert "a" in picker.peers


def test_protocol_violation_bans() -> None:
    policy = make()
    policy.picker.next_requests("a")
    assert policy.on_failure("a", 0, FailureKind.PROTOCOL, 1.0).action is Action.BAN
    assert "a" in policy.picker.banned


@pytest.mark.parametrize("kind", [FailureKind.NOT_FOUND, FailureKind.LIMIT, FailureKind.CONNECTION])
def test_peer_no_use_for_now_is_dropped_not_banned(kind: FailureKind) -> None:
    policy = make()
    picker = policy.picker
    picker.next_requests("a")
    assert policy.on_failure("a", 0, kind, 1.0).action is Action.DROP
    assert "a" not in picker.peers and "a" not in picker.banned
    assert picker.next_requests("b") == [0, 1, 2, 3]
    assert policy.join("a", None)  # a later lookup may bring it back


def test_storage_error_fails_the_download_and_touches_nothing() -> None:
    policy = make()
    picker = policy.picker
    picker.next_requests("a")
    assert policy.on_failure("a", 0, FailureKind.STORAGE, 1.0).action is Action.FAIL
    assert picker.outstanding("a") == {0, 1, 2, 3}


# -- busy --------------------------------------------------------------------------


def test_busy_pauses_with_doubling_backoff_and_no_strike() -> None:
    policy = make(window=8, max_failures=1)
    picker = policy.picker
    picker.next_requests("a")
    first = policy.on_failure("a", 0, FailureKind.BUSY, 100.0)
    assert first == Decision(Action.PAUSE, until=100.5)
    assert policy.pause_left("a", 100.2) == pytest.approx(0.3)
    # Answers to requests sent before the pause do not lengthen it.
    assert policy.on_failure("a", 1, FailureKind.BUSY, 100.1).until == 100.5
    assert "a" in picker.peers  # max_failures=1, yet not dropped: busy is no strike
    assert picker.is_missing(0) and picker.requesters(0) == frozenset()
    # Busy again after the pause: the pause doubles, up to busy_backoff_max.
    assert policy.on_failure("a", 2, FailureKind.BUSY, 100.5).until == 101.5
    assert policy.on_failure("a", 3, FailureKind.BUSY, 101.5).until == 103.5
    assert policy.on_failure("a", 4, FailureKind.BUSY, 103.5).until == 106.5  # capped at 3
    assert policy.pause_left("a", 107.0) <= 0
    assert policy.pause_left("b", 107.0) <= 0


def test_busy_gives_up_after_busy_give_up_without_a_piece() -> None:
    policy = make(window=8, busy_give_up=10.0)
    picker = policy.picker
    picker.next_requests("a")
    assert policy.on_failure("a", 0, FailureKind.BUSY, 0.0).action is Action.PAUSE
    assert policy.on_failure("a", 1, FailureKind.BUSY, 9.9).action is Action.PAUSE
    assert policy.on_failure("a", 2, FailureKind.BUSY, 10.0).action is Action.DROP
    assert "a" not in picker.peers and "a" not in picker.banned
    assert policy.pause_left("a", 10.0) <= 0


def test_a_piece_ends_the_busy_spell() -> None:
    policy = make(window=8, busy_give_up=10.0)
    picker = policy.picker
    picker.next_requests("a")
    policy.on_failure("a", 0, FailureKind.BUSY, 0.0)
    policy.on_failure("a", 1, FailureKind.BUSY, 0.5)  # pause now 1.0, until 1.5
    assert policy.on_piece("a", 2, PieceOutcome.OK).action is Action.ACCEPT
    assert policy.pause_left("a", 1.0) == pytest.approx(0.5)  # the pause still runs out
    # The next spell starts over: the first pause again, and the give-up clock anew.
    assert policy.on_failure("a", 3, FailureKind.BUSY, 9.0).until == 9.5
    assert policy.on_failure("a", 4, FailureKind.BUSY, 18.9).action is Action.PAUSE
    assert policy.on_failure("a", 5, FailureKind.BUSY, 19.0).action is Action.DROP


def test_a_peer_that_leaves_and_returns_starts_afresh() -> None:
    policy = make(window=8)
    policy.picker.next_requests("a")
    policy.on_failure("a", 0, FailureKind.BUSY, 0.0)
    policy.leave("a")
    assert "a" not in policy.picker.peers
    assert policy.pause_left("a", 0.1) <= 0
    assert policy.join("a", None)
    policy.picker.next_requests("a")
    assert policy.on_failure("a", 0, FailureKind.BUSY, 50.0).until == 50.5


# -- no peers left ----------------------------------------------------------------


def test_rediscovery_attempts_then_give_up() -> None:
    policy = make(rediscover_attempts=2, rediscover_delay=1.5)
    assert policy.when_no_peers(0) == Decision(Action.REDISCOVER, delay=1.5)
    assert policy.when_no_peers(1) == Decision(Action.REDISCOVER, delay=3.0)
    assert policy.when_no_peers(2).action is Action.GIVE_UP
    assert rediscover_delay(replace(CONFIG, rediscover_attempts=0), 0) is None


def test_idle_peer_waits_only_while_pieces_may_come_back() -> None:
    policy = make(4, window=4, peers=())
    picker = policy.picker
    assert policy.join("x", {0, 1})
    assert policy.join("y", {1})
    assert picker.next_requests("x") == [0, 1]  # rarest first
    # y is idle: 1 is out to x, and no endgame while 2 and 3 (nobody has them) are pending.
    assert picker.next_requests("y") == []
    assert not picker.can_finish()
    assert policy.keep_waiting()  # x's requests may fail and come back
    assert policy.on_failure("x", 1, FailureKind.TIMEOUT, 1.0).action is Action.STRIKE
    assert picker.next_requests("y") == [1]
    assert policy.on_piece("x", 0, PieceOutcome.OK).action is Action.ACCEPT
    assert policy.keep_waiting()
    assert policy.on_piece("y", 1, PieceOutcome.OK).action is Action.ACCEPT
    assert not policy.keep_waiting()  # nothing out anywhere, and nobody has 2 or 3
    assert policy.join("z", None)
    assert policy.keep_waiting()  # a complete peer: it can finish


# -- endgame with the picker -------------------------------------------------------


def test_endgame_winner_cancels_the_others_and_late_copies_are_ignored() -> None:
    policy = make(3, window=2, endgame_copies=2, peers=("slow", "fast"))
    picker = policy.picker
    assert picker.next_requests("slow") == [0, 1]
    assert picker.next_requests("fast") == [2, 0]
    assert picker.endgame
    assert policy.on_piece("fast", 0, PieceOutcome.OK) == Decision(Action.ACCEPT, cancel=("slow",))
    assert picker.outstanding("slow") == {1}
    # slow's copy arrives anyway (the cancel came too late): nothing changes.
    assert policy.on_piece("slow", 0, PieceOutcome.OK).action is Action.IGNORE
    assert policy.on_piece("slow", 0, PieceOutcome.DUPLICATE).action is Action.IGNORE
    assert picker.outstanding("slow") == {1} and not picker.is_missing(0)


def test_endgame_failure_leaves_the_race_to_the_other_copy() -> None:
    policy = make(2, window=2, endgame_copies=2, peers=("slow", "fast"))
    picker = policy.picker
    assert picker.next_requests("slow") == [0, 1]
    assert picker.next_requests("fast") == [0, 1]
    assert policy.on_failure("slow", 0, FailureKind.TIMEOUT, 1.0).action is Action.STRIKE
    assert picker.requesters(0) == {"fast"}  # still in flight there, not pending
    assert policy.on_failure("slow", 1, FailureKind.BUSY, 1.0).action is Action.PAUSE
    assert picker.requesters(1) == {"fast"}
    assert policy.on_piece("fast", 0, PieceOutcome.OK) == Decision(Action.ACCEPT)
    assert policy.on_piece("fast", 1, PieceOutcome.BAD).action is Action.BAN
    assert picker.is_missing(1) and picker.requesters(1) == frozenset()
    assert picker.next_requests("slow") == [1]


def test_endgame_ban_hands_the_piece_to_the_racer() -> None:
    policy = make(1, window=1, endgame_copies=2, peers=("evil", "good"))
    picker = policy.picker
    assert picker.next_requests("evil") == [0]
    assert picker.next_requests("good") == [0]
    assert policy.on_piece("evil", 0, PieceOutcome.BAD).action is Action.BAN
    assert policy.on_piece("good", 0, PieceOutcome.OK) == Decision(Action.ACCEPT)
    assert picker.done


# -- whatever happens ----------------------------------------------------------------

OUTCOMES = [*PieceOutcome, *FailureKind]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=30),
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2),
            st.sampled_from(OUTCOMES),
            st.integers(min_value=0, max_value=20),
        ),
        max_size=100,
    ),
)
def test_random_outcomes_keep_the_picker_consistent(
    count: int, events: list[tuple[int, PieceOutcome | FailureKind, int]]
) -> None:
    """Any sequence of outcomes leaves the picker consistent, and an honest peer
    that joins afterwards finishes the download."""
    policy = make(count, window=3, peers=("p0", "p1", "p2"), max_failures=2, busy_give_up=5.0)
    picker = policy.picker
    now = 0.0
    for who, outcome, step in events:
        peer = f"p{who}"
        now += step / 4
        if policy.pause_left(peer, now) <= 0:
            picker.next_requests(peer)
        out = sorted(picker.outstanding(peer))
        if not out:
            continue
        index = out[step % len(out)]
        if isinstance(outcome, PieceOutcome):
            decision = policy.on_piece(peer, index, outcome)
            for other in decision.cancel:
                picker.piece_done(other, index)  # the shell cancels; the request ends
        else:
            decision = policy.on_failure(peer, index, outcome, now)
        if decision.action in (Action.DROP, Action.BAN):
            assert peer not in picker.peers
        if decision.action is Action.BAN:
            assert peer in picker.banned
        for p in picker.peers:
            assert len(picker.outstanding(p)) <= 3
            for i in picker.outstanding(p):
                assert p in picker.requesters(i) and picker.is_missing(i)
    assert policy.join("honest", None)
    for _ in range(count * 2 + 5):
        if picker.done:
            break
        for i in picker.next_requests("honest"):
            policy.on_piece("honest", i, PieceOutcome.OK)
        for p in list(picker.peers):
            if p != "honest":
                policy.leave(p)
    assert picker.done
