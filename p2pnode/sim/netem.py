"""Network impairment on a node's DHT datagram path (in-process mode).

``ImpairedTransport`` stands in for the UDP transport of one node's DHT protocol:
every datagram the node sends is dropped with probability ``loss`` or delivered
after ``latency`` (+ uniform ``jitter``) seconds; it also counts bytes and
datagrams sent, which the DHT's own counters do not. Both directions are
impaired because every node's sends go through its own wrapper.

Hook used: ``Discovery.wrap_transport``.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any


class ImpairedTransport:
    def __init__(
        self,
        inner: Any,
        *,
        loss: float = 0.0,
        latency: float = 0.0,
        jitter: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self._inner = inner
        self.loss = loss
        self.latency = latency
        self.jitter = jitter
        self._rng = rng or random.Random()
        self.blackhole = False  # drop everything (a node being killed)
        self.bytes_sent = 0
        self.datagrams_sent = 0
        self.datagrams_dropped = 0
        self._loop = asyncio.get_running_loop()

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if self.blackhole:
            return
        self.datagrams_sent += 1
        self.bytes_sent += len(data)
        if self.loss and self._rng.random() < self.loss:
            self.datagrams_dropped += 1
            return
        delay = self.latency + (self._rng.uniform(0, self.jitter) if self.jitter else 0.0)
        if delay > 0:
            self._loop.call_later(delay, self._send_later, data, addr)
        else:
            self._inner.sendto(data, addr)

    def _send_later(self, data: bytes, addr: Any) -> None:
        if not self.blackhole and not self._inner.is_closing():
            self._inner.sendto(data, addr)

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    def is_closing(self) -> bool:
        return bool(self._inner.is_closing())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def dht_protocol(discovery: Any) -> Any:
    """The DHT protocol object of a Discovery (private attribute; None if absent)."""
    return getattr(discovery, "_protocol", None)


def install(
    discovery: Any, *, loss: float, latency: float, jitter: float, rng: random.Random
) -> ImpairedTransport | None:
    """Wrap a listening Discovery's datagram transport."""
    made: list[ImpairedTransport] = []

    def wrap(inner: Any) -> Any:
        made.append(ImpairedTransport(inner, loss=loss, latency=latency, jitter=jitter, rng=rng))
        return made[0]

    discovery.wrap_transport(wrap)
    return made[0]
