"""Return-routability tokens (BEP 5): bound to the address, good for one to two
rotations of the secret, and nothing but the right bytes passes."""

from __future__ import annotations

import random

from p2pnode.dht.tokens import TOKEN_LEN, TokenIssuer

NOW = 1_000_000.0


def issuer(seed: int = 1, rotation: float = 300.0) -> TokenIssuer:
    return TokenIssuer(random.Random(seed), NOW, rotation)


def test_token_is_bound_to_the_address() -> None:
    tokens = issuer()
    token = tokens.token_for("10.0.0.1", NOW)
    assert type(token) is bytes and len(token) == TOKEN_LEN
    assert tokens.token_for("10.0.0.1", NOW + 1) == token  # nothing kept per address
    assert tokens.check("10.0.0.1", token, NOW)
    assert not tokens.check("10.0.0.2", token, NOW)
    assert tokens.token_for("10.0.0.2", NOW) != token
    # IPv4-mapped IPv6 is the same address.
    assert tokens.token_for("::ffff:10.0.0.1", NOW) == token
    assert tokens.check("::ffff:10.0.0.1", token, NOW)
    assert tokens.check("2001:db8::1", tokens.token_for("2001:db8:0::1", NOW), NOW)


def test_token_secret_comes_from_the_rng() -> None:
    assert issuer(1).token_for("10.0.0.1", NOW) == issuer(1).token_for("10.0.0.1", NOW)
    assert issuer(1).token_for("10.0.0.1", NOW) != issuer(2).token_for("10.0.0.1", NOW)
    assert not issuer(2).check("10.0.0.1", issuer(1).token_for("10.0.0.1", NOW), NOW)


def test_token_lives_one_to_two_rotations() -> None:
    tokens = issuer(rotation=300.0)
    early = tokens.token_for("10.0.0.1", NOW)
    late = tokens.token_for("10.0.0.1", NOW + 299.9)
    assert early == late
    assert tokens.check("10.0.0.1", early, NOW + 300.0)  # the previous secret
    assert tokens.token_for("10.0.0.1", NOW + 300.0) != early  # rotated
    assert tokens.check("10.0.0.1", early, NOW + 599.9)
    assert not tokens.check("10.0.0.1", early, NOW + 600.0)  # two rotations on


def test_a_long_silence_forgets_both_secrets() -> None:
    tokens = issuer(rotation=300.0)
    token = tokens.token_for("10.0.0.1", NOW + 299.0)
    # The first call after 2.5 rotations: the secret of that token is two behind.
    assert not tokens.check("10.0.0.1", token, NOW + 750.0)
    fresh = tokens.token_for("10.0.0.1", NOW + 750.0)
    assert tokens.check("10.0.0.1", fresh, NOW + 899.0)  # rotation stays on its grid
    assert tokens.check("10.0.0.1", fresh, NOW + 1100.0)
    assert not tokens.check("10.0.0.1", fresh, NOW + 1200.0)


def test_anything_but_the_right_bytes_fails() -> None:
    tokens = issuer()
    token = tokens.token_for("10.0.0.1", NOW)
    for hostile in (
        None,
        0,
        True,
        token.hex(),
        bytearray(token),
        memoryview(token),
        [token],
        token[:-1],
        token + b"\x00",
        b"",
        bytes(TOKEN_LEN),
        bytes([token[0] ^ 1]) + token[1:],
    ):
        assert not tokens.check("10.0.0.1", hostile, NOW), hostile
    assert not tokens.check(None, token, NOW)  # type: ignore[arg-type]
    assert not tokens.check(b"10.0.0.1", token, NOW)  # type: ignore[arg-type]


def test_hosts_that_are_not_ip_literals_still_get_tokens() -> None:
    tokens = issuer()  # simulated networks name their hosts
    token = tokens.token_for("node-7", NOW)
    assert tokens.check("node-7", token, NOW) and not tokens.check("node-8", token, NOW)
