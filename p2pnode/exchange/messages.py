"""The exchange's wire messages (type codes 16-47) and the bitfield codec: pure.

Rules:

- GetManifest -> ManifestData, GetHave -> Have, GetPiece -> PieceData; any of
  them may instead be answered with an ``ErrorReply`` (wire/messages.py).
- CancelPiece(resource_id, index) -> PieceCancelled(found): the asker no longer
  wants that piece (an endgame duplicate another peer already sent). A GetPiece
  from the same peer still waiting for its disk read is answered with the
  ``ErrorReply`` code ``cancelled`` (``PIECE_CANCELLED``) instead of the piece;
  one already answered is not affected (``found`` is False). A peer older than
  these messages answers ``unsupported``: the asker stops sending it cancels.
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
    "PIECE_CANCELLED",
    "RESOURCE_ID_LEN",
    "CancelPiece",
    "GetHave",
    "GetManifest",
    "GetPiece",
    "Have",
    "ManifestData",
    "PieceCancelled",
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


@message(23, registry=None)
@dataclass(frozen=True, slots=True)
class PieceCancelled(Message):
    found: bool = wire()  # a read of that piece for this peer was stopped


@message(22, response=PieceCancelled, registry=None)
@dataclass(frozen=True, slots=True)
class CancelPiece(Message):
    resource_id: bytes = wire(exact_len=RESOURCE_ID_LEN)
    index: int = wire(min_value=0, max_value=0xFFFFFFFF)


# The ErrorReply code a GetPiece stopped by a CancelPiece is answered with.
PIECE_CANCELLED = "cancelled"

EXCHANGE_MESSAGES: tuple[type[Message], ...] = (
    GetManifest,
    ManifestData,
    GetPiece,
    PieceData,
    GetHave,
    Have,
    CancelPiece,
    PieceCancelled,
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
