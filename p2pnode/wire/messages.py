"""Typed messages and the request/response envelope: pure, no I/O.

Rules
-----
- A message is a small frozen dataclass registered under an integer type code
  (``@message(code)``). Its fields are encoded positionally, in declaration
  order. Supported field types: ``bytes``, ``int``, ``bool``, ``str``,
  ``float`` and ``tuple[T, ...]`` of those. A ``bytes`` field may be
  declared ``Blob`` (``bytes | bytearray | memoryview``) so a sender can pass a
  view of its piece buffer; decoding yields ``bytes``, or, with
  ``decode_envelope(..., views=True)``, a trailing ``Blob`` of at least
  ``SCATTER_MIN`` bytes comes back as a ``memoryview`` of the payload (no copy:
  the caller vouches that the payload outlives it).
- One frame payload is one msgpack array (the envelope)::

      [kind, request_id, type_code, *fields]

  ``kind`` is 0 (request), 1 (response), 2 (error: the message is an
  :class:`ErrorReply`), 3 (cancel: the message is a :class:`CancelRequest`)
  or 4 (goaway: the message is a :class:`GoAway`).
  ``request_id`` is 0..2**32-1, chosen by the requester and echoed by the
  answer, so many requests can be in flight on one connection; each side
  numbers its own requests (the kind tells a response to our request from a
  request of the peer). A cancel names one of its sender's requests: the
  requester gave it up (HTTP/2's RST_STREAM); it has no id of its own and no
  answer. It is an envelope kind, not a request message, because it belongs to
  the mux: as a request it would take an id and an in-flight slot, be answered,
  and could itself be refused ``busy`` just when the peer is loaded.
- A goaway (HTTP/2's GOAWAY) is the last envelope of a graceful close: "I am
  closing; of your requests I have not answered, I read only these
  (``GoAway.read``), none of the others, and I read nothing after this". Its
  ``request_id`` is 0 and means nothing. No "last request id accepted" as in
  HTTP/2: ids are the requester's own and wrap around, so a number could not
  say which were read; the list is short (what the sender has in flight, at
  most ``GOAWAY_MAX_READ``: a sender with more closes without a goaway). A
  kind, as a cancel is, for the same reasons: it belongs to the mux, takes no
  id, slot or answer (as a request, a peer that predates it would answer
  ``unsupported`` to a connection being closed). Such a peer fails to decode
  kind 4 (``bad envelope kind``): one strike, on a connection closing anyway.
- Decoding applies msgpack limits (bin/str/array/map lengths, no ext types),
  then strict types: the exact field count, ``bool`` is not an ``int``, ``bin``
  is not ``str`` and vice versa, then per-field constraints (exact/max length,
  integer range). Any violation raises :class:`MessageDecodeError` (a
  ``ProtocolError``); nothing else escapes, whatever the input.
- An unknown type code raises :class:`UnknownMessageType`, which still carries
  the kind and request id, so a receiver can answer "unsupported" instead of
  dropping the connection: newer peers may speak types older ones do not.
- Type code ranges: 1-15 core (here), 16-47 resource exchange
  (exchange/messages.py), 48-95 services, 96-127 messaging, 128+ experiments.
  Codes never change meaning once used.
- This module defines only the core messages (Ping, Pong, ErrorReply, the
  bodies of cancel and goaway). A feature
  defines its own and registers them (see exchange/messages.py ``register``).
- Encoding a message whose last field is a large binary value returns it as
  its own buffer (scatter list) so piece data is not copied; the bytes are
  identical to ``msgpack.packb`` of the whole envelope.
- Local misuse (a wrong field type or a constraint broken when *building* a
  message to send) raises ``UsageError``: it is our bug, not the peer's.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, ClassVar, TypeVar

import msgpack  # type: ignore[import-untyped]  # no stubs; pyproject lacks an override

from p2pnode.errors import MessageDecodeError, UnknownMessageType, UsageError

Buffer = bytes | bytearray | memoryview
Blob = bytes | bytearray | memoryview
"""Annotation for binary fields a sender may pass as a view (decoded as bytes)."""

MAX_REQUEST_ID = 0xFFFFFFFF
SCATTER_MIN = 16 * 1024
"""Trailing binary fields at least this long are emitted as a separate buffer."""

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


class Kind(IntEnum):
    REQUEST = 0
    RESPONSE = 1
    ERROR = 2
    CANCEL = 3
    GOAWAY = 4


_KINDS = tuple(Kind)  # by value: Kind(n) costs an enum lookup per frame


class ErrorCode(StrEnum):
    """Well-known :class:`ErrorReply` codes (others may be added; keep them short)."""

    NOT_FOUND = "not_found"
    BUSY = "busy"
    BAD_REQUEST = "bad_request"
    INTERNAL = "internal"
    UNSUPPORTED = "unsupported"


# -- field specs -------------------------------------------------------------


@dataclass(frozen=True)
class Constraint:
    exact_len: int | None = None
    min_len: int | None = None
    max_len: int | None = None
    min_value: int | None = None
    max_value: int | None = None


def wire(
    *,
    exact_len: int | None = None,
    min_len: int | None = None,
    max_len: int | None = None,
    min_value: int | None = None,
    max_value: int | None = None,
) -> Any:
    """A dataclass field with wire constraints, checked on encode and decode."""
    return field(
        metadata={
            "wire": Constraint(
                exact_len=exact_len,
                min_len=min_len,
                max_len=max_len,
                min_value=min_value,
                max_value=max_value,
            )
        }
    )


_SCALARS: dict[type, str] = {bytes: "bin", int: "int", bool: "bool", str: "str", float: "float"}


@dataclass(frozen=True)
class FieldSpec:
    name: str
    wire_type: type  # the exact type decoding must produce
    send_types: tuple[type, ...]  # the types accepted when encoding
    elem_type: type | None  # for tuple fields
    constraint: Constraint

    @property
    def is_blob(self) -> bool:
        return self.wire_type is bytes

    def check(self, value: object, *, decoding: bool) -> str | None:
        """None if ``value`` is acceptable, else a reason."""
        if decoding:
            if type(value) is not self.wire_type:
                return f"{self.name}: expected {_SCALARS.get(self.wire_type, 'array')}"
        elif type(value) not in self.send_types and not (
            isinstance(value, str) and str in self.send_types  # a StrEnum such as ErrorCode
        ):
            return f"{self.name}: expected {self.wire_type.__name__}, got {type(value).__name__}"
        if self.elem_type is not None:
            assert isinstance(value, tuple)
            for item in value:
                if type(item) is not self.elem_type:
                    return f"{self.name}: items must be {self.elem_type.__name__}"
        c = self.constraint
        if isinstance(value, (bytes, bytearray, memoryview, str, tuple)):
            n = len(value) if not isinstance(value, memoryview) else value.nbytes
            if c.exact_len is not None and n != c.exact_len:
                return f"{self.name}: length {n}, expected {c.exact_len}"
            if c.min_len is not None and n < c.min_len:
                return f"{self.name}: length {n} below {c.min_len}"
            if c.max_len is not None and n > c.max_len:
                return f"{self.name}: length {n} above {c.max_len}"
        elif type(value) is int:
            lo = _INT_MIN if c.min_value is None else c.min_value
            hi = _INT_MAX if c.max_value is None else c.max_value
            if not lo <= value <= hi:
                return f"{self.name}: {value} outside {lo}..{hi}"
        return None


def _spec_for(name: str, annotation: object, constraint: Constraint) -> FieldSpec:
    if annotation in _SCALARS:
        assert isinstance(annotation, type)
        return FieldSpec(name, annotation, (annotation,), None, constraint)
    if isinstance(annotation, types.UnionType) and set(typing.get_args(annotation)) == {
        bytes,
        bytearray,
        memoryview,
    }:
        return FieldSpec(name, bytes, (bytes, bytearray, memoryview), None, constraint)
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in _SCALARS:
            return FieldSpec(name, tuple, (tuple,), args[0], constraint)
    raise TypeError(f"field {name}: unsupported wire type {annotation!r}")


# -- messages and registry ---------------------------------------------------


class Message:
    """Base of every wire message (subclasses are frozen dataclasses)."""

    __slots__ = ()
    TYPE_CODE: ClassVar[int] = -1
    RESPONSE_TYPE: ClassVar[type[Message] | None] = None
    """For requests: the message type a successful answer must have."""
    WIRE_FIELDS: ClassVar[tuple[FieldSpec, ...]] = ()
    # generated by @message (see _compile_checks)
    _decoded_ok: ClassVar[Callable[[Sequence[object]], bool]]
    _checked_values: ClassVar[Callable[[Message], list[object] | None]]

    def wire_values(self) -> list[object]:
        return [getattr(self, f.name) for f in self.WIRE_FIELDS]

    def problem(self, *, decoding: bool = False) -> str | None:
        """None if every field is well-typed and within its constraints."""
        for spec in self.WIRE_FIELDS:
            reason = spec.check(getattr(self, spec.name), decoding=decoding)
            if reason is not None:
                return f"{type(self).__name__}.{reason}"
        return None


M = TypeVar("M", bound=type[Message])


class MessageRegistry:
    """Type code -> message class. Later features register their own types."""

    def __init__(self) -> None:
        self._by_code: dict[int, type[Message]] = {}

    def register(self, cls: type[Message]) -> None:
        code = cls.TYPE_CODE
        if not 0 < code <= 0xFFFF:
            raise ValueError(f"{cls.__name__}: type code must be 1..65535, got {code}")
        existing = self._by_code.get(code)
        if existing is not None and existing is not cls:
            raise ValueError(f"type code {code} already used by {existing.__name__}")
        self._by_code[code] = cls

    def get(self, code: int) -> type[Message] | None:
        return self._by_code.get(code)

    def types(self) -> list[type[Message]]:
        return [self._by_code[c] for c in sorted(self._by_code)]

    def copy(self) -> MessageRegistry:
        other = MessageRegistry()
        other._by_code = dict(self._by_code)
        return other


DEFAULT_REGISTRY = MessageRegistry()


def message(
    code: int,
    *,
    response: type[Message] | None = None,
    registry: MessageRegistry | None = DEFAULT_REGISTRY,
) -> Callable[[M], M]:
    """Class decorator: give a frozen dataclass message its type code and register it.

    Put it above ``@dataclass(frozen=True, slots=True)``. ``response`` names
    the message type a request expects back. ``registry=None`` only compiles.
    """

    def apply(cls: M) -> M:
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        hints = typing.get_type_hints(cls)
        specs = []
        for f in dataclasses.fields(cls):
            constraint = f.metadata.get("wire", Constraint())
            specs.append(_spec_for(f.name, hints[f.name], constraint))
        cls.TYPE_CODE = code
        cls.RESPONSE_TYPE = response
        cls.WIRE_FIELDS = tuple(specs)
        cls._decoded_ok, cls._checked_values = _compile_checks(cls.__name__, cls.WIRE_FIELDS)
        if registry is not None:
            registry.register(cls)
        return cls

    return apply


def _fast_test(spec: FieldSpec, i: int, var: str, *, decoding: bool) -> str:
    """A Python expression true only if ``spec.check`` would accept ``var`` (the
    common cases inline; False sends the caller to ``check`` for the reason)."""
    c = spec.constraint
    if spec.elem_type is not None:
        return f"_specs[{i}].check({var}, decoding={decoding}) is None"
    if spec.wire_type is bytes:
        # a sender's memoryview (nbytes, not len) takes the slow path
        blob = memoryview in spec.send_types
        typed = f"type({var}) in _BYTES" if blob and not decoding else f"type({var}) is bytes"
    elif spec.wire_type is str and not decoding:
        typed = f"isinstance({var}, str)"  # a StrEnum such as ErrorCode
    else:
        typed = f"type({var}) is {spec.wire_type.__name__}"
    tests = [typed]
    if spec.wire_type in (bytes, str):
        if c.exact_len is not None:
            tests.append(f"len({var}) == {c.exact_len}")
        if c.min_len is not None:
            tests.append(f"len({var}) >= {c.min_len}")
        if c.max_len is not None:
            tests.append(f"len({var}) <= {c.max_len}")
    elif spec.wire_type is int:
        lo = _INT_MIN if c.min_value is None else c.min_value
        hi = _INT_MAX if c.max_value is None else c.max_value
        tests.append(f"{lo} <= {var} <= {hi}")
    return "(" + " and ".join(tests) + ")"


def _compile_checks(
    name: str, specs: tuple[FieldSpec, ...]
) -> tuple[Callable[[Sequence[object]], bool], Callable[[Message], list[object] | None]]:
    """Two functions generated once per message class (as dataclasses makes its
    ``__init__``): the hot path checks every field in one expression instead of
    a ``FieldSpec.check`` call each. They only say yes or no; a no goes through
    ``check`` for the reason, so they may be stricter than it, never looser.

    - ``decoded_ok(values)``: the decoded field values are acceptable;
    - ``checked_values(msg)``: the message's field values, or None.
    """
    names = [f"v{i}" for i in range(len(specs))]
    fields = list(enumerate(zip(specs, names, strict=True)))
    decoding = " and ".join(_fast_test(s, i, n, decoding=True) for i, (s, n) in fields)
    sending = " and ".join(_fast_test(s, i, n, decoding=False) for i, (s, n) in fields)
    unpacked = "".join(f"{n}, " for n in names)
    loads = "".join(f"    {n} = msg.{s.name}\n" for _, (s, n) in fields)
    source = (
        f"def decoded_ok(values):\n"
        f"    if len(values) != {len(specs)}:\n        return False\n"
        + (f"    {unpacked}= values\n" if specs else "")
        + f"    return {decoding or 'True'}\n"
        f"def checked_values(msg):\n{loads}"
        f"    if {sending or 'True'}:\n        return [{', '.join(names)}]\n"
        f"    return None\n"
    )
    scope: dict[str, Any] = {"_specs": specs, "_BYTES": (bytes, bytearray)}
    exec(compile(source, f"<wire checks of {name}>", "exec"), scope)  # our own source, no peer's
    return scope["decoded_ok"], scope["checked_values"]


# -- core messages (1-15) --------------------------------------------------------


@message(2)
@dataclass(frozen=True, slots=True)
class Pong(Message):
    pass


@message(1, response=Pong)
@dataclass(frozen=True, slots=True)
class Ping(Message):
    pass


@message(3)
@dataclass(frozen=True, slots=True)
class ErrorReply(Message):
    """A request failed on the remote side; ``code`` is one of :class:`ErrorCode`."""

    code: str = wire(min_len=1, max_len=64)
    message: str = wire(max_len=1024)


@message(4)
@dataclass(frozen=True, slots=True)
class CancelRequest(Message):
    """The body of a cancel envelope (``Kind.CANCEL``): the id says which request."""


CANCEL_REQUEST = CancelRequest()

GOAWAY_MAX_READ = 1024
"""At most this many ids in :attr:`GoAway.read`."""


@message(5)
@dataclass(frozen=True, slots=True)
class GoAway(Message):
    """The body of a goaway envelope (``Kind.GOAWAY``, see the module rules):
    the receiver's requests its sender read and has not answered; it read none
    of the receiver's other requests and reads nothing more."""

    read: tuple[int, ...] = wire(max_len=GOAWAY_MAX_READ)


# -- envelope ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    kind: Kind
    request_id: int
    message: Message


@dataclass(frozen=True)
class DecodeLimits:
    """msgpack limits applied while decoding one payload."""

    max_bin_len: int = 4 * 1024 * 1024
    max_str_len: int = 64 * 1024
    max_array_len: int = 4096
    max_map_len: int = 64


DEFAULT_LIMITS = DecodeLimits()


# One packer for every envelope: ``pack`` runs in C without releasing the GIL and
# resets itself, so sharing it is safe, and saves building one per message.
_PACKER = msgpack.Packer(autoreset=True)


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return bytes((0xC4, n))
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def encode_envelope(envelope: Envelope) -> list[Buffer]:
    """The envelope as msgpack, in one or more buffers to be written in order."""
    msg = envelope.message
    if not 0 <= envelope.request_id <= MAX_REQUEST_ID:
        raise UsageError(f"request id out of range: {envelope.request_id}")
    kind = envelope.kind
    if (kind is not _REQUEST and kind is not _RESPONSE) or type(msg) in _MUX_BODIES:
        problem = _kind_body_problem(kind, msg)
        if problem is not None:
            raise UsageError(problem)
    if msg.TYPE_CODE < 0:
        raise UsageError(f"{type(msg).__name__} is not a registered message")
    values = type(msg)._checked_values(msg)
    if values is None:
        reason = msg.problem()
        if reason is not None:
            raise UsageError(f"cannot encode {reason}")
        values = msg.wire_values()
    specs = msg.WIRE_FIELDS
    head: list[object] = [int(envelope.kind), envelope.request_id, msg.TYPE_CODE]
    if specs and specs[-1].is_blob:
        last = values[-1]
        assert isinstance(last, (bytes, bytearray, memoryview))
        size = last.nbytes if isinstance(last, memoryview) else len(last)
        if size >= SCATTER_MIN:
            packer = msgpack.Packer(autoreset=True)
            parts = [packer.pack_array_header(len(head) + len(values))]
            parts.extend(packer.pack(v) for v in head)
            parts.extend(packer.pack(v) for v in values[:-1])
            parts.append(_bin_header(size))
            prefix = b"".join(parts)
            body = last if isinstance(last, memoryview) else memoryview(last)
            return [prefix, body.cast("B") if body.format != "B" else body]
    head += values
    return [_PACKER.pack(head)]


def encode_envelope_bytes(envelope: Envelope) -> bytes:
    return b"".join(encode_envelope(envelope))


def request(request_id: int, msg: Message) -> Envelope:
    return Envelope(Kind.REQUEST, request_id, msg)


def response(request_id: int, msg: Message) -> Envelope:
    kind = Kind.ERROR if isinstance(msg, ErrorReply) else Kind.RESPONSE
    return Envelope(kind, request_id, msg)


def cancel(request_id: int) -> Envelope:
    """The envelope that gives up our request ``request_id``."""
    return Envelope(Kind.CANCEL, request_id, CANCEL_REQUEST)


def goaway(read: tuple[int, ...] = ()) -> Envelope:
    """The envelope that ends a graceful close (see the module rules)."""
    return Envelope(Kind.GOAWAY, 0, GoAway(read))


_REQUEST = Kind.REQUEST
_RESPONSE = Kind.RESPONSE
# Bodies that belong to the mux's own kinds (the hot path checks a set: a
# request or response of a feature's message needs no further look).
_MUX_BODIES = frozenset((CancelRequest, GoAway))


def _kind_body_problem(kind: int, msg: Message) -> str | None:
    """Why ``msg`` cannot travel in an envelope of ``kind``, or None."""
    if kind == Kind.ERROR and not isinstance(msg, ErrorReply):
        return "an error envelope must carry an ErrorReply"
    if (kind == Kind.CANCEL) != isinstance(msg, CancelRequest):
        return "a cancel envelope, and only it, carries a CancelRequest"
    if (kind == Kind.GOAWAY) != isinstance(msg, GoAway):
        return "a goaway envelope, and only it, carries a GoAway"
    return None


_UNPACK_ERRORS = (ValueError, TypeError, OverflowError, msgpack.UnpackException)
# Zero-copy decoding parses at most this much of the payload before the blob.
_HEAD_MAX = 512
_BIN_HEADERS = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def _split_trailing_blob(payload: memoryview, limits: DecodeLimits) -> tuple[Any, ...] | None:
    """``payload`` as an envelope tuple whose last item, a bin of at least
    ``SCATTER_MIN`` bytes ending the payload, is a view of it; None when the payload
    does not have that shape (the caller then decodes it the ordinary way)."""
    n = len(payload)
    if n < SCATTER_MIN:
        return None
    unpacker = msgpack.Unpacker(
        use_list=False,
        raw=False,
        strict_map_key=True,
        max_buffer_size=_HEAD_MAX,
        max_bin_len=limits.max_bin_len,
        max_str_len=limits.max_str_len,
        max_array_len=limits.max_array_len,
        max_map_len=limits.max_map_len,
        max_ext_len=0,
    )
    unpacker.feed(payload[:_HEAD_MAX])
    try:
        count = unpacker.read_array_header()
        if not 4 <= count <= limits.max_array_len:
            return None
        head = [unpacker.unpack() for _ in range(count - 1)]
    except (msgpack.OutOfData, *_UNPACK_ERRORS):
        return None
    pos = unpacker.tell()
    size_len = _BIN_HEADERS.get(payload[pos]) if pos < n else None
    if size_len is None or pos + 1 + size_len > n:
        return None
    length = int.from_bytes(payload[pos + 1 : pos + 1 + size_len], "big")
    start = pos + 1 + size_len
    if start + length != n or length < SCATTER_MIN or length > limits.max_bin_len:
        return None
    return (*head, payload[start:])


def _unpack(payload: Buffer, limits: DecodeLimits) -> Any:
    """msgpack with every size limit; raise only MessageDecodeError."""
    try:
        return msgpack.unpackb(
            payload,
            use_list=False,
            raw=False,
            strict_map_key=True,
            max_bin_len=limits.max_bin_len,
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except _UNPACK_ERRORS as exc:
        raise MessageDecodeError(f"undecodable payload: {type(exc).__name__}: {exc}") from None


def decode_envelope(
    payload: Buffer,
    limits: DecodeLimits = DEFAULT_LIMITS,
    registry: MessageRegistry = DEFAULT_REGISTRY,
    *,
    views: bool = False,
) -> Envelope:
    """Decode one frame payload; raise only :class:`MessageDecodeError`.

    ``views=True``: a large trailing ``Blob`` field is a view of ``payload`` rather
    than a copy (see the module rules); the payload must stay unchanged while the
    message is in use.
    """
    if views:
        parts = _split_trailing_blob(memoryview(payload).cast("B"), limits)
        if parts is not None:
            return _envelope(parts, registry, view_blob=True)
    obj = _unpack(payload, limits)
    return _envelope(obj, registry)


def _envelope(obj: Any, registry: MessageRegistry, *, view_blob: bool = False) -> Envelope:
    if type(obj) is not tuple or len(obj) < 3:
        raise MessageDecodeError("envelope must be an array [kind, request_id, type, fields...]")
    kind, request_id, code = obj[0], obj[1], obj[2]
    if type(kind) is not int or kind not in (0, 1, 2, 3, 4):
        raise MessageDecodeError(f"bad envelope kind {kind!r}")
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        raise MessageDecodeError(f"bad request id {request_id!r}")
    if type(code) is not int:
        raise MessageDecodeError(
            "message type must be an integer", kind=kind, request_id=request_id
        )
    cls = registry.get(code)
    if cls is None:
        raise UnknownMessageType(code, kind=kind, request_id=request_id)
    msg = _build(cls, obj[3:], kind=kind, request_id=request_id, view_blob=view_blob)
    if kind > 1 or type(msg) in _MUX_BODIES:  # not a request or response of a feature
        problem = _kind_body_problem(kind, msg)
        if problem is not None:
            raise MessageDecodeError(problem, kind=kind, request_id=request_id)
    return Envelope(_KINDS[kind], request_id, msg)


def _build(
    cls: type[Message],
    values: Sequence[object],
    *,
    kind: int | None,
    request_id: int | None,
    view_blob: bool = False,
) -> Message:
    """``view_blob``: the last value is a memoryview standing for a bin, acceptable
    only where the message declares a ``Blob`` field."""
    specs = cls.WIRE_FIELDS
    if len(values) != len(specs):
        raise MessageDecodeError(
            f"{cls.__name__} has {len(specs)} fields, got {len(values)}",
            kind=kind,
            request_id=request_id,
        )
    if view_blob and memoryview not in specs[-1].send_types:
        assert isinstance(values[-1], memoryview)
        values = (*values[:-1], bytes(values[-1]))  # a plain bytes field: copy it
        view_blob = False
    if not view_blob and cls._decoded_ok(values):
        return cls(*values)
    last = len(specs) - 1
    for i, (spec, value) in enumerate(zip(specs, values, strict=True)):
        if view_blob and i == last:
            reason = spec.check(value, decoding=False)  # a memoryview for a Blob
        else:
            reason = spec.check(value, decoding=True)
        if reason is not None:
            raise MessageDecodeError(f"{cls.__name__}.{reason}", kind=kind, request_id=request_id)
    return cls(*values)


def encode_message(msg: Message) -> bytes:
    """A bare message (no envelope) as msgpack ``[type_code, *fields]``."""
    reason = msg.problem()
    if reason is not None:
        raise UsageError(f"cannot encode {reason}")
    return msgpack.packb([msg.TYPE_CODE, *msg.wire_values()])


def decode_message(
    payload: Buffer,
    limits: DecodeLimits = DEFAULT_LIMITS,
    registry: MessageRegistry = DEFAULT_REGISTRY,
) -> Message:
    """Decode a bare ``[type_code, *fields]`` message; raise only MessageDecodeError."""
    obj = _unpack(payload, limits)
    if type(obj) is not tuple or not obj or type(obj[0]) is not int:
        raise MessageDecodeError("message must be an array [type, fields...]")
    cls = registry.get(obj[0])
    if cls is None:
        raise MessageDecodeError(f"unknown message type {obj[0]}")
    return _build(cls, obj[1:], kind=None, request_id=None)
