"""Hole-punching messages (DCUtR-style), type codes 76-79 (services range 48-95).

Addresses travel packed: 4 or 16 bytes of IP then 2 bytes of port, big
endian; no names (a name would make the receiver resolve what a peer chose).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from p2pnode.wire.messages import DEFAULT_REGISTRY, Message, MessageRegistry, message, wire

MAX_ADDRS = 8
"""Addresses a Connect may carry (the receiver tries fewer: see holepunch_core)."""


@message(77, registry=None)
@dataclass(frozen=True, slots=True)
class PunchConnectReply(Message):
    """The relay-dialed side's answer: its addresses, and whether it is public
    (then it waits for our connection instead of punching)."""

    attempt: int = wire(min_value=1, max_value=255)
    addrs: tuple[bytes, ...] = wire(max_len=MAX_ADDRS)
    public: bool = wire()


@message(76, response=PunchConnectReply, registry=None)
@dataclass(frozen=True, slots=True)
class PunchConnect(Message):
    """Sent by the side that dialed the relayed connection: its addresses."""

    attempt: int = wire(min_value=1, max_value=255)
    addrs: tuple[bytes, ...] = wire(max_len=MAX_ADDRS)
    public: bool = wire()


@message(79, registry=None)
@dataclass(frozen=True, slots=True)
class PunchSyncAck(Message):
    pass


@message(78, response=PunchSyncAck, registry=None)
@dataclass(frozen=True, slots=True)
class PunchSync(Message):
    """Open now: the sender opens half a round trip later, when this arrives."""

    attempt: int = wire(min_value=1, max_value=255)


HOLEPUNCH_MESSAGES: tuple[type[Message], ...] = (
    PunchConnect,
    PunchConnectReply,
    PunchSync,
    PunchSyncAck,
)


def register(registry: MessageRegistry) -> MessageRegistry:
    """Add the hole-punching messages to ``registry`` (idempotent); returns it."""
    for cls in HOLEPUNCH_MESSAGES:
        registry.register(cls)
    return registry


register(DEFAULT_REGISTRY)


def pack_addr(host: str, port: int) -> bytes:
    """``host`` (an IP literal) and ``port`` as 6 or 18 bytes."""
    return ipaddress.ip_address(host).packed + port.to_bytes(2, "big")


def unpack_addr(data: bytes) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """The IP and port in ``data``; None when it is neither 6 nor 18 bytes."""
    if len(data) == 6:
        return ipaddress.IPv4Address(data[:4]), int.from_bytes(data[4:], "big")
    if len(data) == 18:
        return ipaddress.IPv6Address(data[:16]), int.from_bytes(data[16:], "big")
    return None
