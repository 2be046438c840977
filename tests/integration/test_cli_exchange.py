"""Share and get through the CLI, as a user does, between real node processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.cli_helpers import RunningNode, poll, run_cli


def n1_port(node: RunningNode) -> str:
    return node.bootstrap.rsplit(":", 1)[1]


def _network(tmp_path: Path, nodes: list[RunningNode]) -> tuple[Path, Path]:
    first = RunningNode(tmp_path / "n1")
    nodes.append(first)
    nodes.append(RunningNode(tmp_path / "n3", "--bootstrap", first.bootstrap))
    return tmp_path / "n1", tmp_path / "n3"


def test_share_providers_get_ls_unshare(tmp_path: Path, nodes: list[RunningNode]) -> None:
    n1, n3 = _network(tmp_path, nodes)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    photos = tmp_path / "photos"
    (photos / "2024" / "summer").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(os.urandom(5000))
    (photos / "2024" / "summer" / "b.jpg").write_bytes(os.urandom(70000))
    (photos / "empty.txt").write_bytes(b"")

    rid = run_cli("--home", str(n1), "share", str(big)).stdout.strip()
    assert run_cli("--home", str(n1), "share", str(big)).stdout.strip() == rid, (
        "same content, same id"
    )
    fid = json.loads(run_cli("--home", str(n1), "share", str(photos), "--json").stdout)["id"]

    def found() -> bool:
        out = run_cli("--home", str(n3), "providers", rid, "--json").stdout
        return len(json.loads(out)["providers"]) == 1

    poll(found)
    table = run_cli("--home", str(n3), "providers", rid).stdout
    assert "1 provider(s)" in table

    out = tmp_path / "out"
    out.mkdir()
    got = run_cli("--home", str(n3), "get", rid, "-o", str(out / "big.bin"))
    assert "verified" in got.stdout
    assert (out / "big.bin").read_bytes() == big.read_bytes()
    # The download's connection, and how it was made.
    peer1 = json.loads(run_cli("--home", str(n1), "id", "--json").stdout)["peer_id"]
    conns = json.loads(run_cli("--home", str(n3), "connections", "--json").stdout)
    to_n1 = [c for c in conns["connections"] if c["peer_id"] == peer1]
    # (n1 may have its own connection to n3 too, say an AutoNAT dial-back: inbound)
    assert any(c["via"] == "direct" and c["direction"] == "outbound" for c in to_n1), to_n1
    assert peer1 in run_cli("--home", str(n3), "connections").stdout
    # Progress (stderr, not a terminal here): however fast, the last line says 100%.
    lines = got.stderr.strip().splitlines()
    last = lines[-1]
    assert last.startswith("100.0%") and last.endswith("done"), got.stderr
    # ... and how many peers the bytes came from (not the peers busy at that instant: 0).
    assert "from 1 peer  done" in last, got.stderr
    # Before the bytes, what it did: each phase once, in order.
    peer1_short = peer1[:8]
    assert lines[:3] == [
        "looking up providers...",
        "found 1 provider, connecting...",
        f"fetching the manifest from {peer1_short}@127.0.0.1:{n1_port(nodes[0])}...",
    ], got.stderr
    assert all("%" in line for line in lines[3:]), got.stderr
    # Into an existing folder: the resource keeps its own name. With --json, the
    # same as JSON lines on stderr (the phases, then the progress); the result on stdout.
    got = run_cli("--home", str(n3), "get", fid, "-o", str(out), "--json")
    assert json.loads(got.stdout)["id"] == fid
    events = [json.loads(line) for line in got.stderr.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[:3] == ["phase"] * 3 and set(kinds[3:]) == {"progress"}, got.stderr
    assert [e["phase"] for e in events[:3]] == ["lookup", "connecting", "manifest"]
    assert events[0]["lookup"] == 1 and events[1]["providers"] == 1, events
    assert events[2]["peer"].startswith(peer1_short) and events[2]["id"] == fid, events
    assert events[2]["via"] == "direct", events
    assert events[-1]["state"] == "done" and events[-1]["id"] == fid, events
    assert events[-1]["peers_used"] == 1, events
    for rel in ("a.jpg", "2024/summer/b.jpg", "empty.txt"):
        assert (out / "photos" / rel).read_bytes() == (photos / rel).read_bytes()

    # Asking again for something already here copies it locally.
    run_cli("--home", str(n3), "get", rid, "-o", str(out / "copy.bin"))
    assert (out / "copy.bin").read_bytes() == big.read_bytes()
    (out / "copy.bin").unlink()

    # An existing destination needs --force, and is left untouched without it.
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(40000))
    sid = run_cli("--home", str(n1), "share", str(small)).stdout.strip()
    taken = out / "taken.bin"
    taken.write_bytes(b"mine")
    refused = run_cli("--home", str(n3), "get", sid, "-o", str(taken), check=False)
    assert refused.returncode == 1 and "already exists" in refused.stderr
    assert "use --force" in refused.stderr, refused.stderr
    assert taken.read_bytes() == b"mine"
    run_cli("--home", str(n3), "get", sid, "-o", str(taken), "--force")
    assert taken.read_bytes() == small.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["big.bin", "photos", "taken.bin"]

    listing = json.loads(run_cli("--home", str(n3), "ls", "--json").stdout)["resources"]
    states = {r["id"]: (r["state"], r["served"]) for r in listing}
    assert states[rid] == ("complete", True) and states[fid] == ("complete", True)
    assert "big.bin" in run_cli("--home", str(n1), "ls").stdout

    run_cli("--home", str(n1), "unshare", fid)
    after = json.loads(run_cli("--home", str(n1), "ls", "--json").stdout)["resources"]
    served = {r["id"]: r["served"] for r in after}
    assert served.get(fid) in (None, False) and served[rid] is True
    # The table says so too, not "shared".
    row = next(line for line in run_cli("--home", str(n1), "ls").stdout.splitlines() if fid in line)
    assert "unshared" in row and " shared " not in row, row

    # A shared file changed on disk: the next ls says stale, and why.
    small.write_bytes(os.urandom(40001))
    listing = run_cli("--home", str(n1), "ls").stdout
    row = next(line for line in listing.splitlines() if line.startswith(sid))
    assert "stale" in row and f"{sid}: not served:" in listing, listing


def test_get_errors_are_clear(tmp_path: Path, nodes: list[RunningNode]) -> None:
    _, n3 = _network(tmp_path, nodes)
    junk = run_cli("--home", str(n3), "get", "not-an-id", "-o", str(tmp_path / "x"), check=False)
    assert junk.returncode == 1 and "error" in junk.stderr
    unknown = "res" + "a" * 52
    missing = run_cli("--home", str(n3), "get", unknown, "-o", str(tmp_path / "x"), check=False)
    assert missing.returncode == 1 and "no providers" in missing.stderr
    # It said what it was doing, and the error names the lookups made.
    assert missing.stderr.splitlines()[:3] == [
        "looking up providers...",
        "no provider found yet, looking again (2/3)...",
        "no provider found yet, looking again (3/3)...",
    ], missing.stderr
    assert "3 DHT lookups" in missing.stderr.splitlines()[-1], missing.stderr
    assert not (tmp_path / "x").exists()
    nofile = run_cli("--home", str(n3), "share", str(tmp_path / "nope"), check=False)
    assert nofile.returncode == 1 and "no such file" in nofile.stderr


def test_get_from_a_provider_gone_says_what_it_tried(
    tmp_path: Path, nodes: list[RunningNode]
) -> None:
    """The only provider is known to the DHT but down: the get looks it up again
    (saying so), then fails naming the providers found, the lookups and why."""
    n1, n3 = _network(tmp_path, nodes)
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(40000))
    rid = run_cli("--home", str(n1), "share", str(small)).stdout.strip()

    def found() -> bool:
        out = run_cli("--home", str(n3), "providers", rid, "--json").stdout
        return len(json.loads(out)["providers"]) == 1

    poll(found)
    nodes[0].kill()
    failed = run_cli("--home", str(n3), "get", rid, "-o", str(tmp_path / "x"), check=False)
    assert failed.returncode == 1, failed.stderr
    lines = failed.stderr.splitlines()
    assert lines[:2] == ["looking up providers...", "found 1 provider, connecting..."], lines
    assert any(
        line.startswith("no provider reachable yet (1 attempt failed), looking again (2/")
        for line in lines
    ), lines
    error = lines[-1]
    assert error.startswith("p2pnode: error: no provider sent the manifest"), lines
    assert "1 provider(s) found in 3 DHT lookup(s)" in error, error
    assert "cannot connect" in error, error
    assert not (tmp_path / "x").exists()
