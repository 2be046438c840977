"""Proof that a DHT contact owns its id: the id is the hash of an Ed25519 public
key (the peer id), and the contact signs a fresh challenge of ours with that key.

Pure: no I/O. The signed message binds the challenge to both ids, so a proof made
for one asker cannot be replayed to another, nor by another node.
"""

from __future__ import annotations

from p2pnode.identity import Identity, node_id_from_public_key, verify_signature

DOMAIN = b"p2pnode/dht/identify/v1"
# v2 also signs the node's DHT mode ("server" or "client"): a client is never
# put in a routing table, and no one but the node can claim its mode.
DOMAIN_V2 = b"p2pnode/dht/identify/v2"
MODES = ("server", "client")


def _message(challenger_id: bytes, challenge: bytes, node_id: bytes, mode: str | None) -> bytes:
    if mode is None:
        return b"".join((DOMAIN, challenger_id, challenge, node_id))
    return b"".join((DOMAIN_V2, challenger_id, challenge, node_id, mode.encode()))


def prove(
    identity: Identity, challenger_id: bytes, challenge: bytes, mode: str | None = None
) -> bytes:
    """Our signature answering ``challenge`` from ``challenger_id`` (and stating
    our ``mode``; None: the v1 proof, which states none)."""
    return identity.sign(_message(challenger_id, challenge, identity.node_id, mode))


def check_proof(
    node_id: bytes,
    challenger_id: bytes,
    challenge: bytes,
    public_key: bytes,
    signature: bytes,
    mode: str | None = None,
) -> bool:
    """True if ``public_key`` hashes to ``node_id`` and signed our challenge (and
    ``mode``, for a v2 proof)."""
    if node_id_from_public_key(public_key) != node_id:
        return False
    message = _message(challenger_id, challenge, node_id, mode)
    return verify_signature(public_key, signature, message)
