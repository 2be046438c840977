"""Connection budgets: who may hold a connection slot. Pure, no I/O, O(1) per call.

Three separate budgets, so that no kind of connection can starve another:

- inbound handshakes (``max_handshakes``): a TCP connect costs the attacker
  nothing, so silent sockets must not hold slots that authenticated peers need.
  When it is full the *oldest* handshake is evicted to admit the newcomer: a
  flood then only shortens the time each of its own sockets is given, and an
  honest handshake (which takes a round trip, not ``handshake_timeout``) gets
  through. Per subnet (``max_handshakes_per_subnet``) a newcomer is refused.
- inbound connections in all, handshakes included (``max_connections``), per
  address (``max_connections_per_ip``) and per subnet
  (``max_connections_per_subnet``): refused past the limit.
- outbound connections (``max_outbound``): counted apart, so a node flooded by
  inbound connections can still dial out; at the limit the host evicts an idle
  outbound connection before it refuses.

A subnet is an IPv4 /24 or an IPv6 /64 (one host often owns a whole /64;
an IPv4-mapped IPv6 address counts as IPv4). Every refusal and eviction is
counted in ``counters`` by name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from typing import Generic, TypeVar

from p2pnode.net.config import NetLimits
from p2pnode.subnets import subnet_of

K = TypeVar("K", bound=Hashable)

__all__ = ["ConnectionBudget"]


class ConnectionBudget(Generic[K]):
    """The slots of one node's connections, keyed by an opaque connection handle."""

    def __init__(self, limits: NetLimits, counters: Counter[str] | None = None) -> None:
        self.limits = limits
        self.counters: Counter[str] = Counter() if counters is None else counters
        # inbound: conn -> (ip, subnet); handshaking ones also in _handshakes,
        # oldest first (an insertion-ordered dict is the queue)
        self._inbound: dict[K, tuple[str, str]] = {}
        self._handshakes: dict[K, str] = {}
        self._per_ip: Counter[str] = Counter()
        self._per_subnet: Counter[str] = Counter()
        self._hs_per_subnet: Counter[str] = Counter()
        self._outbound: set[K] = set()

    # -- state ---------------------------------------------------------------------

    @property
    def inbound(self) -> int:
        return len(self._inbound)

    @property
    def handshaking(self) -> int:
        return len(self._handshakes)

    @property
    def outbound(self) -> int:
        return len(self._outbound)

    @property
    def outbound_full(self) -> bool:
        return len(self._outbound) >= self.limits.max_outbound

    def is_inbound(self, conn: K) -> bool:
        return conn in self._inbound

    # -- inbound -------------------------------------------------------------------

    def admit_inbound(self, conn: K, ip: str) -> tuple[bool, K | None]:
        """A new inbound connection from ``ip``, about to handshake.

        Returns (admitted, evicted): the host closes ``evicted`` (an older
        handshake whose slot the newcomer took) at once.
        """
        limits = self.limits
        counters = self.counters
        if self._per_ip[ip] >= limits.max_connections_per_ip:
            counters["rejected_per_ip"] += 1
            return False, None
        subnet = subnet_of(ip)
        if self._per_subnet[subnet] >= limits.max_connections_per_subnet:
            counters["rejected_per_subnet"] += 1
            return False, None
        handshakes_full = len(self._handshakes) >= limits.max_handshakes
        # full of connections: refused, unless a handshake's slot can be taken
        if len(self._inbound) >= limits.max_connections and not handshakes_full:
            counters["rejected_max_connections"] += 1
            return False, None
        if self._hs_per_subnet[subnet] >= limits.max_handshakes_per_subnet:
            counters["rejected_handshakes_per_subnet"] += 1
            return False, None
        evicted: K | None = None
        if handshakes_full:
            evicted = next(iter(self._handshakes))
            counters["evicted_handshakes"] += 1
            self.release(evicted)
        if len(self._inbound) >= limits.max_connections:
            counters["rejected_max_connections"] += 1
            return False, evicted
        self._inbound[conn] = (ip, subnet)
        self._handshakes[conn] = subnet
        self._per_ip[ip] += 1
        self._per_subnet[subnet] += 1
        self._hs_per_subnet[subnet] += 1
        counters["connections_accepted"] += 1
        return True, evicted

    def established(self, conn: K) -> None:
        """``conn``'s handshake completed: its handshake slot is free again."""
        subnet = self._handshakes.pop(conn, None)
        if subnet is not None:
            _drop(self._hs_per_subnet, subnet)

    # -- outbound ------------------------------------------------------------------

    def add_outbound(self, conn: K) -> bool:
        """A dial begins; False (counted) when the outbound budget is full."""
        if len(self._outbound) >= self.limits.max_outbound:
            self.counters["rejected_max_connections_out"] += 1
            return False
        self._outbound.add(conn)
        return True

    # -- both ----------------------------------------------------------------------

    def release(self, conn: K) -> None:
        """``conn`` is gone (or evicted): free its slots. Idempotent."""
        self._outbound.discard(conn)
        self.established(conn)
        where = self._inbound.pop(conn, None)
        if where is not None:
            ip, subnet = where
            _drop(self._per_ip, ip)
            _drop(self._per_subnet, subnet)


def _drop(counter: Counter[str], key: str) -> None:
    n = counter[key] - 1
    if n > 0:
        counter[key] = n
    else:
        del counter[key]
