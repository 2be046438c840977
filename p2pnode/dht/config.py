"""Tunables of the DHT layer, with sane defaults (short ones in tests)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DhtConfig:
    ksize: int = 20
    alpha: int = 3
    rpc_timeout: float = 5.0
    # A contact is evicted only after this many consecutive failed RPCs.
    max_failures: int = 3
    max_datagram: int = 8192
    max_value_bytes: int = 4096
    max_stored_values: int = 10_000
    value_ttl: float = 24 * 3600.0
    refresh_interval: float = 3600.0
    # Provider records (resource exchange).
    provider_ttl: float = 24 * 3600.0
    provider_republish: float = 12 * 3600.0
    max_providers_per_key: int = 64
    max_provider_keys_per_sender: int = 4096
    max_provider_keys: int = 100_000
