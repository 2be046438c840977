"""Limits of direct peer connections, with sane defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NetLimits:
    max_frame: int = 4 * 1024 * 1024
    max_connections: int = 256
    max_connections_per_ip: int = 32
    max_inflight_per_connection: int = 64
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    request_timeout: float = 30.0
    encrypt: bool = True
