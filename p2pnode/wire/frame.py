"""Length-prefixed framing: pure, no I/O.

Rules
-----
- A frame is a big-endian unsigned length (4 bytes for frames, 2 bytes for the
  secure channel's chunks) followed by exactly that many payload bytes.
- A length above the decoder's maximum raises :class:`LimitExceeded` as soon as
  the header is complete, before any payload is buffered. A zero length is a
  valid (empty) frame; what an empty payload means is the next layer's concern.
- The decoder accepts its input in any split: whole, one byte at a time or in
  random pieces give the same frames in the same order.
- After raising, a decoder is dead: every later call raises the same error.
- Two ways to feed it:

  * :meth:`PrefixDecoder.feed` takes bytes and returns owned ``bytes`` (safe,
    copies each frame once);
  * :meth:`PrefixDecoder.get_buffer` / :meth:`PrefixDecoder.buffer_updated`
    mirror ``asyncio.BufferedProtocol``: the socket is read straight into the
    decoder's memory (into the frame's own buffer for large frames, so a
    1 MiB payload is never copied by us), and frames come back as
    ``memoryview`` objects that stay valid only until the next
    ``get_buffer()``/``release()`` call. :meth:`PrefixDecoder.feed_views` is
    the same zero-copy contract for data that arrives in other buffers.

  Body buffers are pooled and reused, so a steady stream of large frames does
  not allocate (and page-fault) a fresh buffer per frame. A view of an item
  is a lease on its body (see ``p2pnode.wire.buffers``): a body is reused
  only once no view of it is alive, so a view of an item that sat in its own
  body buffer (:meth:`PrefixDecoder.stable`) may be kept past the next
  ``get_buffer()``, e.g. handed to a worker thread, without a copy; dropping
  it (or ``memoryview.release()``) gives the body back. Views into the read
  scratch are never stable.
- A large body (``ALIGN_MIN`` bytes or more) ends on a page boundary, so a
  trailing blob whose length is a multiple of the page size (a piece) starts on
  one: the disk writer hands it to ``O_DIRECT`` as is.
- A body grows as its bytes arrive: a header announcing a large item costs
  ``GROW_START`` bytes, not the announced length (a peer sending headers alone
  would otherwise make us hold ``max_len`` per connection). The buffer grows
  fourfold, then to the whole length once it would cover half of it, so a
  fresh 4 MiB body is copied about 1.3 MiB on the way; a pooled body (a
  steady stream) is taken whole, with no growth. :attr:`PrefixDecoder.held`
  is the memory the decoder holds now.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from p2pnode.errors import LimitExceeded, ProtocolError
from p2pnode.wire.buffers import ALIGN_MIN, Buffer, body_view, new_body, take_free

__all__ = [
    "ALIGN_MIN",
    "CHUNK_HEADER",
    "FRAME_HEADER",
    "MAX_FRAME_LIMIT",
    "Buffer",
    "FrameDecoder",
    "PrefixDecoder",
    "encode_frame",
    "frame_header",
    "join_frames",
]

FRAME_HEADER = struct.Struct(">I")
CHUNK_HEADER = struct.Struct(">H")
MAX_FRAME_LIMIT = 0xFFFFFFFF

_DEFAULT_SCRATCH = 256 * 1024
_DIRECT_THRESHOLD = 64 * 1024
# Body buffers kept for reuse, oldest first. Twice the usual requests in
# flight: each request's consumer typically holds the last answer's body while
# the next one arrives, so fewer meant a fresh (zero-filled) body per frame. A
# quiet connection gives them back (trim).
_POOL_KEEP = 16
_INITIAL_SCRATCH = 64 * 1024
# A body announced larger than this starts at this size and grows with its bytes.
GROW_START = 64 * 1024


def frame_header(length: int) -> bytes:
    """The 4-byte header of a frame whose payload is ``length`` bytes."""
    if not 0 <= length <= MAX_FRAME_LIMIT:
        raise ValueError(f"frame length out of range: {length}")
    return FRAME_HEADER.pack(length)


def encode_frame(payload: Buffer) -> bytes:
    """A whole frame as one bytes object (copies; use ``frame_header`` to scatter)."""
    return frame_header(len(payload)) + bytes(payload)


class PrefixDecoder:
    """Splits a byte stream into length-prefixed items (see the module rules)."""

    def __init__(
        self,
        max_len: int,
        *,
        header: struct.Struct = FRAME_HEADER,
        what: str = "frame",
        scratch_size: int = _DEFAULT_SCRATCH,
        direct_threshold: int = _DIRECT_THRESHOLD,
    ) -> None:
        if max_len < 0:
            raise ValueError("max_len must be >= 0")
        self.max_len = max_len
        self._hdr = header
        self._hsize = header.size
        self._what = what
        self._header = bytearray(self._hsize)
        self._hfill = 0
        # Body of the item being assembled: _need >= 0 while in a body.
        self._need = -1
        self._fill = 0
        self._body: bytearray | None = None
        self._body_view: memoryview | None = None
        self._cap = 0  # writable length of _body_view (== _need once grown)
        self._pool: list[bytearray] = []
        self._pool_bytes = 0
        self._lent: list[bytearray] = []
        # Read buffer: allocated on first use, small while reads are small,
        # doubled (up to scratch_size) whenever a read fills it; see trim().
        self._scratch_max = max(scratch_size, self._hsize, 1)
        self._scratch: memoryview | None = None
        self._direct_threshold = direct_threshold
        self._direct = False
        self._failed: ProtocolError | None = None

    # -- public API --------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete header or item."""
        return self._hfill + (self._fill if self._need >= 0 else 0)

    @property
    def held(self) -> int:
        """Bytes of memory this decoder holds now: the body being filled, the read
        buffer and pooled bodies (lent ones belong to whoever holds their views)."""
        return self._pool_bytes + self.receiving

    @property
    def receiving(self) -> int:
        """Bytes held for what is being received: the body being filled and the read
        buffer (pooled bodies are memory kept for speed, given back by trim)."""
        n = len(self._body) if self._body is not None else 0
        if self._scratch is not None:
            n += len(self._scratch)
        return n

    @property
    def at_boundary(self) -> bool:
        """True when no partial header or item is buffered."""
        return self._hfill == 0 and self._need < 0

    def feed(self, data: Buffer) -> list[bytes]:
        """Consume ``data``; return every item completed, as owned bytes."""
        items, _ = self._consume(memoryview(data).cast("B"), None)
        out = [bytes(item) for item in items]
        self.release()
        return out

    def feed_views(self, data: Buffer) -> list[memoryview]:
        """Zero-copy :meth:`feed`: views valid until the next ``get_buffer``/``release``."""
        items, _ = self._consume(memoryview(data).cast("B"), None)
        return items

    def feed_one(self, data: memoryview) -> tuple[memoryview | None, int]:
        """Consume ``data`` up to and including the first complete item.

        Returns ``(item or None, bytes consumed)``; the caller hands the rest to
        whoever reads the stream next (a protocol switch after a handshake).
        """
        items, used = self._consume(data, 1)
        return (items[0] if items else None), used

    def release(self) -> None:
        """Declare every view handed out so far dead; their buffers get reused (each
        once no view of it is alive any more: see :meth:`stable`)."""
        if self._lent:
            pool = self._pool
            pool.extend(self._lent)
            self._lent.clear()
            del pool[:-_POOL_KEEP]  # the oldest go (no probing: see take_free)
            self._pool_bytes = sum(map(len, pool))

    def stable(self, item: memoryview) -> bool:
        """Whether ``item`` (an item just handed out) may be kept past the next
        ``get_buffer()``/``release()``: it lives in its own body buffer, which is not
        reused while a view of it is alive, or in immutable bytes. Items in the read scratch
        (or in a caller's buffer) are not."""
        obj = item.obj
        if type(obj) is bytes:
            return True
        return any(obj is buf for buf in self._lent)

    def get_buffer(self) -> memoryview:
        """Memory to receive into (``BufferedProtocol.get_buffer``); never empty."""
        self._check()
        self.release()
        if self._need >= 0 and self._need - self._fill >= self._direct_threshold:
            if self._cap == self._fill:
                self._grow(self._fill + 1)
            assert self._body_view is not None
            self._direct = True
            return self._body_view[self._fill : self._cap]
        self._direct = False
        if self._scratch is None:
            self._scratch = memoryview(bytearray(min(_INITIAL_SCRATCH, self._scratch_max)))
        return self._scratch

    def buffer_updated(self, nbytes: int) -> list[memoryview]:
        """``nbytes`` were written into the last buffer; return completed items."""
        self._check()
        if self._direct:
            self._direct = False
            self._fill += nbytes
            if self._fill < self._need:
                return []
            return [self._finish_body()]
        scratch = self._scratch
        assert scratch is not None
        items, _ = self._consume(scratch[:nbytes], None)
        if nbytes == len(scratch) and nbytes < self._scratch_max:
            # The socket had more: read more per call from now on. The items
            # handed out still reference the old buffer, which stays alive.
            self._scratch = memoryview(bytearray(min(2 * nbytes, self._scratch_max)))
        return items

    def trim(self) -> None:
        """Give back idle memory: pooled bodies and the read buffer.

        Call between reads only (views handed out earlier become invalid).
        """
        self.release()
        self._pool.clear()
        self._pool_bytes = 0
        self._scratch = None

    def reserve(self, n: int) -> memoryview | None:
        """Inside an item with at least ``n`` bytes to go: where they belong.

        Lets a caller that produces the stream (a decryptor) write straight
        into the item's buffer; follow with :meth:`commit`. None otherwise.
        """
        if self._failed is not None or self._need < 0 or self._need - self._fill < n:
            return None
        if self._cap - self._fill < n:
            self._grow(self._fill + n)
        assert self._body_view is not None
        return self._body_view[self._fill : self._fill + n]

    def commit(self, n: int) -> list[memoryview]:
        """``n`` bytes were written into the last :meth:`reserve` view."""
        self._fill += n
        if self._fill < self._need:
            return []
        return [self._finish_body()]

    # -- internals ---------------------------------------------------------

    def _check(self) -> None:
        if self._failed is not None:
            raise self._failed

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self._failed = exc
        return exc

    def _take_body(self, length: int) -> None:
        """Pick a free buffer of adequate size for an item of ``length`` bytes."""
        chosen = take_free(self._pool, length)  # one no view of is alive
        if chosen is not None:
            self._pool_bytes -= len(chosen)
        else:
            if length > GROW_START:
                self._body = bytearray(GROW_START)  # grows with the bytes: see the rules
                self._body_view = memoryview(self._body)
                self._cap = GROW_START
                return
            chosen = new_body(length)
        self._body = chosen
        self._body_view = body_view(chosen, length)
        self._cap = length

    def _grow(self, at_least: int) -> None:
        """Room for ``at_least`` bytes of the body being filled (see the rules)."""
        need = self._need
        cap = max(at_least, self._cap * 4)
        old = self._body_view
        assert old is not None
        if cap * 2 > need:
            body = new_body(need)
            view = body_view(body, need)
            cap = need
        else:
            body = bytearray(cap)
            view = memoryview(body)
        view[: self._fill] = old[: self._fill]
        self._body = body
        self._body_view = view
        self._cap = cap

    def _finish_body(self) -> memoryview:
        assert self._body is not None and self._body_view is not None
        item = self._body_view[: self._need]
        self._lent.append(self._body)
        self._body = None
        self._body_view = None
        self._cap = 0
        self._need = -1
        self._fill = 0
        return item

    def _consume(self, view: memoryview, limit: int | None) -> tuple[list[memoryview], int]:
        self._check()
        out: list[memoryview] = []
        pos = 0
        n = len(view)
        hsize = self._hsize
        while pos < n and (limit is None or len(out) < limit):
            if self._need < 0:
                if self._hfill == 0 and n - pos >= hsize:
                    (length,) = self._hdr.unpack_from(view, pos)
                    pos += hsize
                else:
                    take = min(hsize - self._hfill, n - pos)
                    self._header[self._hfill : self._hfill + take] = view[pos : pos + take]
                    self._hfill += take
                    pos += take
                    if self._hfill < hsize:
                        break
                    (length,) = self._hdr.unpack_from(self._header, 0)
                    self._hfill = 0
                if length > self.max_len:
                    raise self._fail(
                        LimitExceeded(
                            f"{self._what} of {length} bytes exceeds the limit of "
                            f"{self.max_len} bytes"
                        )
                    )
                if n - pos >= length:
                    # Whole item inside the input: hand out a view, no copy.
                    out.append(view[pos : pos + length])
                    pos += length
                    continue
                self._need = length
                self._fill = 0
                self._take_body(length)
            take = min(self._need - self._fill, n - pos)
            if self._cap - self._fill < take:
                self._grow(self._fill + take)
            assert self._body_view is not None
            self._body_view[self._fill : self._fill + take] = view[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self._need:
                out.append(self._finish_body())
        return out, pos


class FrameDecoder(PrefixDecoder):
    """4-byte big-endian length-prefixed frames, at most ``max_frame`` bytes each."""

    def __init__(self, max_frame: int, *, scratch_size: int = _DEFAULT_SCRATCH) -> None:
        if not 0 <= max_frame <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame out of range: {max_frame}")
        super().__init__(max_frame, header=FRAME_HEADER, what="frame", scratch_size=scratch_size)


def join_frames(payloads: Sequence[Buffer]) -> bytes:
    """Several frames back to back (a test and tooling helper)."""
    return b"".join(encode_frame(p) for p in payloads)
