"""Arguments and answers of every DHT RPC, checked. Pure: no I/O, no asyncio.

Requests (what a remote may ask of us; ``nodeid`` is the sender's claimed id):

=============  =================================  =====================================
name           args                               answer
=============  =================================  =====================================
ping           nodeid                             our node id
stun           (none)                             [sender ip, sender port]
store          nodeid, key, value[, token]        true if stored, false if refused
find_node      nodeid, key                        [[id, ip, port], ...]
find_value     nodeid, key                        {"value": v} or [[id, ip, port], ...]
identify       nodeid, challenge[, mode]          [public key, signature, token,
                                                   sender ip, mode]
dial_back      nonce                              (no answer)
add_provider   nodeid, key, record, token         true if recorded, false if refused
get_providers  nodeid, key                        {"providers": [record, ...],
                                                   "nodes": [[id, ip, port], ...],
                                                   "token": token}
=============  =================================  =====================================

``mode`` is "server" or "client": in a request, the asker's (an unsigned hint
that it switched mode: the answerer then proves it again); in the answer, signed
with the proof ( an answer without it,
from an older node, is a server's). ``dial_back`` is an AutoNAT probe
(:mod:`p2pnode.nat.autonat`): a server we asked sends it from a fresh socket to
our DHT port; it is only reported to the prober, never answered.

The first five are kademlia's own (wire compatible with ``kademlia.protocol``; a
stock store has no token, and we refuse it); the last three are ours and a stock
node simply never answers them. ``identify`` proves the answering node's id (the
hash of its Ed25519 key, :mod:`.proof`) and hands out a token for the asker's IP
(:mod:`.tokens`), which store and add_provider must carry. A provider ``record``
is a signed record's wire list (:mod:`.records`), checked by the core. Ids and keys
are 20 bytes; values are int, float, bool, str or bytes of at most
``max_value_bytes`` (str measured in UTF-8). Anything else raises
:class:`MessageError`.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from p2pnode.dht.codec import MessageError

NODE_ID_LEN = 20
MAX_HOST_LEN = 64
MAX_INT = 2**64 - 1
MIN_INT = -(2**63)

Value = str | bytes | int | float | bool

# Drop reasons (``dropped.<reason>`` counters).
UNKNOWN_RPC = "unknown_rpc"
BAD_ARGS = "bad_args"
BAD_RESPONSE = "bad_response"

KADEMLIA_RPCS = ("ping", "stun", "store", "find_node", "find_value")
EXTRA_RPCS = ("identify", "add_provider", "get_providers", "dial_back")

MIN_CHALLENGE, MAX_CHALLENGE = 16, 64
MIN_NONCE, MAX_NONCE = 16, 32
MAX_TOKEN = 32
PUBLIC_KEY_LEN, SIGNATURE_LEN = 32, 64
RPC_NAMES = KADEMLIA_RPCS + EXTRA_RPCS


@dataclass(frozen=True)
class SchemaLimits:
    max_value_bytes: int = 4096
    max_response_contacts: int = 64


# -- values, ids, addresses ------------------------------------------------------------


def value_size(value: Value) -> int:
    """Bytes a value counts against ``max_value_bytes`` (str in UTF-8, numbers 8)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes):
        return len(value)
    return 8


def check_value(value: object, max_bytes: int) -> Value:
    """``value`` if it may be stored in the DHT, else MessageError(BAD_ARGS)."""
    checked: Value
    if type(value) is bool or type(value) is float:
        checked = value
    elif type(value) is int:
        if not MIN_INT <= value <= MAX_INT:
            raise MessageError(BAD_ARGS, "integer out of range")
        checked = value
    elif type(value) is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise MessageError(BAD_ARGS, "string is not valid UTF-8") from None
        checked = value
    elif type(value) is bytes:
        checked = value
    else:
        raise MessageError(BAD_ARGS, f"value of type {type(value).__name__}")
    if value_size(checked) > max_bytes:
        raise MessageError(BAD_ARGS, f"value longer than {max_bytes} bytes")
    return checked


def is_node_id(value: object) -> bool:
    return type(value) is bytes and len(value) == NODE_ID_LEN


def is_port(value: object) -> bool:
    return type(value) is int and 0 < value < 65536


def normalize_host(host: object) -> str | None:
    """The canonical text of an IP literal (IPv4-mapped IPv6 → IPv4), or None."""
    if not isinstance(host, str) or not host or len(host) > MAX_HOST_LEN:
        return None
    return _normalize_ip(host)


@functools.lru_cache(maxsize=4096)
def _normalize_ip(host: str) -> str | None:
    # Every datagram's source goes through here: parsing with ipaddress costs more
    # than the rest of the hot path, and a node hears from few distinct addresses.
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        return None
    return str(ip)


@dataclass(frozen=True)
class NodeAddr:
    """A node as listed in an answer: id, IP literal, port."""

    node_id: bytes
    host: str
    port: int

    def to_wire(self) -> list[object]:
        return [self.node_id, self.host, self.port]


def parse_node_addr(entry: object) -> NodeAddr | None:
    if not isinstance(entry, list) or len(entry) != 3:
        return None
    node_id, host, port = entry
    clean = normalize_host(host)
    if not is_node_id(node_id) or clean is None or not is_port(port):
        return None
    assert isinstance(node_id, bytes) and isinstance(port, int)
    return NodeAddr(node_id, clean, port)


@dataclass(frozen=True)
class NodeList:
    nodes: list[NodeAddr]
    skipped: int  # entries that were not a valid [id, ip, port]


def parse_node_list(payload: object, limits: SchemaLimits) -> NodeList:
    """A list of [id, ip, port]. Entries that are not valid are skipped and counted
    (a stock node relays whatever it was told); a payload that is not a list, or a
    too long one, is malformed."""
    if not isinstance(payload, list):
        raise MessageError(BAD_RESPONSE, "expected a list of nodes")
    if len(payload) > limits.max_response_contacts:
        raise MessageError(BAD_RESPONSE, f"{len(payload)} nodes listed")
    nodes: list[NodeAddr] = []
    seen: set[bytes] = set()
    skipped = 0
    for entry in payload:
        addr = parse_node_addr(entry)
        if addr is None or addr.node_id in seen:
            skipped += 1
            continue
        seen.add(addr.node_id)
        nodes.append(addr)
    return NodeList(nodes, skipped)


# -- requests --------------------------------------------------------------------------


@dataclass(frozen=True)
class PingRequest:
    node_id: bytes


@dataclass(frozen=True)
class StunRequest:
    pass


@dataclass(frozen=True)
class StoreRequest:
    node_id: bytes
    key: bytes
    value: Value
    token: bytes | None  # None: a stock kademlia store (refused: no return routability)


@dataclass(frozen=True)
class IdentifyRequest:
    node_id: bytes
    challenge: bytes
    mode: str | None = None  # the asker's mode, a hint (None: not said)


@dataclass(frozen=True)
class FindNodeRequest:
    node_id: bytes
    key: bytes


@dataclass(frozen=True)
class FindValueRequest:
    node_id: bytes
    key: bytes


@dataclass(frozen=True)
class AddProviderRequest:
    node_id: bytes
    key: bytes
    record: list[object]  # a provider record's wire list, not yet checked
    token: bytes


@dataclass(frozen=True)
class GetProvidersRequest:
    node_id: bytes
    key: bytes


@dataclass(frozen=True)
class DialBackRequest:
    nonce: bytes


RpcRequest = (
    PingRequest
    | StunRequest
    | StoreRequest
    | FindNodeRequest
    | FindValueRequest
    | IdentifyRequest
    | AddProviderRequest
    | GetProvidersRequest
    | DialBackRequest
)


def _ids(args: tuple[object, ...], count: int) -> list[bytes]:
    for arg in args[:count]:
        if not is_node_id(arg):
            raise MessageError(BAD_ARGS, "ids and keys are 20 bytes")
    return [arg for arg in args[:count] if isinstance(arg, bytes)]


def parse_request(name: str, args: tuple[object, ...], limits: SchemaLimits) -> RpcRequest:
    """Check a request's name and arguments (not the sender: the caller does)."""
    arity = {
        "ping": 1,
        "stun": 0,
        "store": 3,
        "find_node": 2,
        "find_value": 2,
        "identify": 2,
        "add_provider": 4,
        "get_providers": 2,
        "dial_back": 1,
    }.get(name)
    if arity is None:
        raise MessageError(UNKNOWN_RPC, name[:32])
    if name == "identify" and len(args) == 3:
        if args[2] not in ("server", "client"):
            raise MessageError(BAD_ARGS, "identify's mode is server or client")
        request = parse_request(name, args[:2], limits)
        assert isinstance(request, IdentifyRequest) and isinstance(args[2], str)
        return IdentifyRequest(request.node_id, request.challenge, args[2])
    if name == "store" and len(args) == 4:
        node_id, key = _ids(args, 2)
        value = check_value(args[2], limits.max_value_bytes)
        return StoreRequest(node_id, key, value, _token(args[3]))
    if len(args) != arity:
        raise MessageError(BAD_ARGS, f"{name} takes {arity} arguments, got {len(args)}")
    if name == "ping":
        return PingRequest(*_ids(args, 1))
    if name == "stun":
        return StunRequest()
    if name == "dial_back":
        nonce = args[0]
        if type(nonce) is not bytes or not MIN_NONCE <= len(nonce) <= MAX_NONCE:
            raise MessageError(BAD_ARGS, f"a nonce is {MIN_NONCE}..{MAX_NONCE} bytes")
        return DialBackRequest(nonce)
    if name == "store":
        node_id, key = _ids(args, 2)
        return StoreRequest(node_id, key, check_value(args[2], limits.max_value_bytes), None)
    if name == "find_node":
        return FindNodeRequest(*_ids(args, 2))
    if name == "find_value":
        return FindValueRequest(*_ids(args, 2))
    if name == "identify":
        (node_id,) = _ids(args, 1)
        challenge = args[1]
        if type(challenge) is not bytes or not MIN_CHALLENGE <= len(challenge) <= MAX_CHALLENGE:
            raise MessageError(BAD_ARGS, f"a challenge is {MIN_CHALLENGE}..{MAX_CHALLENGE} bytes")
        return IdentifyRequest(node_id, challenge)
    if name == "add_provider":
        node_id, key = _ids(args, 2)
        record = args[2]
        if not isinstance(record, list):
            raise MessageError(BAD_ARGS, "a provider record is a list")
        return AddProviderRequest(node_id, key, record, _token(args[3]))
    return GetProvidersRequest(*_ids(args, 2))


def _token(token: object) -> bytes:
    if type(token) is not bytes or not 0 < len(token) <= MAX_TOKEN:
        raise MessageError(BAD_ARGS, f"a token is 1..{MAX_TOKEN} bytes")
    return token


# -- answers ---------------------------------------------------------------------------


def parse_ping_response(payload: object) -> bytes:
    if not is_node_id(payload):
        raise MessageError(BAD_RESPONSE, "ping answers a 20-byte node id")
    assert isinstance(payload, bytes)
    return payload


def parse_bool_response(payload: object) -> bool:
    """store / add_provider: true or false. (Stock kademlia always answers true.)"""
    if not isinstance(payload, bool):
        raise MessageError(BAD_RESPONSE, "expected true or false")
    return payload


def parse_stun_response(payload: object) -> tuple[str, int]:
    if not isinstance(payload, list) or len(payload) != 2:
        raise MessageError(BAD_RESPONSE, "stun answers [ip, port]")
    host, port = normalize_host(payload[0]), payload[1]
    if host is None or not is_port(port):
        raise MessageError(BAD_RESPONSE, "stun answers [ip, port]")
    assert isinstance(port, int)
    return host, port


@dataclass(frozen=True)
class FoundValue:
    value: Value


def parse_find_value_response(payload: object, limits: SchemaLimits) -> FoundValue | NodeList:
    if isinstance(payload, dict):
        if set(payload) != {"value"}:
            raise MessageError(BAD_RESPONSE, "find_value answers {'value': v} or nodes")
        try:
            return FoundValue(check_value(payload["value"], limits.max_value_bytes))
        except MessageError as exc:
            raise MessageError(BAD_RESPONSE, str(exc)) from None
    return parse_node_list(payload, limits)


@dataclass(frozen=True)
class ProvidersAnswer:
    records: list[list[object]]  # provider records' wire lists, not yet checked
    nodes: NodeList
    token: bytes


def parse_get_providers_response(payload: object, limits: SchemaLimits) -> ProvidersAnswer:
    if not isinstance(payload, dict) or set(payload) != {"providers", "nodes", "token"}:
        raise MessageError(BAD_RESPONSE, "get_providers answers {providers, nodes, token}")
    records = payload["providers"]
    if not isinstance(records, list) or len(records) > limits.max_response_contacts:
        raise MessageError(BAD_RESPONSE, "providers: a list of at most max_response_contacts")
    token = payload["token"]
    if type(token) is not bytes or not 0 < len(token) <= MAX_TOKEN:
        raise MessageError(BAD_RESPONSE, "a token is 1..32 bytes")
    return ProvidersAnswer(
        [r for r in records if isinstance(r, list)],
        parse_node_list(payload["nodes"], limits),
        token,
    )


@dataclass(frozen=True)
class IdentifyAnswer:
    """What identify answers: unchecked until the core verifies the signature."""

    public_key: bytes
    signature: bytes
    token: bytes
    observed_host: str  # our IP as the answering node saw it
    mode: str | None = None  # "server" or "client" (signed); None: an older node's

    @property
    def server(self) -> bool:
        return self.mode != "client"


def parse_identify_response(payload: object) -> IdentifyAnswer:
    if not isinstance(payload, list) or len(payload) not in (4, 5):
        raise MessageError(BAD_RESPONSE, "identify answers [key, signature, token, ip, mode]")
    public_key, signature, token, host = payload[:4]
    mode = payload[4] if len(payload) == 5 else None
    if mode is not None and mode not in ("server", "client"):
        raise MessageError(BAD_RESPONSE, "identify's mode is server or client")
    assert mode is None or isinstance(mode, str)
    clean = normalize_host(host)
    if (
        type(public_key) is not bytes
        or len(public_key) != PUBLIC_KEY_LEN
        or type(signature) is not bytes
        or len(signature) != SIGNATURE_LEN
        or type(token) is not bytes
        or not 0 < len(token) <= MAX_TOKEN
        or clean is None
    ):
        raise MessageError(BAD_RESPONSE, "identify answers [key, signature, token, ip]")
    return IdentifyAnswer(public_key, signature, token, clean, mode)
