"""Token buckets: one per connection, or one per source address (DHT). Pure: time is injected."""

from __future__ import annotations

from collections import OrderedDict

from p2pnode.clock import Clock


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        elapsed = max(0.0, now - self.last)
        self.last = now
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


class RateLimiter:
    """One token bucket per key (a source IP), for at most ``max_keys`` keys: the least
    recently seen key is forgotten first."""

    def __init__(self, clock: Clock, *, rate: float, burst: float, max_keys: int) -> None:
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self.max_keys = max(1, max_keys)
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, key: str) -> bool:
        now = self._clock.now()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
