"""Return-routability tokens (BEP 5): a write needs proof that its sender can
receive at its source address. Pure: no I/O, time is given.

An answer to ``find_value`` / ``get_providers`` carries ``token_for(sender ip)``;
a later ``store`` / ``add_provider`` from that ip must bring it back. The token is
a keyed BLAKE2b of the normalized address text under a random secret, so nothing
is remembered per address and a spoofed source (which never sees our answers)
cannot earn one. The secret rotates every ``rotation`` seconds; a token of the
previous secret is still good, so a token lives between one and two rotations.
Rotation is lazy (on the first call past the rotation time), so virtual time works.
"""

from __future__ import annotations

import hashlib
import hmac
import random

from p2pnode.dht.rpc_schema import normalize_host

__all__ = ["SECRET_LEN", "TOKEN_LEN", "TokenIssuer"]

TOKEN_LEN = 8  # 2**-64 per guess, and a guess is only good for two rotations
SECRET_LEN = 16


class TokenIssuer:
    def __init__(self, rng: random.Random, now: float, rotation: float = 300.0) -> None:
        if not rotation > 0:
            raise ValueError("rotation must be positive")
        self._rng = rng
        self.rotation = rotation
        self._current = rng.randbytes(SECRET_LEN)
        self._previous: bytes | None = None
        self._rotate_at = now + rotation

    def _rotate(self, now: float) -> None:
        if now < self._rotate_at:
            return
        periods = int((now - self._rotate_at) // self.rotation) + 1
        # After one period the current secret becomes the previous one; after more,
        # even its tokens are older than two rotations: none is kept.
        self._previous = self._current if periods == 1 else None
        self._current = self._rng.randbytes(SECRET_LEN)
        self._rotate_at += periods * self.rotation

    @staticmethod
    def _mac(secret: bytes, host: str) -> bytes:
        # IPv4-mapped IPv6 and IPv4 are one address; a non-IP text (a simulated
        # host name) is used as it is.
        text = normalize_host(host) or host
        data = text.encode("utf-8", "surrogatepass")
        return hashlib.blake2b(data, key=secret, digest_size=TOKEN_LEN).digest()

    def token_for(self, host: str, now: float) -> bytes:
        self._rotate(now)
        return self._mac(self._current, host)

    def check(self, host: str, token: object, now: float) -> bool:
        """Whether ``token`` was issued to ``host`` under the current or the
        previous secret; anything that is not bytes of the right length is not."""
        if type(token) is not bytes or len(token) != TOKEN_LEN or type(host) is not str:
            return False
        self._rotate(now)
        if hmac.compare_digest(token, self._mac(self._current, host)):
            return True
        previous = self._previous
        return previous is not None and hmac.compare_digest(token, self._mac(previous, host))
