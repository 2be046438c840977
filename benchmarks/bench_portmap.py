"""Port mapping figures in the network lab (a benchmark, not a test; root only).

    python benchmarks/bench_portmap.py [--runs 10]

Starts miniupnpd on a lab router (p2pnode/sim/netlab.py ``Lab.upnp``) and, from a host
behind it, times ``PortMapper.start()`` to a working TCP+UDP mapping for each
method (UPnP-IGD, PCP, NAT-PMP), discovery included. The baseline, measured in
the same run: one NAT-PMP public address exchange with the same router (the
floor of any mapping: one datagram each way).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pnode.sim.netlab import Lab, missing_tools, missing_upnp

TIMES = """
import asyncio, json, sys, time
from collections import Counter
from p2pnode.nat.portmap import PortMapper
from p2pnode.nat.portmap_core import PortMapConfig
from p2pnode.nat.portmap_natpmp import NatPmpGateway, default_gateway

async def main():
    method, runs, out = sys.argv[1], int(sys.argv[2]), []
    for i in range(runs):
        if method == "baseline":
            started = time.perf_counter()
            gateway = await NatPmpGateway.open(default_gateway(), 3.0, Counter())
            out.append(time.perf_counter() - started)
            gateway.close()
            continue
        mapper = PortMapper(PortMapConfig(methods=(method,)), 20000 + i)
        mapped = asyncio.Event()
        mapper.on_change(lambda address: mapped.set() if address else None)
        mapper.start()
        await asyncio.wait_for(mapped.wait(), 10)
        while len(mapper.status()["mappings"]) < 2:  # UDP comes right after TCP
            await asyncio.sleep(0.001)
        out.append(mapper.first_mapped_after)
        await mapper.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    missing = missing_tools() + missing_upnp()
    if missing:
        sys.exit(f"lab unavailable: {', '.join(missing)}")
    with Lab() as lab:
        net = lab.public_bridge("203.0.113.0/24")
        stun = lab.host("a", on=net)
        router = lab.router("r", wan=net, lan="100.64.1.0/24", nat="eim")
        host = lab.host("c", behind=router)
        lab.upnp(router, stun=stun)
        print(f"time to a working TCP+UDP mapping, {args.runs} runs (ms)")
        for method in ("baseline", "upnp", "pcp", "natpmp"):
            argv = [sys.executable, "-c", TIMES, method, str(args.runs)]
            times = [t * 1000 for t in json.loads(lab.run(host, argv, timeout=300).stdout)]
            name = "baseline (one NAT-PMP exchange)" if method == "baseline" else method
            print(
                f"  {name:32} median {statistics.median(times):7.1f}"
                f"  min {min(times):7.1f}  max {max(times):7.1f}"
            )


if __name__ == "__main__":
    main()
