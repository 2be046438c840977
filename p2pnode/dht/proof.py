"""Proof that a DHT contact owns its id: the id is the hash of an Ed25519 public
key (the peer id), and the contact signs a fresh challenge of ours with that key.

Pure: no I/O. The signed message binds the challenge to both ids, so a proof made
for one asker cannot be replayed to another, nor by another node.
"""

from __future__ import annotations

from p2pnode.identity import Identity, node_id_from_public_key, verify_signature

DOMAIN = b"p2pnode/dht/identify/v1"


def _message(challenger_id: bytes, challenge: bytes, node_id: bytes) -> bytes:
    return b"".join((DOMAIN, challenger_id, challenge, node_id))


def prove(identity: Identity, challenger_id: bytes, challenge: bytes) -> bytes:
    """Our signature answering ``challenge`` from ``challenger_id``."""
    return identity.sign(_message(challenger_id, challenge, identity.node_id))


def check_proof(
    node_id: bytes, challenger_id: bytes, challenge: bytes, public_key: bytes, signature: bytes
) -> bool:
    """True if ``public_key`` hashes to ``node_id`` and signed our challenge."""
    if node_id_from_public_key(public_key) != node_id:
        return False
    return verify_signature(public_key, signature, _message(challenger_id, challenge, node_id))
