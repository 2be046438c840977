"""The exchange's wire messages (type codes 16-47) and the bitfield codec: pure.

Rules:

- GetManifest -> ManifestData, GetHave -> Have, GetPiece -> PieceData; any of
  them may instead be answered with an ``ErrorReply`` (wire/messages.py).
- A GetPiece the asker no longer wants (an endgame duplicate another peer already
  sent) is cancelled by the request mux (``Kind.CANCEL``, wire/messages.py): no
  message of its own. Codes 22 and 23 (the former CancelPiece / PieceCancelled)
  are retired, never to be reused.
- A ``Have`` bitfield has bit i (MSB first in byte i // 8) set when piece i is
  held; its length is exactly ``ceil(piece_count / 8)`` bytes and bits past the
  last piece are zero, otherwise it is malformed.
- The classes are built without a registry; ``register(registry)`` adds them to
  one. Importing this module registers them in ``DEFAULT_REGISTRY`` too, because
  ``PeerHost`` decodes with that registry unless its owner gives it another.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pnode.exchange.manifest import RESOURCE_ID_LEN
from p2pnode.wire.messages import DEFAULT_REGISTRY, Blob, Message, MessageRegistry, message, wire

__all__ = [
    "EXCHANGE_MESSAGES",
    "RESOURCE_ID_LEN",
    "GetHave",
    "GetManifest",
    "GetPiece",
    "Have",
    "ManifestData",
    "PieceData",
    "bitfield_from",
    "bitfield_to_set",
    "register",
]


@message(17, registry=None)
@dataclass(frozen=True, slots=True)
class ManifestData(Message):
    resource_id: bytes = wire(exact_len=RESOURCE_ID_LEN)
    manifest: bytes = wire()


@message(16, response=ManifestData, registry=None)
@dataclass(frozen=True, slots=True)
class GetManifest(Message):
    resource_id: bytes = wire(exact_len=RESOURCE_ID_LEN)


@message(19, registry=None)
@dataclass(frozen=True, slots=True)
class PieceData(Message):
    resource_id: bytes = wire(exact_len=RESOURCE_ID_LEN)
    index: int = wire(min_value=0, max_value=0xFFFFFFFF)
    data: Blob = wire()  # noqa: RUF009 - wire() is a dataclasses.field


@message(18, response=PieceData, registry=None)
@dataclass(frozen=True, slots=True)
class GetPiece(Message):
    resource_id: bytes = wire(exact_len=RESOURCE_ID_LEN)
    index: int = wire(min_value=0, max_value=0xFFFFFFFF)


@message(21, registry=None)
@dataclass(frozen=True, slots=True)
class Have(Message):
    """Which pieces a peer holds: bit i (MSB first in byte i // 8) is piece i."""

    resource_id: bytes = wire(exact_len=RESOURCE_ID_LEN)
    complete: bool = wire()
    bitfield: bytes = wire()


@message(20, response=Have, registry=None)
@dataclass(frozen=True, slots=True)
class GetHave(Message):
    resource_id: bytes = wire(exact_len=RESOURCE_ID_LEN)


EXCHANGE_MESSAGES: tuple[type[Message], ...] = (
    GetManifest,
    ManifestData,
    GetPiece,
    PieceData,
    GetHave,
    Have,
)


def register(registry: MessageRegistry) -> MessageRegistry:
    """Add the exchange messages to ``registry`` (idempotent); returns it."""
    for cls in EXCHANGE_MESSAGES:
        registry.register(cls)
    return registry


# PeerHost (net/host.py) decodes with DEFAULT_REGISTRY: anything that can send or
# handle these messages has imported this module, so they are known there.
register(DEFAULT_REGISTRY)


# -- bitfields ---------------------------------------------------------------------


def bitfield_from(indices: set[int], count: int) -> bytes:
    """Bit i (MSB first in byte i // 8) is set when piece i is held."""
    out = bytearray((count + 7) // 8)
    for i in indices:
        if 0 <= i < count:
            out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


def bitfield_to_set(bitfield: bytes, count: int) -> set[int] | None:
    """The pieces a bitfield says are held; None if its length does not fit ``count``."""
    if len(bitfield) != (count + 7) // 8:
        return None
    held = set()
    for byte_index, byte in enumerate(bitfield):
        if not byte:
            continue
        for bit in range(8):
            if byte & (0x80 >> bit):
                index = byte_index * 8 + bit
                if index >= count:
                    return None  # bits past the end must be zero
                held.add(index)
    return held
