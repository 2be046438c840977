"""Reusable buffers: page-aligned bodies, pools, and explicit leases. Pure, no I/O.

Rules
-----
- A lease on a pooled buffer is a buffer export: every ``memoryview`` of it
  (and every slice or cast of one) holds it until released, by
  ``memoryview.release()`` or by being dropped. A pool hands a buffer out again
  only once it has no export left. The check is exact, not a reference count:
  a ``bytearray`` cannot be resized while exported, so :func:`exported`
  probes that. An unreleased view means the buffer is not reused (it is freed
  with its last view), never that it is overwritten under the view; and no
  consumer has a release call to forget (a forgotten one would cost a fresh
  allocation per frame on the data path).
- Hand out views, not the ``bytearray`` itself: holding the object without a
  view does not keep it from reuse.
- A large body (``ALIGN_MIN`` bytes or more) gets a page of slack and is
  placed to end on a page boundary, so a trailing blob whose length is a
  multiple of the page size (a piece) starts on one: the disk writer hands it
  to ``O_DIRECT`` as is. Plain bytearrays: malloc reuses freed heap memory,
  where fresh mmaps would be page-faulted anew for every large frame.
"""

from __future__ import annotations

import ctypes
import mmap
import threading

Buffer = bytes | bytearray | memoryview

ALIGN_MIN = 64 * 1024
PAGE = mmap.PAGESIZE


def buffer_address(buf: bytearray | memoryview) -> int:
    """Where a writable buffer's first byte sits in memory (for alignment checks)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def exported(buf: bytearray) -> bool:
    """Whether a view of ``buf`` is alive (``buf`` must not be empty).

    Shrinking a bytearray with exports raises ``BufferError`` before changing
    anything; without exports, dropping and re-adding the last byte stays
    within the allocation (a buffer of two bytes or more neither moves nor
    changes).
    """
    last = buf[-1]
    try:
        del buf[-1:]
    except BufferError:
        return True
    buf.append(last)
    return False


def take_free(pool: list[bytearray], size: int) -> bytearray | None:
    """Pop a free buffer of ``size`` to about twice that from ``pool``, if any."""
    for i in range(len(pool)):
        buf = pool[i]
        if size <= len(buf) <= 2 * size + 65536 and not exported(buf):
            del pool[i]
            return buf
    return None


def new_body(length: int) -> bytearray:
    """A buffer for a ``length``-byte body (with a page of slack if large)."""
    return bytearray(length + PAGE if length >= ALIGN_MIN else length)


def body_view(buf: bytearray, length: int) -> memoryview:
    """``length`` bytes of ``buf`` ending on a page boundary when there is room."""
    view = memoryview(buf)
    if length >= ALIGN_MIN:
        addr = buffer_address(buf)
        start = ((addr + len(buf)) & ~(PAGE - 1)) - addr - length
        if start >= 0:
            return view[start : start + length]
    return view[:length]


class BufferPool:
    """Reusable bytearrays for large, short-lived buffers (a piece read off disk, a
    sealed frame): fresh multi-megabyte allocations are mmapped and page-faulted
    every time. :meth:`get` hands out a buffer that stays lent while any view of
    it is alive (see the module rules): the caller passes views on (to a
    transport, say) and has nothing to release. Thread-safe.
    """

    def __init__(self, keep: int = 8) -> None:
        self._keep = keep
        self._items: list[bytearray] = []
        self._lock = threading.Lock()

    def view(self, size: int) -> memoryview:
        """A view of ``size`` bytes (contents undefined), taken under the lock so
        no other thread can be handed the same buffer. The buffer is reused once
        this view and every view made from it are gone."""
        with self._lock:
            return memoryview(self._get(size))[:size]

    def get(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes (at most about twice that); contents
        undefined. One thread only: take a view at once (it is what keeps the
        buffer lent). Threads share a pool through :meth:`view`."""
        with self._lock:
            return self._get(size)

    def _get(self, size: int) -> bytearray:
        items = self._items
        for i in range(len(items)):
            buf = items[i]
            if size <= len(buf) <= 2 * size + 65536 and not exported(buf):
                return buf
        buf = bytearray(max(size, 1))
        items.append(buf)
        if len(items) > self._keep:
            del items[0]
        return buf

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
