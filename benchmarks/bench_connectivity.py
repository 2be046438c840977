"""The connectivity matrix of issue 12 (a benchmark, not a test; root only).

    sudo python benchmarks/bench_connectivity.py [--size-mib 4] [--kinds public,upnp,eim,...]

Builds the network-namespace lab (p2pnode/sim/netlab.py): a public seed and,
for each kind of placement, a provider and a downloader (public on the bridge,
or alone behind a home router: eim = `masquerade`, symmetric = `masquerade
random`, firewall = routed LAN; every router drops unsolicited inbound). Every
downloader gets every provider's file through the DHT only. Prints, for each
pair, how the connection was made (the downloader's `connections`), the time to
the first byte and to the end, and as the baseline measured in the same run the
public -> public pair.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pnode.sim.netlab import Lab, missing_tools
from tests.connectivity import Matrix, kinds_here


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=float, default=4.0)
    parser.add_argument("--kinds", default=",".join(kinds_here()))
    args = parser.parse_args()
    missing = missing_tools()
    if missing:
        print(f"needs the lab: {', '.join(missing)}", file=sys.stderr)
        return 2
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
        matrix = Matrix(lab, Path(tmp), kinds)
        matrix.start()
        settled = matrix.wait_settled()
        slowest = max(settled, key=lambda name: settled[name])
        print(
            f"reachability settled (verdict, and relay slots if private) after start: "
            f"slowest {slowest} {settled[slowest]:.1f} s"
        )
        ids = matrix.share_all(int(args.size_mib * 2**20))
        matrix.wait_announced(ids)
        print(f"{'provider':>10} -> {'downloader':<10} {'via':<10} {'first byte':>10} {'total':>8}")
        for p_kind, provider in matrix.providers.items():
            for d_kind, downloader in matrix.downloaders.items():
                dest = downloader.home / f"from-{p_kind}.bin"
                got = downloader.get_timed(ids[(p_kind, d_kind)], dest)
                conns = downloader.connection_to(provider.info["peer_id"])
                via = ",".join(sorted({c["via"] for c in conns})) or "-"
                first = f"{got.first_byte:.3f}s" if got.first_byte is not None else "-"
                result = f"{got.total:.3f}s" if got.ok else f"FAILED: {got.error[:60]}"
                print(f"{p_kind:>10} -> {d_kind:<10} {via:<10} {first:>10} {result:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
