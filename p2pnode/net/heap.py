"""Give freed heap memory back to the system (glibc ``malloc_trim``), where there is one.

After many connections close, their buffers are free but glibc keeps the pages
(the freed blocks sit between live ones, and its mmap threshold has grown past
their size), so the process's RSS stays at its peak. ``malloc_trim(0)`` returns
whole free pages anywhere in the heap. It scans the heap (about a millisecond
per 100 MiB), so the host calls it rarely: once, a second after a burst of
closed connections.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

__all__ = ["trim_heap"]


def _load() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    return fn


_MALLOC_TRIM = _load()


def trim_heap() -> bool:
    """Return free heap pages to the system; False where that is not possible."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
