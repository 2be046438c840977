"""A node's long-term identity: an Ed25519 key pair kept in its home.

The Kademlia node id is the first 20 bytes of SHA-256 over the raw public key,
so anyone holding the public key can check a claimed id. The peer id string is
that node id in lower-case base32 without padding (32 characters).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from p2pnode.errors import UsageError
from p2pnode.home import KEY_FILE, make_private_dir, write_atomic

NODE_ID_LEN = 20
PUBLIC_KEY_LEN = 32


def node_id_from_public_key(public_key: bytes) -> bytes:
    if len(public_key) != PUBLIC_KEY_LEN:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return hashlib.sha256(public_key).digest()[:NODE_ID_LEN]


def peer_id_to_str(node_id: bytes) -> str:
    return base64.b32encode(node_id).decode("ascii").rstrip("=").lower()


def peer_id_from_str(text: str) -> bytes:
    """Parse a peer id string; raises UsageError with a readable reason."""
    cleaned = text.strip().upper()
    padded = cleaned + "=" * (-len(cleaned) % 8)
    try:
        raw = base64.b32decode(padded)
    except ValueError as exc:
        raise UsageError(f"not a peer id (base32 expected): {text!r}") from exc
    if len(raw) != NODE_ID_LEN:
        raise UsageError(f"not a peer id (20 bytes expected, got {len(raw)}): {text!r}")
    return raw


def as_node_id(peer: str | bytes) -> bytes:
    """A peer id as 20 raw bytes, given either form (users hold the text one)."""
    if isinstance(peer, str):
        return peer_id_from_str(peer)
    if isinstance(peer, bytes | bytearray) and len(peer) == NODE_ID_LEN:
        return bytes(peer)
    raise UsageError(f"not a peer id (text or {NODE_ID_LEN} bytes expected): {peer!r}")


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity whose private key is these 32 bytes (simulations and tests
        that must be repeatable; a real node uses :meth:`generate`)."""
        if len(seed) != 32:
            raise UsageError("an identity seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> bytes:
        return node_id_from_public_key(self.public_key)

    @property
    def peer_id(self) -> str:
        return peer_id_to_str(self.node_id)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def to_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, data: bytes) -> Identity:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"identity key is not a valid PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise UsageError("identity key is not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, home: Path) -> Identity:
        """Load the key from ``home``, creating it (mode 0600, in a 0700 home) on
        first use."""
        path = home / KEY_FILE
        if path.exists():
            return cls.from_pem(path.read_bytes())
        identity = cls.generate()
        make_private_dir(home)
        write_atomic(path, identity.to_pem())
        return identity
