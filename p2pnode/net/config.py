"""Limits of direct peer connections, with sane defaults."""

from __future__ import annotations

from dataclasses import dataclass

from p2pnode import confcheck

# Smaller frames could not carry the handshake and ordinary messages.
MIN_FRAME = 1024


@dataclass(frozen=True)
class NetLimits:
    max_frame: int = 4 * 1024 * 1024
    # Connection budgets (see p2pnode/net/budget.py): inbound connections in all
    # (handshakes included), per address and per subnet (IPv4 /24, IPv6 /64);
    # inbound handshakes in progress (full: the oldest is evicted) and per subnet;
    # outbound connections, counted apart so a node can always dial out.
    max_connections: int = 256
    max_connections_per_ip: int = 32
    max_connections_per_subnet: int = 64
    max_handshakes: int = 64
    max_handshakes_per_subnet: int = 16
    max_outbound: int = 128
    # Node-wide memory budget for what peers make us hold (pieces read for them,
    # write and receive buffers) and each peer's share; the numbers and why are
    # in p2pnode/net/memory.py. Past it, GetPiece is answered busy (rejected_memory).
    memory_budget: int = 256 * 1024 * 1024
    memory_per_peer: int = 48 * 1024 * 1024
    max_inflight_per_connection: int = 64
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    request_timeout: float = 30.0
    # False = plaintext frames after an authenticated handshake: BENCHMARKS ONLY
    # (see p2pnode/net/session.py): nothing after the handshake is protected.
    encrypt: bool = True
    # Transport write buffer high-water mark (low = high // 4): above it,
    # answers and requests wait (backpressure).
    write_buffer_high: int = 4 * 1024 * 1024
    # A paused transport whose buffer has not shrunk for this long (the peer reads
    # nothing of our answers) closes the connection, counted as closed_slow_reader;
    # a peer that reads slowly is never dropped for it.
    write_stall_timeout: float = 60.0
    # Requests a peer may send per second on one connection (token bucket of
    # request_burst, default = request_rate); past it: ErrorReply busy, counted
    # as rate_limited. 0 = no rate limit (the in-flight limit still applies):
    # a rate low enough to matter would also cap an honest download, which
    # needs 4000+ requests/s on one connection for 1 GB/s of 256 KiB pieces.
    request_rate: float = 0.0
    request_burst: float = 0.0
    # Misbehaviour budget per connection: every undecodable or unknown message,
    # unasked-for response and rate-limited request is a strike; strikes fade at
    # strike_decay per second; past max_strikes the connection is dropped
    # (closed_misbehaving). An honest peer never gets near it; a junk flood from an
    # authenticated peer would otherwise keep the event loop busy decoding junk.
    max_strikes: float = 64.0
    strike_decay: float = 8.0
    # After this many seconds without traffic a connection gives back its read
    # buffers (up to 1 MiB) and pooled frame buffers; they regrow on demand.
    trim_after: float = 5.0
    # msgpack limits for one message (bin fields are bounded by max_frame).
    max_str_len: int = 64 * 1024
    max_array_len: int = 4096

    def __post_init__(self) -> None:
        confcheck.check_types(self)
        confcheck.at_least(self, MIN_FRAME, "max_frame")
        confcheck.at_least(
            self,
            1,
            "max_connections",
            "max_connections_per_ip",
            "max_connections_per_subnet",
            "max_handshakes",
            "max_handshakes_per_subnet",
            "max_outbound",
            "memory_budget",
            "memory_per_peer",
            "max_inflight_per_connection",
            "write_buffer_high",
            "max_str_len",
            "max_array_len",
        )
        confcheck.positive(
            self,
            "handshake_timeout",
            "idle_timeout",
            "request_timeout",
            "write_stall_timeout",
            "trim_after",
        )
        confcheck.at_least(self, 0, "request_rate", "request_burst", "max_strikes", "strike_decay")
        if self.request_burst and not self.request_rate:
            confcheck.fail(
                self, "request_burst", "is set but request_rate is 0 (no rate limit at all)"
            )
