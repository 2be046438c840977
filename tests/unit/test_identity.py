"""Identity: key creation, persistence, file mode, id derivation and parsing."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from p2pnode.errors import UsageError
from p2pnode.identity import (
    KEY_FILE,
    Identity,
    node_id_from_public_key,
    peer_id_from_str,
    peer_id_to_str,
    verify_signature,
)


def test_created_once_with_mode_0600_and_stable(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path / "home")
    key_file = tmp_path / "home" / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = Identity.load_or_create(tmp_path / "home")
    assert first.public_key == second.public_key
    assert first.peer_id == second.peer_id


def test_node_id_derives_from_public_key() -> None:
    ident = Identity.generate()
    assert ident.node_id == hashlib.sha256(ident.public_key).digest()[:20]
    assert node_id_from_public_key(ident.public_key) == ident.node_id
    assert len(ident.peer_id) == 32


def test_peer_id_round_trip_and_junk() -> None:
    ident = Identity.generate()
    assert peer_id_from_str(ident.peer_id) == ident.node_id
    assert peer_id_from_str(ident.peer_id.upper()) == ident.node_id
    with pytest.raises(UsageError):
        peer_id_from_str("not a peer id!")
    with pytest.raises(UsageError):
        peer_id_from_str(peer_id_to_str(b"\x01" * 10))


def test_signatures() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"hello")
    assert verify_signature(ident.public_key, sig, b"hello")
    assert not verify_signature(ident.public_key, sig, b"hellO")
    assert not verify_signature(Identity.generate().public_key, sig, b"hello")
    assert not verify_signature(b"short", sig, b"hello")


def test_damaged_key_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_bytes(b"garbage")
    with pytest.raises(UsageError, match="PEM"):
        Identity.load_or_create(tmp_path)
