"""Hole punching's settings (no imports beyond the standard library: the node's
configuration imports it at CLI start)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HolePunchConfig:
    enabled: bool = True
    """Off: relayed connections stay relayed (no upgrade tried or answered)."""
    attempts: int = 3
    """Connect/Sync rounds before giving up (DCUtR: 3)."""
    reply_timeout: float = 5.0
    """How long A waits for a PunchConnectReply (and a PunchSyncAck)."""
    retry_delay: float = 0.5
    """Pause between two rounds."""
    sync_timeout: float = 10.0
    """How long B keeps a Connect waiting for its Sync."""
    max_targets: int = 4
    """Addresses of the peer tried per round."""
    open_timeout: float = 5.0
    """One round's open: the punch (SYN retries included) or the wait for the
    peer's connection, and the handshake after it."""
    peer_window: float = 60.0
    """Window of ``per_peer_rounds``."""
    per_peer_rounds: int = 6
    """Rounds a peer may start with us per window (2 upgrades)."""
    max_inflight: int = 8
    """Peers being punched to at once."""
    idle_close_after: float = 30.0
    """After a success, how long A waits for the relayed connection to go idle
    to close it; still busy then, it is left to its idle timeout (the pool no
    longer picks it)."""
