"""Simulation scenarios: a configuration (flags or TOML) and the plan it generates.

The plan is a pure function of the configuration, seed included: the same
``ScenarioConfig`` always gives the same ``Scenario`` (which node joins when and
through which seeds, which node shares, fetches, puts, gets or looks up what and
when, who is killed and restarted when). Nothing here touches sockets, files or
clocks; the runners execute a plan and measure it.

Timeline (seconds):

- join phase: node ``i`` starts at ``nodes[i].join_at`` (``i / join_rate``) after the
  phase starts; the first ``seeds`` nodes are the bootstrap nodes (seed 0 starts
  alone, the other seeds join through it). At each checkpoint size (8, 16, 32, ...
  nodes) the runner pauses joins and runs one round of probe lookups, which gives
  hops/RPCs per lookup against log2(N). Then rounds of probe lookups among all
  nodes until one round fully succeeds (time to converge).
- workload phase, ``duration`` seconds: the operations of ``Scenario.ops`` at
  their ``at`` offsets. Every operation's actor (and a lookup's target) is alive
  at that time according to the plan's own churn events.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Mode = Literal["inprocess", "processes", "virtual"]
MODES: tuple[Mode, ...] = ("inprocess", "processes", "virtual")
# Router kinds of the lab (p2pnode.sim.netlab.NatKind) a node may sit behind.
NAT_KINDS = ("eim", "symmetric", "firewall")
MAX_LAB_NODES = 200
MAX_LAB_ROUTED = 32  # firewalled LANs: /28s of the documentation ranges
VIRTUAL_LATENCY_MS = 20.0  # virtual mode's one-way delay unless --latency-ms says

OpKind = Literal[
    "share",
    "fetch",
    "put",
    "get",
    "lookup",
    "kill",
    "restart",
    "put_record",
    "get_record",
    "providers",
]
MAX_ADVERSARIAL = 0.5
MAX_ADVERSARY_HOSTS = 4096
# With adversaries, the workload also has signed records and provider lookups
# unless told otherwise (None: this many when adversarial > 0, else none).
ADVERSARIAL_RECORDS = 10
ADVERSARIAL_PROVIDER_LOOKUPS = 3

# Resource sizes are bounded so one simulation cannot fill a disk by accident.
MAX_RESOURCE_SIZE = 1 << 30
MAX_VALUE_SIZE = 4096
FIRST_CHECKPOINT = 8


class ScenarioError(ValueError):
    """A scenario configuration that cannot be run."""


@dataclass(frozen=True)
class ScenarioConfig:
    """Everything a simulation run depends on. Defaults: a quick ~20-node run."""

    nodes: int = 20
    mode: Mode = "inprocess"
    seed: int = 1
    # Bootstrap topology: this many seed nodes; each joiner is given this many of them.
    seeds: int = 1
    bootstrap_per_node: int = 1
    # Joins: nodes per second (0 = as fast as join_concurrency allows).
    join_rate: float = 50.0
    join_concurrency: int = 16
    # Probe lookups per round (checkpoints for hops vs log2(N), and convergence).
    probe_lookups: int = 20
    converge_timeout: float = 60.0
    # Workload phase.
    duration: float = 15.0
    resources: int = 4
    resource_size: int = 256 * 1024
    resource_size_max: int = 0  # 0: every resource is resource_size bytes
    fetches_per_resource: int = 3
    dht_values: int = 10
    dht_gets_per_value: int = 2
    value_size: int = 64
    lookups: int = 200
    # Signed (mutable) records: each is put twice by one node (a first version, then
    # the latest one) and got by others, who must see the latest (None: see above).
    dht_records: int | None = None
    record_gets_per_record: int = 2
    # find_providers by nodes that do not hold the resource (None: see above).
    provider_lookups_per_resource: int | None = None
    # Adversaries (virtual mode): this fraction of the nodes are Sybils with ids
    # ground next to the workload's target keys (p2pnode.sim.adversary); every
    # workload actor and target is honest. Each behaviour can be switched off.
    adversarial: float = 0.0
    # Ids ground next to the workload's keys; off: random ids (S/Kademlia's model).
    adv_cluster: bool = True
    adv_eclipse: bool = True  # answer lookups with colluders only
    adv_impersonate: bool = True  # list itself under the id a find_node seeks
    adv_forge: bool = True  # find_value answers forged values / records
    adv_spam_providers: bool = True  # fake provider records, answered and pushed
    adv_drop_stores: bool = True  # accept stores and add_provider, keep nothing
    # Grinding ids: Ed25519 keys tried in all (one pool shared by every target).
    adv_grind_tries: int = 65536
    # Where the Sybils live: this many IP addresses, each in its own /24, Sybils
    # spread over them on successive ports (1: one cheap host); 0: one address each.
    adv_hosts: int = 0
    # Churn: this fraction of the non-seed nodes is killed abruptly during the
    # workload (between 10% and 70% of it); this fraction of those comes back after
    # a downtime drawn from [downtime, downtime_max].
    churn: float = 0.0
    restart: float = 0.5
    downtime: float = 3.0
    downtime_max: float = 8.0
    # Network: in-process mode impairs the DHT (UDP) path only; virtual mode's link
    # model applies them to every datagram (loss: datagrams only; streams are
    # reliable). latency_ms None: 0 in-process (loopback), VIRTUAL_LATENCY_MS virtual.
    loss: float = 0.0
    latency_ms: float | None = None
    jitter_ms: float = 0.0
    # Virtual mode: each host's uplink in Mbit/s (0 = unlimited).
    bandwidth_mbit: float = 100.0
    # Processes mode, as root: place non-seed nodes behind home routers in a
    # network-namespace lab (p2pnode/sim/netlab.py), e.g. "eim=0.3,symmetric=0.2,
    # firewall=0.1": those fractions behind each kind of router, the rest public.
    nat: str = ""
    # Limits of the runner.
    max_inflight: int = 64
    lookup_timeout: float = 30.0
    dht_timeout: float = 30.0
    download_timeout: float = 60.0
    # After the workload's last scheduled operation, wait this long for those still
    # running (then they are cancelled and counted as failed).
    drain_timeout: float = 70.0
    start_timeout: float = 60.0
    # DHT overrides (None: the node's defaults, DhtConfig).
    rpc_timeout: float | None = None
    # In-process: run each node's control API, as `p2pnode start` does. Off by default:
    # the runner calls nodes directly, and each API costs a listening socket (fds
    # ran out past ~2,800 nodes) and memory. Needs NodeConfig to have the switch.
    control_api: bool = False

    def validate(self) -> ScenarioConfig:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ScenarioError(what)

        need(self.mode in MODES, f"mode must be one of {', '.join(MODES)}")
        need(self.nodes >= 1, "nodes must be at least 1")
        need(1 <= self.seeds <= self.nodes, "seeds must be 1..nodes")
        need(self.bootstrap_per_node >= 1, "bootstrap_per_node must be at least 1")
        need(self.join_rate >= 0, "join_rate must be >= 0")
        need(self.join_concurrency >= 1, "join_concurrency must be >= 1")
        need(self.probe_lookups >= 0, "probe_lookups must be >= 0")
        need(self.duration >= 0, "duration must be >= 0")
        for name in (
            "resources",
            "fetches_per_resource",
            "dht_values",
            "dht_gets_per_value",
            "lookups",
        ):
            need(getattr(self, name) >= 0, f"{name} must be >= 0")
        need(1 <= self.resource_size <= MAX_RESOURCE_SIZE, "resource_size must be 1 B..1 GiB")
        need(
            self.resource_size_max == 0
            or self.resource_size <= self.resource_size_max <= MAX_RESOURCE_SIZE,
            "resource_size_max must be 0 or resource_size..1 GiB",
        )
        need(1 <= self.value_size <= MAX_VALUE_SIZE, f"value_size must be 1..{MAX_VALUE_SIZE}")
        need(0 <= self.churn <= 1, "churn must be a fraction 0..1")
        need(0 <= self.restart <= 1, "restart must be a fraction 0..1")
        need(0 <= self.downtime <= self.downtime_max, "need 0 <= downtime <= downtime_max")
        need(0 <= self.loss < 1, "loss must be a probability 0..1 (exclusive)")
        need(
            (self.latency_ms is None or self.latency_ms >= 0) and self.jitter_ms >= 0,
            "latency and jitter must be >= 0",
        )
        need(self.bandwidth_mbit >= 0, "bandwidth_mbit must be >= 0")
        need(self.max_inflight >= 1, "max_inflight must be >= 1")
        for name in ("dht_records", "provider_lookups_per_resource"):
            count = getattr(self, name)
            need(count is None or count >= 0, f"{name} must be >= 0")
        need(self.record_gets_per_record >= 0, "record_gets_per_record must be >= 0")
        need(
            0 <= self.adversarial <= MAX_ADVERSARIAL,
            f"adversarial must be a fraction 0..{MAX_ADVERSARIAL}",
        )
        need(
            self.adversarial == 0 or self.mode == "virtual",
            "adversarial nodes run in virtual mode only",
        )
        need(self.adv_grind_tries >= 1, "adv_grind_tries must be >= 1")
        need(
            0 <= self.adv_hosts <= MAX_ADVERSARY_HOSTS,
            f"adv_hosts must be 0..{MAX_ADVERSARY_HOSTS}",
        )
        for name in (
            "lookup_timeout",
            "dht_timeout",
            "download_timeout",
            "drain_timeout",
            "start_timeout",
            "converge_timeout",
        ):
            need(getattr(self, name) > 0, f"{name} must be > 0")
        need(self.rpc_timeout is None or self.rpc_timeout > 0, "rpc_timeout must be > 0")
        fractions = self.nat_fractions()  # ScenarioError for a bad spec
        need(not fractions or self.mode == "processes", "nat needs mode processes")
        need(
            not fractions or self.nodes <= MAX_LAB_NODES,
            f"nat: at most {MAX_LAB_NODES} nodes (one /24 of public lab addresses)",
        )
        firewalled = round(fractions.get("firewall", 0) * (self.nodes - self.seeds))
        need(firewalled <= MAX_LAB_ROUTED, f"nat: at most {MAX_LAB_ROUTED} nodes behind firewalls")
        return self

    def nat_fractions(self) -> dict[str, float]:
        """``nat`` parsed: {router kind: fraction of the non-seed nodes}."""
        out: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in self.nat.split(","))):
            kind, sep, value = part.partition("=")
            kind = kind.strip()
            if not sep or kind not in NAT_KINDS:
                raise ScenarioError(
                    f"nat: {part!r} is not KIND=FRACTION with KIND one of {', '.join(NAT_KINDS)}"
                )
            try:
                fraction = float(value)
            except ValueError:
                raise ScenarioError(f"nat: {value!r} is not a fraction") from None
            if not 0 <= fraction <= 1 or kind in out:
                raise ScenarioError(f"nat: {part!r}: a fraction 0..1, each kind once")
            out[kind] = fraction
        if sum(out.values()) > 1 + 1e-9:
            raise ScenarioError("nat: the fractions add up to more than 1")
        return out

    def records(self) -> int:
        if self.dht_records is not None:
            return self.dht_records
        return ADVERSARIAL_RECORDS if self.adversarial > 0 else 0

    def provider_lookups(self) -> int:
        if self.provider_lookups_per_resource is not None:
            return self.provider_lookups_per_resource
        return ADVERSARIAL_PROVIDER_LOOKUPS if self.adversarial > 0 else 0

    def link_latency_ms(self) -> float:
        """The one-way delay in effect for this mode."""
        if self.latency_ms is not None:
            return self.latency_ms
        return VIRTUAL_LATENCY_MS if self.mode == "virtual" else 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(ScenarioConfig)}
_OPTIONAL_FLOATS = ("rpc_timeout", "latency_ms")
OPTIONAL_INTS = ("dht_records", "provider_lookups_per_resource")


def _coerce(name: str, value: Any) -> Any:
    default = _FIELDS[name].default
    if name in _OPTIONAL_FLOATS:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"{name} must be a number, got {value!r}")
        return float(value)
    if name in OPTIONAL_INTS:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ScenarioError(f"{name} must be true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"{name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ScenarioError(f"{name} must be a string, got {value!r}")
    return value


def config_from_mapping(
    data: Mapping[str, Any], base: ScenarioConfig | None = None
) -> ScenarioConfig:
    """A config from ``base`` (default: the defaults) with ``data``'s keys replaced.

    Keys are the field names (``-`` and ``_`` both accepted); unknown keys and
    wrongly typed values raise ScenarioError. A ``[scenario]`` table is used when
    present, so a TOML file may hold other tables too.
    """
    if "scenario" in data and isinstance(data["scenario"], Mapping):
        data = data["scenario"]
    changes: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in _FIELDS:
            raise ScenarioError(f"unknown scenario setting {raw_key!r}")
        changes[key] = _coerce(key, value)
    return dataclasses.replace(base or ScenarioConfig(), **changes).validate()


def load_config(path: Path, overrides: Mapping[str, Any] | None = None) -> ScenarioConfig:
    """A config from a TOML file, then ``overrides`` (e.g. command-line flags)."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ScenarioError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    config = config_from_mapping(data)
    return config_from_mapping(overrides or {}, config)


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class NodePlan:
    index: int
    is_seed: bool
    join_at: float
    bootstrap: tuple[int, ...]  # indices of the seed nodes it joins through


@dataclass(frozen=True)
class ResourcePlan:
    index: int
    name: str
    size: int
    content_seed: int

    def content(self) -> bytes:
        """The resource's bytes: a pure function of its content seed."""
        return random.Random(self.content_seed).randbytes(self.size)


@dataclass(frozen=True)
class ValuePlan:
    index: int
    key: str
    value: str


@dataclass(frozen=True)
class RecordPlan:
    """A signed record: put as ``first`` then ``latest``; gets must see ``latest``."""

    index: int
    name: str
    first: str
    latest: str


@dataclass(frozen=True, order=True)
class Op:
    """One scheduled action. ``arg`` is a resource index (share, fetch, providers),
    a value index (put, get), a record index (put_record, get_record), a target
    node index (lookup) and unused (-1) for churn."""

    at: float
    kind: OpKind
    node: int
    arg: int = -1


@dataclass(frozen=True)
class Scenario:
    config: ScenarioConfig
    nodes: tuple[NodePlan, ...]
    resources: tuple[ResourcePlan, ...]
    values: tuple[ValuePlan, ...]
    ops: tuple[Op, ...]  # sorted by time
    checkpoints: tuple[int, ...]  # network sizes at which a probe round runs
    digest: str = field(default="")  # a fingerprint of the whole plan
    records: tuple[RecordPlan, ...] = ()
    adversaries: frozenset[int] = frozenset()  # indices of the Sybil nodes

    def count(self, kind: OpKind) -> int:
        return sum(1 for op in self.ops if op.kind == kind)

    def alive_at(self, t: float) -> set[int]:
        """Nodes the plan has running at workload time ``t``."""
        return _alive_at(len(self.nodes), [op for op in self.ops if op.kind in _CHURN], t)


_CHURN = ("kill", "restart")


def _alive_at(n: int, churn: Iterable[Op], t: float) -> set[int]:
    alive = set(range(n))
    for op in sorted(churn):
        if op.at > t:
            break
        if op.kind == "kill":
            alive.discard(op.node)
        else:
            alive.add(op.node)
    return alive


def _rng(config: ScenarioConfig, label: str) -> random.Random:
    # A separate, named stream per part of the plan: changing the number of
    # lookups does not move who gets killed, and so on.
    return random.Random(f"p2pnode-sim:{config.seed}:{label}")


def checkpoints(n: int) -> tuple[int, ...]:
    """Network sizes at which a probe round runs during joins: 8, 16, 32, ... < n."""
    out = []
    size = FIRST_CHECKPOINT
    while size < n:
        out.append(size)
        size *= 2
    return tuple(out)


def probe_pairs(
    config: ScenarioConfig, label: str, alive: list[int], count: int
) -> list[tuple[int, int]]:
    """``count`` (source, target) pairs of distinct nodes among ``alive`` for a probe
    round; a pure function of the seed, the round's label and the nodes."""
    if len(alive) < 2:
        return []
    rng = _rng(config, f"probe:{label}")
    pairs = []
    for _ in range(count):
        source, target = rng.sample(alive, 2)
        pairs.append((source, target))
    return pairs


def generate(config: ScenarioConfig) -> Scenario:
    """The plan for ``config``: a pure function of it (the seed included)."""
    config.validate()
    n = config.nodes
    nodes = _plan_nodes(config)
    adversaries = plan_adversaries(config)
    churn = _plan_churn(config, adversaries)
    window = max(config.duration, 1e-3)

    def alive(t: float) -> list[int]:
        # The workload's actors and targets: honest nodes running at time t.
        return sorted(_alive_at(n, churn, t) - adversaries)

    ops: list[Op] = list(churn)

    # Resources: shared in the first 30% of the workload, fetched after.
    rng = _rng(config, "resources")
    resources = []
    for r in range(config.resources):
        size = config.resource_size
        if config.resource_size_max > config.resource_size:
            size = rng.randint(config.resource_size, config.resource_size_max)
        resources.append(ResourcePlan(r, f"res-{config.seed}-{r}.bin", size, rng.getrandbits(63)))
        t_share = rng.uniform(0, 0.3 * window)
        sharer = rng.choice(alive(t_share))
        ops.append(Op(round(t_share, 6), "share", sharer, r))
        holders = {sharer}  # a node fetches a given resource at most once
        for _ in range(config.fetches_per_resource):
            t_fetch = rng.uniform(t_share, window)
            candidates = [i for i in alive(t_fetch) if i not in holders]
            if candidates:
                fetcher = rng.choice(candidates)
                holders.add(fetcher)
                ops.append(Op(round(t_fetch, 6), "fetch", fetcher, r))

    # Small DHT values: put in the first half, got after.
    rng = _rng(config, "values")
    values = []
    for v in range(config.dht_values):
        body = rng.randbytes((config.value_size + 1) // 2).hex()[: config.value_size]
        values.append(ValuePlan(v, f"sim-{config.seed}-value-{v}", body))
        t_put = rng.uniform(0, 0.5 * window)
        putter = rng.choice(alive(t_put))
        ops.append(Op(round(t_put, 6), "put", putter, v))
        for _ in range(config.dht_gets_per_value):
            t_get = rng.uniform(t_put, window)
            ops.append(Op(round(t_get, 6), "get", rng.choice(alive(t_get)), v))

    # Peer lookups between two nodes both running at that time.
    rng = _rng(config, "lookups")
    for _ in range(config.lookups if n > 1 else 0):
        t = rng.uniform(0, window)
        live = alive(t)
        if len(live) >= 2:
            source, target = rng.sample(live, 2)
            ops.append(Op(round(t, 6), "lookup", source, target))

    # Provider lookups by nodes that neither shared nor fetched the resource; signed
    # records, each put (first then latest version) by one node and got by others.
    # Their own random streams: the plan above is the same with or without them.
    rng = _rng(config, "provider-lookups")
    shares = {op.arg: op for op in ops if op.kind == "share"}
    for r in range(config.resources):
        share = shares[r]
        for _ in range(config.provider_lookups()):
            t = rng.uniform(share.at, window)
            candidates = [i for i in alive(t) if i != share.node]
            if candidates:
                ops.append(Op(round(t, 6), "providers", rng.choice(candidates), r))
    rng = _rng(config, "records")
    records = []
    for v in range(config.records()):
        body = rng.randbytes(16).hex()
        name = f"sim-{config.seed}-record-{v}"
        records.append(RecordPlan(v, name, f"{body}-first", f"{body}-latest"))
        t_put = rng.uniform(0, 0.4 * window)
        ops.append(Op(round(t_put, 6), "put_record", rng.choice(alive(t_put)), v))
        for _ in range(config.record_gets_per_record):
            t_get = rng.uniform(t_put, window)
            ops.append(Op(round(t_get, 6), "get_record", rng.choice(alive(t_get)), v))

    ops.sort()
    scenario = Scenario(
        config=config,
        nodes=nodes,
        resources=tuple(resources),
        values=tuple(values),
        ops=tuple(ops),
        checkpoints=checkpoints(n),
        records=tuple(records),
        adversaries=adversaries,
    )
    return dataclasses.replace(scenario, digest=_digest(scenario))


def _plan_nodes(config: ScenarioConfig) -> tuple[NodePlan, ...]:
    rng = _rng(config, "nodes")
    seeds = list(range(config.seeds))
    per_node = min(config.bootstrap_per_node, config.seeds)
    step = 0.0 if config.join_rate == 0 else 1.0 / config.join_rate
    plans = []
    for i in range(config.nodes):
        if i == 0:
            boot: tuple[int, ...] = ()
        elif i < config.seeds:
            boot = tuple(range(i))[-per_node:]  # the seeds already up
        else:
            boot = tuple(sorted(rng.sample(seeds, per_node)))
        plans.append(NodePlan(i, i < config.seeds, round(i * step, 6), boot))
    return tuple(plans)


def plan_placement(config: ScenarioConfig) -> tuple[str, ...]:
    """Where each node sits: "public", or the kind of home router it is behind
    (``nat``). Seeds are public (everyone bootstraps through them); of the
    others, round(fraction * count) per kind, drawn with the scenario's seed."""
    placement = ["public"] * config.nodes
    candidates = list(range(config.seeds, config.nodes))
    rng = _rng(config, "placement")
    rng.shuffle(candidates)
    taken = 0
    for kind, fraction in config.nat_fractions().items():
        count = round(fraction * (config.nodes - config.seeds))
        for index in candidates[taken : taken + count]:
            placement[index] = kind
        taken += count
    return tuple(placement)


def plan_adversaries(config: ScenarioConfig) -> frozenset[int]:
    """Which nodes are Sybils: round(adversarial * nodes) of the non-seed nodes, so
    they join interleaved with honest ones, through honest seeds."""
    count = round(config.adversarial * config.nodes)
    if count == 0:
        return frozenset()
    candidates = list(range(config.seeds, config.nodes))
    rng = _rng(config, "adversaries")
    return frozenset(rng.sample(candidates, min(count, len(candidates))))


def _plan_churn(config: ScenarioConfig, adversaries: frozenset[int] = frozenset()) -> list[Op]:
    rng = _rng(config, "churn")
    candidates = [i for i in range(config.seeds, config.nodes) if i not in adversaries]
    victims = rng.sample(candidates, round(config.churn * len(candidates)))
    restarting = set(rng.sample(victims, round(config.restart * len(victims))))
    window = config.duration
    ops = []
    for node in victims:
        t_kill = rng.uniform(0.1 * window, 0.7 * window)
        ops.append(Op(round(t_kill, 6), "kill", node))
        if node in restarting:
            t_back = t_kill + rng.uniform(config.downtime, config.downtime_max)
            if t_back < window:
                ops.append(Op(round(t_back, 6), "restart", node))
    return sorted(ops)


def _digest(scenario: Scenario) -> str:
    h = hashlib.sha256()
    for part in (scenario.nodes, scenario.resources, scenario.values, scenario.ops):
        h.update(repr(part).encode())
    if scenario.records or scenario.adversaries:  # (older plans keep their digest)
        h.update(repr((scenario.records, sorted(scenario.adversaries))).encode())
    return h.hexdigest()[:16]
