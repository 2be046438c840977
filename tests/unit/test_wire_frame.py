"""Frame codec tests (pure, in memory).

Rules for this module: every input is also fed one byte at a time and in
random splits; random bytes may only ever raise ProtocolError subclasses.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.errors import LimitExceeded, ProtocolError
from p2pnode.wire.buffers import PAGE, BufferPool, buffer_address, exported
from p2pnode.wire.frame import (
    CHUNK_HEADER,
    GROW_START,
    FrameDecoder,
    PrefixDecoder,
    encode_frame,
    frame_header,
    join_frames,
)

PAYLOADS = [b"", b"a", b"hello world", bytes(range(256)) * 5]


def feed_split(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list[bytes]:
    frames: list[bytes] = []
    pos = 0
    for cut in sorted(set(cuts)):
        frames += decoder.feed(data[pos:cut])
        pos = cut
    frames += decoder.feed(data[pos:])
    return frames


def feed_buffered(decoder: PrefixDecoder, data: bytes, sizes: list[int]) -> list[bytes]:
    """Mimic asyncio's BufferedProtocol: recv_into(get_buffer()) in random sizes."""
    frames: list[bytes] = []
    view = memoryview(data)
    i = 0
    while view:
        buf = decoder.get_buffer()
        assert len(buf) > 0
        want = sizes[i % len(sizes)] if sizes else len(view)
        i += 1
        n = max(1, min(len(buf), len(view), want))
        buf[:n] = view[:n]
        view = view[n:]
        # copy now: views are only valid until the next get_buffer()
        frames += [bytes(f) for f in decoder.buffer_updated(n)]
    return frames


def test_encode_frame_layout() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    assert frame_header(70000) == struct.pack(">I", 70000)
    with pytest.raises(ValueError):
        frame_header(-1)


def test_whole_and_one_byte_at_a_time() -> None:
    data = join_frames(PAYLOADS)
    assert FrameDecoder(10_000).feed(data) == PAYLOADS
    decoder = FrameDecoder(10_000)
    frames: list[bytes] = []
    for i in range(len(data)):
        frames += decoder.feed(data[i : i + 1])
    assert frames == PAYLOADS
    assert decoder.at_boundary


def test_partial_frame_is_buffered() -> None:
    decoder = FrameDecoder(100)
    assert decoder.feed(b"\x00\x00\x00\x05ab") == []
    assert not decoder.at_boundary
    assert decoder.buffered == 2
    assert decoder.feed(b"cde\x00") == [b"abcde"]
    assert decoder.buffered == 1


def test_oversize_raises_at_header_and_decoder_stays_dead() -> None:
    decoder = FrameDecoder(10)
    with pytest.raises(LimitExceeded, match="11 bytes exceeds the limit of 10"):
        decoder.feed(b"\x00\x00\x00\x0b")
    with pytest.raises(LimitExceeded):
        decoder.feed(b"\x00\x00\x00\x01x")
    with pytest.raises(LimitExceeded):
        decoder.get_buffer()


def test_max_frame_exactly_allowed() -> None:
    assert FrameDecoder(3).feed(encode_frame(b"abc")) == [b"abc"]
    assert FrameDecoder(0).feed(encode_frame(b"")) == [b""]


def test_large_frames_buffered_use_direct_reads_and_reuse() -> None:
    big = [bytes([i]) * (300_000 + i) for i in range(5)]
    data = join_frames([b"x", *big, b"y"])
    decoder = FrameDecoder(1 << 20)
    assert feed_buffered(decoder, data, [1 << 20]) == [b"x", *big, b"y"]
    decoder = FrameDecoder(1 << 20)
    assert feed_buffered(decoder, data, [7, 70_000, 3, 100_000]) == [b"x", *big, b"y"]


def test_views_of_earlier_frames_survive_within_one_call() -> None:
    # Two body-buffered frames complete in one feed_views call: the second must
    # not overwrite the first (pooled buffers are reused only after release()).
    a, b, c = b"A" * 1000, b"B" * 1000, b"C" * 1000
    data = join_frames([a, b, c])
    decoder = FrameDecoder(10_000)
    first = decoder.feed_views(data[:10])
    assert first == []
    views = decoder.feed_views(data[10:2010]) + decoder.feed_views(data[2010:])
    assert [bytes(v) for v in views] == [a, b, c]


def test_chunk_decoder_limit() -> None:
    decoder = PrefixDecoder(0xFFFF, header=CHUNK_HEADER, what="chunk")
    assert decoder.feed(b"\x00\x02hi") == [b"hi"]
    small = PrefixDecoder(4, header=CHUNK_HEADER, what="chunk")
    with pytest.raises(LimitExceeded, match="chunk of 5 bytes"):
        small.feed(b"\x00\x05")


def test_feed_one_stops_after_first_item() -> None:
    data = join_frames([b"one", b"two"])
    decoder = FrameDecoder(100)
    item, used = decoder.feed_one(memoryview(data))
    assert item is not None and bytes(item) == b"one"
    assert used == 7
    assert decoder.feed(data[used:]) == [b"two"]


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=3000), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=30_000), max_size=20),
)
def test_any_split_gives_same_frames(payloads: list[bytes], cuts: list[int]) -> None:
    data = join_frames(payloads)
    cuts = [c for c in cuts if c <= len(data)]
    assert feed_split(FrameDecoder(4000), data, cuts) == payloads


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=5000), max_size=6),
    sizes=st.lists(st.integers(min_value=1, max_value=9000), min_size=1, max_size=10),
)
def test_buffered_any_split(payloads: list[bytes], sizes: list[int]) -> None:
    decoder = PrefixDecoder(6000, scratch_size=4096, direct_threshold=1024)
    assert feed_buffered(decoder, join_frames(payloads), sizes) == payloads


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2000), step=st.integers(min_value=1, max_value=64))
def test_random_bytes_only_protocol_errors(data: bytes, step: int) -> None:
    decoder = FrameDecoder(512)
    try:
        for i in range(0, len(data), step):
            for frame in decoder.feed(data[i : i + step]):
                assert len(frame) <= 512
    except ProtocolError:
        pass


def test_a_kept_view_of_a_body_is_not_overwritten_but_a_dropped_one_is_reused() -> None:
    decoder = FrameDecoder(1 << 20)
    size = 200_000
    frames = [bytes([i]) * size for i in range(6)]
    data = join_frames(frames)
    kept: list[memoryview] = []
    seen: list[int] = []

    def receive(n: int) -> None:
        for item in decoder.buffer_updated(n):
            assert decoder.stable(item)
            seen.append(id(item.obj))
            if not kept:
                kept.append(item)  # held past get_buffer: its buffer must not be reused

    pos = 0
    while pos < len(data):
        buf = decoder.get_buffer()
        n = min(len(buf), len(data) - pos, 50_000)
        buf[:n] = data[pos : pos + n]
        pos += n
        receive(n)
    assert bytes(kept[0]) == frames[0]
    assert seen[0] not in seen[1:]  # the held buffer was never handed out again
    assert len(set(seen[1:])) < len(seen) - 1  # the others were reused


def test_views_of_the_read_scratch_are_not_stable() -> None:
    decoder = FrameDecoder(1 << 20)
    data = join_frames([b"small"])
    buf = decoder.get_buffer()
    buf[: len(data)] = data
    (item,) = decoder.buffer_updated(len(data))
    assert bytes(item) == b"small" and not decoder.stable(item)
    (owned,) = decoder.feed_views(bytes(join_frames([b"in bytes"])))
    assert decoder.stable(owned)


def test_buffer_pool_reuses_only_unreferenced_buffers() -> None:
    pool = BufferPool(keep=4)
    first = pool.get(100_000)
    assert len(first) >= 100_000
    view = memoryview(first)[:10]
    second = pool.get(100_000)
    assert second is not first  # a view of the first is alive
    del view, first
    third = pool.get(100_000)
    assert third is not second and len(third) >= 100_000  # the first, free again
    assert pool.get(10) is not third  # much smaller requests get their own buffer


def test_exported_is_exact_and_keeps_the_buffer_in_place() -> None:
    buf = bytearray(b"abcdef")
    view = memoryview(buf)[2:4]
    derived = view[1:]
    del view
    assert exported(buf)  # a slice of a dropped view still holds the buffer
    derived.release()
    assert not exported(buf)
    assert buf == b"abcdef"  # the probe left it as it was
    addr = buffer_address(buf)
    for _ in range(3):
        assert not exported(buf)
    assert buffer_address(buf) == addr and len(buf) == 6


def receive_views(decoder: PrefixDecoder, data: bytes, step: int) -> list[memoryview]:
    """Read ``data`` in through get_buffer, keeping the views handed out."""
    out: list[memoryview] = []
    pos = 0
    while pos < len(data):
        buf = decoder.get_buffer()
        n = min(len(buf), len(data) - pos, step)
        buf[:n] = data[pos : pos + n]
        pos += n
        out += decoder.buffer_updated(n)
    return out


def test_a_released_view_gives_its_body_back() -> None:
    decoder = FrameDecoder(1 << 20)
    frame = join_frames([bytes(200_000)])
    (first,) = receive_views(decoder, frame, 50_000)
    assert decoder.stable(first)
    body = first.obj
    (second,) = receive_views(decoder, frame, 50_000)
    assert second.obj is not body  # a view of the first is alive: not reused
    first.release()  # an explicit release (dropping the view does the same)
    (third,) = receive_views(decoder, frame, 50_000)
    assert third.obj is body


def test_buffer_pool_views_are_leases() -> None:
    pool = BufferPool(keep=4)
    a = pool.view(100_000)
    b = pool.view(100_000)
    assert a.obj is not b.obj and len(a) == 100_000
    base = a.obj
    del a
    c = pool.view(90_000)
    assert c.obj is base and len(c) == 90_000


def test_an_announced_body_is_not_allocated_up_front() -> None:
    """A header announcing max_len and a few bytes cost GROW_START, not max_len."""
    decoder = FrameDecoder(4 << 20)
    assert decoder.feed(frame_header(4 << 20) + b"abc") == []
    assert decoder.buffered == 3
    assert decoder.held <= GROW_START + 256 * 1024  # the body started small, plus the read buffer
    decoder = FrameDecoder(4 << 20)
    buf = decoder.get_buffer()
    header = frame_header(4 << 20) + b"abc"
    buf[: len(header)] = header
    assert decoder.buffer_updated(len(header)) == []
    assert decoder.held < 256 * 1024


@pytest.mark.parametrize("sizes", [[1 << 20], [7, 70_000, 3, 100_000], [65_536], [1_000_003]])
def test_bodies_grow_to_the_whole_item_in_any_split(sizes: list[int]) -> None:
    big = [bytes([i]) * ((4 << 20) - i) for i in range(3)] + [bytes(300_000)]
    data = join_frames([b"x", *big, b"y"])
    assert feed_buffered(FrameDecoder(4 << 20), data, sizes) == [b"x", *big, b"y"]
    assert feed_split(FrameDecoder(4 << 20), data, [5, 70_000, 1 << 20, 3 << 20]) == [
        b"x",
        *big,
        b"y",
    ]


def test_reserve_grows_the_body_and_the_whole_body_is_page_aligned() -> None:
    length = (2 << 20) + 4096
    payload = bytes(range(256)) * (length // 256)
    decoder = FrameDecoder(4 << 20)
    assert decoder.feed_views(frame_header(length) + payload[:10]) == []
    pos = 10
    items: list[memoryview] = []
    while not items:
        n = min(50_000, length - pos)
        dest = decoder.reserve(n)
        assert dest is not None and len(dest) == n
        dest[:] = payload[pos : pos + n]
        pos += n
        items = decoder.commit(n)
    (item,) = items
    assert bytes(item) == payload
    assert (buffer_address(item) + len(item)) % PAGE == 0
