"""``--adversarial``: colluding Sybils in the virtual-time simulator.

No success threshold here (the DHT under test changes): the report carries the
figures, and the adversary really acts (ids ground next to the targets, forged
answers sent, lookups eclipsed, providers spammed), deterministically per seed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
from typing import Any

import pytest

from p2pnode.clock import FakeClock
from p2pnode.dht import codec
from p2pnode.identity import Identity
from p2pnode.sim.adversary import SybilProtocol, SybilRegistry, Target, grind, records
from p2pnode.sim.report import format_table, simulated_part
from p2pnode.sim.run import run_simulation
from p2pnode.sim.scenario import ScenarioConfig, ScenarioError, generate

try:
    proof: Any = importlib.import_module("p2pnode.dht.proof")
except ImportError:  # the DHT before proven ids
    proof = None

ATTACKED = ScenarioConfig(
    mode="virtual",
    nodes=150,
    seed=7,
    adversarial=0.2,
    join_rate=0.0,
    join_concurrency=32,
    duration=15.0,
    lookups=60,
    dht_values=6,
    dht_records=6,
    resources=2,
    resource_size=32 * 1024,
    fetches_per_resource=1,
    provider_lookups_per_resource=3,
    probe_lookups=10,
    converge_timeout=10.0,
)


def _run(config: ScenarioConfig) -> dict[str, Any]:
    return run_simulation(config, progress=False).report


def _rate(value: float | None) -> bool:
    return value is None or 0.0 <= value <= 1.0


@pytest.mark.timeout(120)
def test_sybils_act_and_the_report_counts_honest_success() -> None:
    report = _run(ATTACKED)
    adv = report["adversarial"]
    assert adv["adversaries"] == 30 and adv["honest_nodes"] == 120
    assert report["join"]["join_failures"] == 0
    for name in ("lookup", "record_get", "provider_lookup", "value_get", "download"):
        assert _rate(adv["success"][name]), name
    assert set(adv["forged_accepted"]) == {"values", "records", "stale_records"}
    # The Sybils got into honest routing tables (they prove their ids).
    tables = adv["routing_tables"]
    assert 0 < tables["sybil_contacts"] < tables["contacts"]
    # Every workload actor and lookup target is honest.
    sybils = set(generate(ATTACKED).adversaries)
    assert not any(op["node"] in sybils for op in report["ops"] if op["kind"] != "start")
    assert not any(op["arg"] in sybils for op in report["ops"] if op["kind"] == "lookup")

    sybil = adv["adversary"]
    acts = sybil["actions"]
    assert sybil["sybils"] == 30
    assert acts["eclipse_answers"] > 0 and acts["impersonations"] > 0
    assert acts["forged_values_sent"] + acts.get("forged_records_sent", 0) > 0
    assert acts["fake_provider_records_sent"] > 0
    assert acts["provider_announcements_pushed"] > 0
    assert acts["stores_dropped"] > 0
    assert acts.get("identify_answered", 0) + acts["received.ping"] > 0
    # Ground ids: nearer to their targets than any honest node is.
    grinding = sybil["grinding"]
    assert grinding["tries"] >= ATTACKED.adv_grind_tries
    assert grinding["prefix_bits"]["min"] >= 10
    assert sybil["closeness"]["sybil_nearer_than_every_honest_node"] >= 25
    assert "wall_seconds" not in grinding  # wall time lives under "wallclock"
    assert report["wallclock"]["adversary"]["grinding_wall_seconds"] > 0
    # A forged value a get accepted is counted as such, not as a plain wrong value.
    gets = report["dht_values"]["get"]
    assert adv["forged_accepted"]["values"] == gets["errors"].get("forged", 0)
    table = format_table(report)
    assert "signed-record gets ok" in table and "provider lookups ok" in table
    assert report["figures"]["adversarial_fraction"] == 0.2


@pytest.mark.timeout(120)
def test_same_seed_same_adversarial_report_and_switches_turn_behaviours_off() -> None:
    small = dataclasses.replace(ATTACKED, nodes=60, lookups=20, duration=8.0)
    first = json.dumps(simulated_part(_run(small)), sort_keys=True)
    assert first == json.dumps(simulated_part(_run(small)), sort_keys=True)
    tame = dataclasses.replace(
        small,
        adv_eclipse=False,
        adv_impersonate=False,
        adv_forge=False,
        adv_spam_providers=False,
    )
    acts = _run(tame)["adversarial"]["adversary"]["actions"]
    for name in (
        "eclipse_answers",
        "impersonations",
        "forged_values_sent",
        "forged_records_sent",
        "fake_provider_records_sent",
        "provider_announcements_pushed",
    ):
        assert acts.get(name, 0) == 0, name


def test_grinding_is_deterministic_and_buys_prefix_bits() -> None:
    targets = [Target("value", bytes([i]) * 20) for i in range(4)]
    specs, cost = grind(3, targets, 8, 4096)
    again, _ = grind(3, targets, 8, 4096)
    assert [s.identity.node_id for s in specs] == [s.identity.node_id for s in again]
    assert [s.target for s in specs] == [0, 1, 2, 3, 0, 1, 2, 3]
    # 4,096 tries over 4 targets: each best id shares ~10 bits, random ones ~1.
    assert min(s.prefix_bits for s in specs) >= 6
    assert cost["tries"] == 4096 and cost["sybils"] == 8


def test_adversaries_need_virtual_mode_and_a_sane_fraction() -> None:
    with pytest.raises(ScenarioError, match="virtual"):
        dataclasses.replace(ATTACKED, mode="inprocess").validate()
    with pytest.raises(ScenarioError, match="adversarial"):
        dataclasses.replace(ATTACKED, adversarial=0.6).validate()
    plan = generate(ATTACKED)
    assert len(plan.adversaries) == 30
    assert not plan.adversaries & set(range(ATTACKED.seeds))  # seeds are honest


class _Wire(asyncio.DatagramTransport):
    """Captures what a Sybil sends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.sent.append((bytes(data), addr))


def _sybil() -> tuple[SybilProtocol, _Wire, Target]:
    publisher = Identity.from_seed(b"\x01" * 32)
    record_key = records.mutable_key(publisher.node_id, "name") if records else b"\x02" * 20
    targets = [Target("record", record_key, publisher.public_key, "name")]
    specs, cost = grind(1, targets, 2, 64)
    registry = SybilRegistry(ATTACKED, targets, specs, cost)
    for spec in specs:
        registry.join(spec.identity.node_id, "100.64.0.9", 4001)
    sybil = SybilProtocol(specs[0], registry, "100.64.0.9", FakeClock(100_000.0), 1)
    wire = _Wire()
    sybil.connection_made(wire)
    return sybil, wire, targets[0]


def _ask(sybil: SybilProtocol, wire: _Wire, name: str, args: list[object]) -> object:
    sybil.datagram_received(codec.encode_request(b"\x07" * 20, name, args), ("100.64.0.5", 4001))
    reply = codec.decode_datagram(wire.sent.pop()[0], codec.Limits())
    assert isinstance(reply, codec.Response)
    return reply.payload


@pytest.mark.skipif(proof is None or records is None, reason="needs the proven-id DHT")
def test_a_sybil_proves_its_id_and_its_forgeries_are_the_real_thing() -> None:
    """The measurement is only honest if the Sybils lie well: their id proofs verify,
    their fake provider records verify, only their forged records do not."""
    sybil, wire, target = _sybil()
    asker, challenge = b"\x05" * 20, b"c" * 16
    identify = _ask(sybil, wire, "identify", [asker, challenge])
    assert isinstance(identify, list)
    assert proof.check_proof(sybil.node_id, asker, challenge, identify[0], identify[1])
    answer = _ask(sybil, wire, "get_providers", [asker, target.key])
    assert isinstance(answer, dict) and answer["providers"]
    for wire_record in answer["providers"]:
        fake = records.parse_provider_record(target.key, wire_record)
        records.verify_provider_record(fake, 100_000.0, 3600 * 24)  # validly signed
    nodes = _ask(sybil, wire, "find_node", [asker, b"\x03" * 20])
    assert isinstance(nodes, list) and nodes[0][0] == b"\x03" * 20  # the impostor entry
    assert all(entry[0] in sybil.registry.ids for entry in nodes[1:])  # colluders only
    forged = _ask(sybil, wire, "find_value", [asker, target.key])
    assert isinstance(forged, dict)
    with pytest.raises(records.RecordError, match="bad_signature"):
        records.open_value(target.key, forged["value"], 100_000.0, 3600 * 24)
    assert sybil.registry.stats["forged_records_sent"] == 1
    # Garbage is dropped and counted, never answered.
    sybil.datagram_received(b"\x00" * 30, ("100.64.0.5", 4001))
    sybil.datagram_received(codec.encode_request(b"\x07" * 20, "identify", [asker]), ("x", 1))
    assert not wire.sent
    assert sybil.registry.stats["dropped_undecodable"] == 1
