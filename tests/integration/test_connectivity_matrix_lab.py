"""Issue 12's matrix: a provider behind each kind of router, a downloader behind
each; every download goes through the DHT only and must succeed, made the way
the routers allow: straight to a public (or port-mapped) provider, punched
where both NATs keep ports (or the downloader is public: reversal), relayed
where a symmetric NAT defeats punching."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pnode.sim.netlab import Lab
from tests.conftest import needs_lab
from tests.connectivity import Matrix, kinds_here

pytestmark = needs_lab


def expected_via(provider: str, downloader: str) -> set[str]:
    if provider in ("public", "upnp"):
        return {"direct"}  # upnp: to the address the router mapped
    if downloader in ("public", "upnp"):
        return {"punched"}  # connection reversal: the provider dials out
    if "symmetric" in (provider, downloader):
        # a symmetric NAT maps each destination to a new port: nothing to aim at
        return {"relayed"}
    return {"punched"}


@pytest.mark.timeout(240)
def test_every_pair_connects_through_the_dht_only(lab: Lab, tmp_path: Path) -> None:
    matrix = Matrix(lab, tmp_path)
    matrix.start()
    # Measured in the steady state: verdicts known, private nodes holding relay
    # slots, their records carrying the relays (a download started earlier looks
    # the provider up again until its relays show: the test below).
    matrix.wait_settled()
    ids = matrix.share_all(2 * 1024 * 1024)
    matrix.wait_announced(ids)
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    for p_kind, provider in matrix.providers.items():
        for d_kind, downloader in matrix.downloaders.items():
            dest = downloader.home / f"from-{p_kind}.bin"
            got = downloader.get_timed(ids[(p_kind, d_kind)], dest)
            conns = downloader.connection_to(provider.info["peer_id"])
            via = ",".join(sorted({c["via"] for c in conns})) or "none"
            seen[(p_kind, d_kind)] = (via, "ok" if got.ok else got.error)
    table = "\n".join(f"{p:>9} -> {d:<9} {via:<16} {res}" for (p, d), (via, res) in seen.items())
    failures = [
        (pair, result)
        for pair, result in seen.items()
        if result[1] != "ok" or not set(result[0].split(",")) & expected_via(*pair)
    ]
    assert not failures, f"provider -> downloader, via, result:\n{table}"
    assert set(kinds_here()) == set(matrix.providers)


@pytest.mark.timeout(120)
def test_a_get_started_as_a_natted_provider_comes_up_finds_its_relays(
    lab: Lab, tmp_path: Path
) -> None:
    """No waiting for the steady state: the provider shares at once and the get
    starts at once. Its first record names only the NAT's address, which drops
    the dial; the downloader must look the provider up again (its fresh record
    names its relay) instead of failing after the handshake timeout."""
    matrix = Matrix(lab, tmp_path, kinds=("eim",), downloaders=("public",))
    # The downloader offers no relay: the provider would reserve a slot on it,
    # and that connection would carry the download whatever the records say.
    matrix.start(only={"d-public": ("--relay-service", "never")})
    provider = matrix.providers["eim"]
    downloader = matrix.downloaders["public"]
    ids = matrix.share_all(1024 * 1024)
    early = provider.request("GET", "/v1/status").get("relay", {})
    # The get starts before the provider holds a relay slot, let alone announces it.
    assert not early.get("reservations"), early
    got = downloader.get_timed(ids[("eim", "public")], downloader.home / "got.bin")
    status = provider.request("GET", "/v1/status")
    assert got.ok, (got, status.get("reachability"), status.get("relay"))
    data = (provider.home / "for-public.bin").read_bytes()
    assert (downloader.home / "got.bin").read_bytes() == data
    # Not after a dial to the NAT's address ran into the handshake timeout (10 s).
    assert got.total < 10, got
