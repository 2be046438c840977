"""Tunables of the resource exchange."""

from __future__ import annotations

from dataclasses import dataclass

from p2pnode import confcheck


@dataclass(frozen=True)
class ExchangeConfig:
    # Downloads.
    # Requests in flight per peer: at most requests_per_peer, and at most
    # inflight_bytes_per_peer worth of pieces (but always at least 2).
    requests_per_peer: int = 8
    inflight_bytes_per_peer: int = 8 * 1024 * 1024
    piece_timeout: float = 20.0
    # Peers a download keeps open at once (manifest and pieces).
    max_peers_per_download: int = 16
    manifest_timeout: float = 20.0
    # Providers: up to max_providers_considered are asked of the DHT and tried in
    # turn, the most promising first (exchange/ranking.py). Of the open attempts,
    # at most dial_window may still be waiting for their first answer and younger
    # than dial_timeout: a fake record at a silent address holds a slot for
    # dial_timeout, then the next candidate is dialed (the attempt itself still
    # gets manifest_timeout / piece_timeout, unless a slot is needed).
    max_providers_considered: int = 200
    dial_window: int = 6
    dial_timeout: float = 3.0
    # Consecutive failed/timed-out requests before a peer is dropped from a download.
    max_failures: int = 3
    # A peer answering "busy" is not a failure: we back off (busy_backoff doubling up
    # to busy_backoff_max) and drop it only after busy_give_up seconds without a piece.
    busy_backoff: float = 0.05
    busy_backoff_max: float = 2.0
    busy_give_up: float = 60.0
    # Endgame: at most this many peers race for one of the last pieces.
    endgame_copies: int = 2
    # Look the providers up again at most this many times in a download (none left,
    # or none reachable), rediscover_delay * n seconds apart, before giving up.
    rediscover_attempts: int = 2
    rediscover_delay: float = 1.0
    progress_interval: float = 0.25
    # fsync the finished download before it is renamed into place.
    fsync: bool = True
    # Write downloads with O_DIRECT where the filesystem allows it (no page-cache
    # copy; see exchange/writer.py); False: always through the page cache.
    direct_io: bool = True
    # Threads for disk reads (serving), writes and hashing (downloads).
    io_threads: int = 4
    # Sharing: threads hashing a file (0: as many as cores, at most 4).
    hash_workers: int = 0
    # Serving. Served resources are announced at start, as soon as the DHT has
    # contacts (checked every contact_poll_interval), then every announce_interval.
    announce_interval: float = 3600.0
    contact_poll_interval: float = 2.0
    # A piece all in the page cache is read on the event loop (no thread hand-off);
    # False: every read goes through the I/O threads and the queue below.
    serve_cached_reads: bool = True
    serve_max_reads: int = 4
    serve_max_queued: int = 256
    # Past serve_max_queued, each peer may still queue this many (fairness under a flood).
    serve_min_per_peer: int = 2
    # Check shared files for changes this often (seconds; 0 disables) so a changed
    # file stops being announced even if nobody asks for it.
    stale_check_interval: float = 60.0

    def __post_init__(self) -> None:
        confcheck.check_types(self)
        confcheck.at_least(
            self,
            1,
            "requests_per_peer",
            "inflight_bytes_per_peer",
            "max_peers_per_download",
            "max_providers_considered",
            "dial_window",
            "max_failures",
            "endgame_copies",
            "io_threads",
            "serve_max_reads",
        )
        confcheck.at_least(
            self, 0, "rediscover_attempts", "hash_workers", "serve_max_queued", "serve_min_per_peer"
        )
        confcheck.positive(
            self,
            "piece_timeout",
            "manifest_timeout",
            "dial_timeout",
            "busy_backoff",
            "busy_give_up",
            "announce_interval",
            "contact_poll_interval",
        )
        # 0: report every change / retry at once / never check (stale_check_interval).
        confcheck.at_least(self, 0, "rediscover_delay", "progress_interval", "stale_check_interval")
        if self.busy_backoff_max < self.busy_backoff:
            confcheck.fail(
                self,
                "busy_backoff_max",
                f"must be at least busy_backoff ({self.busy_backoff}), got {self.busy_backoff_max}",
            )
