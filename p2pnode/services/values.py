"""Request and reply values: msgpack of plain data, bounded and decoded strictly. Pure.

A value is None, bool, int (64-bit), float, str, bytes, a list of values or a map
with str keys, nested at most ``max_depth`` deep. Encoding refuses anything else
(tuples count as lists); decoding refuses ext types, non-str keys, sizes past the
limits and trailing bytes, raising only ``BadServiceRequest``/``TooLarge``.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack  # type: ignore[import-untyped]

from p2pnode.errors import BadServiceRequest, TooLarge

__all__ = ["ValueLimits", "decode_value", "encode_value"]


@dataclass(frozen=True)
class ValueLimits:
    max_size: int = 1024 * 1024
    max_depth: int = 32
    max_items: int = 65536  # entries in any one list or map


DEFAULT_VALUE_LIMITS = ValueLimits()
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def _check(value: object, depth: int, limits: ValueLimits) -> None:
    if depth > limits.max_depth:
        raise BadServiceRequest(f"value nested deeper than {limits.max_depth}")
    t = type(value)
    if value is None or t is bool or t is float or t is str or t is bytes:
        return
    if t is int:
        assert isinstance(value, int)
        if not _INT_MIN <= value <= _INT_MAX:
            raise BadServiceRequest("integer out of the 64-bit range")
        return
    if t is list or t is tuple:
        assert isinstance(value, (list, tuple))
        if len(value) > limits.max_items:
            raise TooLarge(f"list of {len(value)} items, more than {limits.max_items}")
        for item in value:
            _check(item, depth + 1, limits)
        return
    if t is dict:
        assert isinstance(value, dict)
        if len(value) > limits.max_items:
            raise TooLarge(f"map of {len(value)} entries, more than {limits.max_items}")
        for key, item in value.items():
            if type(key) is not str:
                raise BadServiceRequest("map keys must be strings")
            _check(item, depth + 1, limits)
        return
    raise BadServiceRequest(f"{t.__name__} is not a msgpack value (None, bool, int, ...)")


def encode_value(value: object, limits: ValueLimits = DEFAULT_VALUE_LIMITS) -> bytes:
    """``value`` as msgpack; BadServiceRequest for what is not plain data, TooLarge
    past ``limits.max_size``."""
    _check(value, 0, limits)
    data: bytes = msgpack.packb(value, use_bin_type=True)
    if len(data) > limits.max_size:
        raise TooLarge(f"value of {len(data)} bytes, more than {limits.max_size}")
    return data


def decode_value(data: bytes, limits: ValueLimits = DEFAULT_VALUE_LIMITS) -> object:
    """The value ``data`` encodes, checked as ``encode_value`` checks what it sends."""
    if len(data) > limits.max_size:
        raise TooLarge(f"value of {len(data)} bytes, more than {limits.max_size}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=limits.max_size,
            max_str_len=limits.max_size,
            max_array_len=limits.max_items,
            max_map_len=limits.max_items,
            max_ext_len=0,
        )
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as e:
        raise BadServiceRequest(f"not a msgpack value: {type(e).__name__}") from None
    _check(value, 0, limits)
    return value
