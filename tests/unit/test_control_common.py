"""The control API's body checks: the flat nesting scan agrees with json itself."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from p2pnode.control.common import json_depth_exceeds


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


def _random_doc(rng: random.Random, budget: int) -> Any:
    kind = rng.randrange(5) if budget > 0 else rng.randrange(2)
    if kind == 0:
        # Strings full of the characters the scan must skip.
        return "".join(rng.choice('[]{}"\\ab\n') for _ in range(rng.randrange(6)))
    if kind == 1:
        return rng.choice([1, -2.5, None, True])
    if kind in (2, 3):
        return [_random_doc(rng, budget - 1) for _ in range(rng.randrange(3))]
    return {f"k{i}[\\": _random_doc(rng, budget - 1) for i in range(rng.randrange(3))}


def test_scan_matches_the_real_depth_of_random_documents() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        doc = _random_doc(rng, 8)
        raw = json.dumps(doc).encode()
        depth = _depth(doc)
        assert not json_depth_exceeds(raw, depth), raw
        if depth:
            assert json_depth_exceeds(raw, depth - 1), raw


@pytest.mark.parametrize(
    ("raw", "deep"),
    [
        (b"[" * 33 + b"]" * 33, True),
        (b"[" * 32 + b"]" * 32, False),
        (b'"' + b"[" * 100 + b'"', False),  # inside a string
        (b'["\\"' + b"[" * 100 + b'"]', False),  # after an escaped quote: still inside
        (b'["\\\\"' + b"[" * 40, True),  # an escaped backslash ends with the string
        (b"[" * 40, True),  # unclosed: still refused before json.loads sees it
    ],
)
def test_scan_edge_cases(raw: bytes, deep: bool) -> None:
    assert json_depth_exceeds(raw, 32) is deep
