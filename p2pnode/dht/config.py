"""Tunables of the DHT layer, with sane defaults (short ones in tests)."""

from __future__ import annotations

from dataclasses import dataclass

from p2pnode import confcheck

# A store request's bytes besides the value (ids, key, msgpack framing).
DATAGRAM_OVERHEAD = 256
# What a stored entry costs besides its value / host text (key, bookkeeping), for
# the stores' byte budgets.
VALUE_OVERHEAD = 64
PROVIDER_RECORD_BYTES = 96


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
    # Stored values last written by one sender (source IP), so one address cannot
    # fill the store and have everyone else's values refused.
    max_values_per_sender: int = 1_000
    # Past a quota (per sender, per IPv4 /24 or IPv6 /64) the holder's own oldest
    # values go; a full store (in values or bytes) evicts from its heaviest user.
    # Nothing is refused to a newcomer, so a flood cannot lock new values out.
    max_values_per_subnet: int = 2_000
    max_value_store_bytes: int = 16 * 1024 * 1024
    value_ttl: float = 24 * 3600.0
    refresh_interval: float = 3600.0
    # Provider records (resource exchange).
    provider_ttl: float = 24 * 3600.0
    provider_republish: float = 12 * 3600.0
    # The nodes that accepted our provider records are pinged this often (at most
    # max_holder_pings per round); a key that lost half its holders is announced
    # again at once, so churn among the k closest cannot hide a live provider.
    provider_check_interval: float = 120.0
    max_holder_pings: int = 256
    # A full key evicts its least deserving record (from the subnet and address
    # holding most of the key, then the oldest) instead of refusing a newcomer;
    # the per key, per sender and per subnet quotas evict the holder's own oldest.
    max_providers_per_key: int = 64
    max_providers_per_key_per_ip: int = 8
    max_providers_per_key_per_subnet: int = 16
    max_provider_keys_per_sender: int = 4096
    max_provider_records_per_subnet: int = 8192
    max_provider_keys: int = 100_000
    # Total provider records over all keys, and their bytes.
    max_provider_records: int = 200_000
    max_provider_bytes: int = 32 * 1024 * 1024
    # At most this many provider records in one get_providers answer.
    max_providers_per_response: int = 32
    # Values this node put are published again this often (seconds).
    value_republish: float = 3600.0
    # A whole lookup (find_peer, closest, get, find_providers, ...) gives up after this
    # long and returns what it has; it also asks at most max_lookup_queries nodes.
    lookup_timeout: float = 30.0
    max_lookup_queries: int = 200
    # A lookup query unanswered this long stops counting against alpha, so dead
    # contacts among the closest do not hold a lookup for a whole rpc_timeout.
    # A ceiling: once round trips are measured, 4 smoothed RTTs (at least 0.25 s).
    lookup_stall: float = 1.0
    # Incoming requests: a token bucket per source IP (requests per second, burst),
    # remembered for at most rate_limit_table_size IPs (least recently seen dropped).
    request_rate: float = 200.0
    request_burst: float = 400.0
    rate_limit_table_size: int = 4096
    # Loopback sources cannot be spoofed from outside the host; by default they are
    # not rate limited, so many nodes on one machine (tests, simulations) can talk.
    rate_limit_loopback: bool = False
    # Decoder limits besides max_datagram (which bounds bin and str lengths).
    max_array_len: int = 512
    max_map_len: int = 8
    # A find_node / find_value / get_providers answer listing more contacts is malformed.
    max_response_contacts: int = 64
    # Values pushed to newly seen nodes (Kademlia's "welcome"): a bounded queue sent at
    # most welcome_store_rate per second, scanning at most welcome_scan_max values.
    welcome_queue_max: int = 256
    welcome_store_rate: float = 20.0
    welcome_scan_max: int = 512
    # Unknown nodes that send us requests are pinged before they enter the routing
    # table (their source address could be spoofed): a bounded queue, a few at a time.
    verify_queue_max: int = 64
    verify_concurrency: int = 8
    # ...and at most this many of those queued come from one /24 or /64, so spoofed
    # sources cannot fill the queue and starve honest newcomers.
    verify_queue_per_subnet: int = 4

    # -- the open network (ids proven, diversity, tokens, disjoint lookups) --------
    # A contact proves its id (the hash of its Ed25519 key) by signing a challenge
    # (the identify RPC). Contacts that cannot (stock kademlia nodes) are lookup
    # hints only: at most max_unproven_per_bucket of a bucket, never asked to store.
    accept_unproven_contacts: bool = True
    max_unproven_per_bucket: int = 2
    # Routing-table diversity: contacts per IPv4 /24 or IPv6 /64, per bucket and in
    # the whole table. Loopback peers are exempt unless told otherwise (a test
    # network on one machine); when not exempt, each loopback address is a group.
    max_contacts_per_subnet_bucket: int = 2
    max_contacts_per_subnet_table: int = 6
    diversity_exempt_loopback: bool = True
    # Store and add_provider need a token the sender's address earned from one of
    # our identify or get_providers answers (BEP 5): a keyed hash of the address;
    # the key rotates this often, and a token of the previous key is still good.
    token_rotation: float = 300.0
    # Lookups follow this many disjoint paths (S/Kademlia): a node answers on one
    # path only, so an adversary on one path cannot steer the others.
    lookup_paths: int = 3

    def __post_init__(self) -> None:
        confcheck.check_types(self)
        confcheck.at_least(self, 1, "ksize", "alpha", "max_failures", "max_lookup_queries")
        confcheck.at_least(
            self,
            1,
            "max_value_bytes",
            "max_stored_values",
            "max_values_per_sender",
            "max_values_per_subnet",
            "max_providers_per_key_per_ip",
            "max_providers_per_key_per_subnet",
            "max_provider_records_per_subnet",
        )
        confcheck.at_least(
            self,
            1,
            "max_providers_per_key",
            "max_provider_keys_per_sender",
            "max_provider_keys",
            "max_provider_records",
            "max_providers_per_response",
            "rate_limit_table_size",
            "max_array_len",
            "max_map_len",
            "verify_concurrency",
            "verify_queue_per_subnet",
            "max_contacts_per_subnet_bucket",
            "max_contacts_per_subnet_table",
            "lookup_paths",
        )
        confcheck.at_least(
            self,
            0,
            "max_holder_pings",
            "welcome_queue_max",
            "welcome_scan_max",
            "verify_queue_max",
            "max_unproven_per_bucket",
        )
        confcheck.positive(
            self,
            "rpc_timeout",
            "value_ttl",
            "provider_ttl",
            "lookup_timeout",
            "lookup_stall",
            "request_rate",
            "token_rotation",
        )
        # Periodic jobs clamp a 0 interval to a floor (tests use 0 to run them often).
        confcheck.at_least(
            self,
            0,
            "refresh_interval",
            "provider_republish",
            "provider_check_interval",
            "value_republish",
            "welcome_store_rate",
        )
        # A bucket holding less than one token refuses every request.
        confcheck.at_least(self, 1, "request_burst")
        if self.max_value_bytes + DATAGRAM_OVERHEAD > self.max_datagram:
            confcheck.fail(
                self,
                "max_datagram",
                f"must leave {DATAGRAM_OVERHEAD} bytes beyond max_value_bytes "
                f"({self.max_value_bytes}), got {self.max_datagram}",
            )
        # One value or provider record must always fit the byte budgets.
        if self.max_value_store_bytes < self.max_value_bytes + VALUE_OVERHEAD:
            confcheck.fail(
                self,
                "max_value_store_bytes",
                f"must hold one value of max_value_bytes ({self.max_value_bytes}) "
                f"plus {VALUE_OVERHEAD}, got {self.max_value_store_bytes}",
            )
        if self.max_provider_bytes < PROVIDER_RECORD_BYTES + 64:
            confcheck.fail(
                self,
                "max_provider_bytes",
                f"must hold one record ({PROVIDER_RECORD_BYTES + 64}), "
                f"got {self.max_provider_bytes}",
            )
        if self.max_response_contacts < self.ksize:
            confcheck.fail(
                self,
                "max_response_contacts",
                f"must be at least ksize ({self.ksize}), got {self.max_response_contacts}",
            )
