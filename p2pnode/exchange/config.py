"""Tunables of the resource exchange."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExchangeConfig:
    requests_per_peer: int = 8
    piece_timeout: float = 20.0
    max_peers_per_download: int = 16
