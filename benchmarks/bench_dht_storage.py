"""Cost of the DHT stores under the floods of issue 10 (pure code, no sockets).

    python benchmarks/bench_dht_storage.py

Figures are per operation on this machine; noisy under shared load. Provider
records are signed beforehand: the figures include verifying, not signing.
"""

from __future__ import annotations

import os
import random
import time

from p2pnode.clock import FakeClock
from p2pnode.dht.config import DhtConfig
from p2pnode.dht.core import DhtCore
from p2pnode.dht.records import ProviderRecord, sign_provider_record
from p2pnode.identity import Identity


def main() -> None:
    config = DhtConfig()
    clock = FakeClock(1_700_000_000.0)
    core = DhtCore(Identity.generate(), config, clock=clock, rng=random.Random(1))
    values = [os.urandom(4096) for _ in range(50)]
    start = time.perf_counter()
    for i in range(1000):  # attack 5: 1,000 x 4 KiB from each of 11 addresses
        for ip in range(2, 13):
            core.storage.put(os.urandom(20), values[i % 50], sender=f"127.0.0.{ip}")
    per_put = (time.perf_counter() - start) / 11_000
    fresh = core.storage.put(os.urandom(20), "fresh", sender="192.0.2.1")
    print(
        f"values, 11,000 x 4 KiB from 11 IPs: {per_put * 1e6:.1f} us/put; "
        f"{len(core.storage)} held, {core.storage.bytes_used} bytes; a new value stored: {fresh}"
    )
    key = os.urandom(20)
    expires = int(clock.now() + config.provider_ttl)

    def record(host: str, port: int) -> ProviderRecord:
        return sign_provider_record(Identity.generate(), key, [(host, port)], 1, expires)

    flood = [record("127.0.0.2", 9) for _ in range(10_000)]  # signed before the clock starts
    start = time.perf_counter()
    for r in flood:  # attack 2, longer: one address, one key, fresh key pairs
        core.providers.add_record(r, "127.0.0.2")
    per_add = (time.perf_counter() - start) / 10_000
    core.providers.add_record(record("127.0.0.1", 4001), "127.0.0.1")
    start = time.perf_counter()
    for _ in range(1000):
        answer = core.providers.get_records(key, config.max_providers_per_response)
    per_get = (time.perf_counter() - start) / 1000
    print(
        f"providers, 10,000 add_provider to one key from one IP: {per_add * 1e6:.1f} us/add; "
        f"answer {per_get * 1e6:.1f} us, {len(answer)} records from "
        f"{sorted({a.host for a in answer})}"
    )
    count = 20_000
    start = time.perf_counter()
    for i in range(count):  # the store full, each put from another /24
        core.storage.put(os.urandom(20), 1, sender=f"10.{i // 256 % 256}.{i % 256}.1")
    per_put = (time.perf_counter() - start) / count
    print(
        f"values, {count:,} puts from distinct /24s into a full store: {per_put * 1e6:.1f} us/put"
    )


if __name__ == "__main__":
    main()
