"""The piece picker, driven by hand: no sockets, time passed in as numbers."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.exchange.picker import Picker


def test_fills_window_without_duplicates() -> None:
    p = Picker(20, window=4)
    p.add_peer("a")
    p.add_peer("b")
    a = p.next_requests("a")
    b = p.next_requests("b")
    assert a == [0, 1, 2, 3]
    assert b == [4, 5, 6, 7]
    assert p.next_requests("a") == []  # window full
    assert p.piece_done("a", 0) == []
    assert p.next_requests("a") == [8]


def test_done_pieces_skipped_and_resume() -> None:
    p = Picker(5, done=[0, 1, 3], window=8)
    p.add_peer("a")
    assert p.next_requests("a") == [2, 4]
    p.piece_done("a", 2)
    p.piece_done("a", 4)
    assert p.done


def test_rarest_first_with_partial_peers() -> None:
    p = Picker(6, window=2)
    p.add_peer("full")
    p.add_peer("x", have=[0, 1, 2, 3])
    p.add_peer("y", have=[0, 1, 2])
    # Piece 4 and 5: only "full" has them; 3: full + x; 0-2: three peers.
    assert p.next_requests("full") == [4, 5]
    assert p.next_requests("x") == [3, 0]
    assert p.next_requests("y") == [1, 2]


def test_partial_peer_only_gets_what_it_has() -> None:
    p = Picker(4, window=4)
    p.add_peer("x", have=[1, 3])
    assert p.next_requests("x") == [1, 3]
    assert not p.can_finish()


def test_failed_peer_pieces_move_to_others() -> None:
    p = Picker(6, window=3, max_failures=2)
    p.add_peer("a")
    p.add_peer("b")
    assert p.next_requests("a") == [0, 1, 2]
    assert p.next_requests("b") == [3, 4, 5]
    assert p.request_failed("a", 0) is False
    assert p.window_of("a") == 1
    p.piece_done("b", 3)
    # Piece 0 is pending again; b takes it before anything else.
    assert p.next_requests("b") == [0]
    assert p.request_failed("a", 1) is True  # second strike: dropped
    assert "a" not in p.peers
    assert p.next_requests("b") == []  # b's window is full (4, 5, 0)
    p.piece_done("b", 4)
    assert p.next_requests("b") == [1]


def test_dropped_peer_returns_pieces() -> None:
    p = Picker(4, window=4)
    p.add_peer("a")
    p.add_peer("b")
    assert p.next_requests("a") == [0, 1, 2, 3]
    assert sorted(p.drop_peer("a")) == [0, 1, 2, 3]
    assert p.next_requests("b") == [0, 1, 2, 3]


def test_success_regrows_window() -> None:
    p = Picker(10, window=4)
    p.add_peer("a")
    p.next_requests("a")
    p.request_failed("a", 0)
    assert p.window_of("a") == 2
    p.piece_done("a", 1)
    assert p.window_of("a") == 3


def test_endgame_races_last_pieces_and_reports_duplicates() -> None:
    p = Picker(3, window=2, endgame_copies=2)
    p.add_peer("slow")
    p.add_peer("fast")
    assert p.next_requests("slow") == [0, 1]
    # Piece 2 was the last pending one; fast's spare slot races slow's piece 0.
    assert p.next_requests("fast") == [2, 0]
    assert p.endgame
    p.piece_done("fast", 2)
    assert p.next_requests("fast") == [1]
    assert p.requesters(0) == {"slow", "fast"}
    # fast delivers 0 first: slow's request for 0 is the one to cancel.
    assert p.piece_done("fast", 0) == ["slow"]
    assert p.outstanding("slow") == {1}
    # slow's late copy of 0 is a duplicate: nothing to cancel, nothing changes.
    assert p.piece_done("slow", 0) == []
    assert p.piece_done("slow", 1) == ["fast"]
    assert p.done


def test_endgame_copies_limit() -> None:
    p = Picker(1, window=4, endgame_copies=2)
    for peer in "abc":
        p.add_peer(peer)
    assert p.next_requests("a") == [0]
    assert p.next_requests("b") == [0]
    assert p.next_requests("c") == []


def test_bad_peer_banned_and_excluded() -> None:
    p = Picker(4, window=2)
    p.add_peer("evil")
    p.add_peer("good")
    assert p.next_requests("evil") == [0, 1]
    assert sorted(p.ban_peer("evil")) == [0, 1]
    assert "evil" in p.banned
    assert p.add_peer("evil") is False
    assert p.next_requests("evil") == []
    assert p.next_requests("good") == [0, 1]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=40),
    st.lists(
        st.tuples(
            st.sampled_from(["req", "ok", "fail", "busy", "bad", "drop", "add"]),
            st.integers(min_value=0, max_value=3),
            st.integers(min_value=0, max_value=50),
        ),
        max_size=120,
    ),
)
def test_random_schedules_keep_invariants(count: int, ops: list[tuple[str, int, int]]) -> None:
    """Whatever happens, a download with one honest peer left always finishes."""
    p = Picker(count, window=3, max_failures=2)
    names = ["p0", "p1", "p2", "p3"]
    for name in names:
        p.add_peer(name)
    for op, who, arg in ops:
        peer = names[who]
        if op == "req":
            got = p.next_requests(peer)
            assert len(set(got)) == len(got)
            assert all(i in p.missing for i in got)
        elif op == "ok":
            out = sorted(p.outstanding(peer))
            if out:
                p.piece_done(peer, out[arg % len(out)])
        elif op == "fail":
            out = sorted(p.outstanding(peer))
            if out:
                p.request_failed(peer, out[arg % len(out)])
        elif op == "busy":
            out = sorted(p.outstanding(peer))
            if out:
                p.request_refused(peer, out[arg % len(out)])
        elif op == "bad":
            p.ban_peer(peer)
        elif op == "drop":
            p.drop_peer(peer)
        else:
            p.add_peer(peer)
        for n in p.peers:
            assert len(p.outstanding(n)) <= 3
            for i in p.outstanding(n):
                assert n in p.requesters(i)
    # An honest newcomer finishes what is left.
    p.add_peer("honest")
    for _ in range(count * 4 + 10):
        if p.done:
            break
        for i in p.next_requests("honest"):
            p.piece_done("honest", i)
        for n in list(p.peers):
            if n != "honest":
                p.drop_peer(n)
    assert p.done


def test_busy_is_not_a_strike() -> None:
    p = Picker(4, window=4, max_failures=1)
    p.add_peer("a")
    assert p.next_requests("a") == [0, 1, 2, 3]
    for i in range(4):
        p.request_refused("a", i)
    assert "a" in p.peers and p.window_of("a") == 1
    assert p.next_requests("a") == [0]
