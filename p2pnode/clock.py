"""Clocks: code with TTLs, backoff and expiry takes one, so tests can step time."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale (the real clock reads as Unix seconds)."""
        ...


# Monotonic time shifted to the Unix epoch once, at start: it never jumps, and it
# still reads as Unix seconds, which signed DHT records' expiry times need.
_EPOCH_SHIFT = time.time() - time.monotonic()


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic() + _EPOCH_SHIFT


class FakeClock:
    """A clock that only moves when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


MONOTONIC: Clock = MonotonicClock()
