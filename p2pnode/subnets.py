"""The subnet an address belongs to, for per-subnet limits (connections, DHT storage).

A subnet is an IPv4 /24 or an IPv6 /64: one host, or one customer of a provider,
rarely holds more than that, while one IPv6 host often owns a whole /64. An
IPv4-mapped IPv6 address counts as IPv4.
"""

from __future__ import annotations

import functools
import ipaddress

__all__ = ["subnet_of"]


@functools.lru_cache(maxsize=4096)  # a few µs each; asked per connection and per stored record
def subnet_of(ip: str) -> str:
    """``ip``'s subnet as a key: IPv4 /24, IPv6 /64; the text itself if not an address."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is None:
            return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
        addr = mapped
    return str(ipaddress.IPv4Network((int(addr) >> 8 << 8, 24)))
