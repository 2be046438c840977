"""Sans-IO secure session: a Noise XX handshake, then a framed byte stream.

No sockets and no asyncio here: bytes go in through :meth:`Session.get_buffer`
/ :meth:`Session.buffer_updated` (or :meth:`Session.receive_data`), frames come
out, and whatever must be sent is taken with :meth:`Session.take_outgoing`.
Two sessions can be wired to each other in memory.

On the wire, in order
---------------------
1. Handshake, ``Noise_XX_25519_AESGCM_SHA256`` from ``noiseprotocol``, each
   message as a 2-byte big-endian length + the Noise message::

       I -> R   msg1  e                          (empty payload)
       R -> I   msg2  e, ee, s, es  + identity   (encrypted payload)
       I -> R   msg3  s, se         + identity   (encrypted payload)
       R -> I   verdict: a Noise transport message holding msgpack [ok, reason]

   identity = msgpack ``[version, encrypt, ed25519_public_key, signature]`` with
   ``signature = Ed25519(identity key, SIGNATURE_DOMAIN + noise_static_public)``.
   The receiver checks the signature against the Noise static key the
   handshake itself authenticated (``rs``), so a peer cannot replay another
   node's signed key without that node's X25519 private key, then derives the
   node id from the Ed25519 key.

2. Then, ``encrypt=True``: the frame stream (4-byte length-prefixed frames, see
   ``p2pnode.wire.frame``) cut into chunks of at most 65519 bytes, each sent as
   a 2-byte length + Noise transport ciphertext (<= 65535 bytes). Framing and
   everything above never see the encryption.

   ``encrypt=False`` (BENCHMARKS ONLY): after the same authenticated handshake
   and verdict the frame stream is sent RAW. Nothing after the handshake is
   encrypted or authenticated: anyone on the path can read, inject, drop or
   rewrite requests and answers while the peer still appears to be the node
   the handshake proved. Both sides must agree, or the handshake fails.

Rules
-----
- The initiator sends nothing after msg3 until it has read an ok verdict; a
  rejected verdict carries the reason, raised as ``HandshakeError``.
- The dialer may name the node id it expects; a different one raises
  ``HandshakeError`` stating expected vs got, and msg3 is never sent.
- Versions: each side sends its own; a version the receiver does not support
  is a ``HandshakeError`` naming both.
- Handshake failures raise ``HandshakeError``; later failures raise
  ``ProtocolError`` (``ChannelAuthError`` for a chunk that fails
  authentication, ``LimitExceeded`` for an oversized frame). The session is
  then dead; bytes queued before the raise (a reject verdict) may still be
  flushed by the caller.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack  # type: ignore[import-untyped]  # no stubs; pyproject lacks an override
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from noise.connection import Keypair, NoiseConnection
from noise.constants import MAX_NONCE as NOISE_MAX_NONCE
from noise.exceptions import (
    NoiseHandshakeError,
    NoiseInvalidMessage,
    NoiseMaxNonceError,
    NoiseValueError,
)

from p2pnode.errors import ChannelAuthError, HandshakeError, ProtocolError
from p2pnode.identity import (
    PUBLIC_KEY_LEN,
    Identity,
    node_id_from_public_key,
    peer_id_to_str,
    verify_signature,
)
from p2pnode.wire.buffers import Buffer, BufferPool
from p2pnode.wire.frame import CHUNK_HEADER, FRAME_HEADER, FrameDecoder, PrefixDecoder, frame_header

NOISE_PROTOCOL = b"Noise_XX_25519_AESGCM_SHA256"
PROLOGUE = b"p2pnode secure channel"
SIGNATURE_DOMAIN = b"p2pnode-noise-static-key-v1:"
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

MAX_CHUNK = 0xFFFF
TAG_LEN = 16
MAX_CHUNK_PLAINTEXT = MAX_CHUNK - TAG_LEN
CHUNK_OVERHEAD = 2 + TAG_LEN
SIGNATURE_LEN = 64
X25519_KEY_LEN = 32  # the XX first message: the initiator ephemeral key, no payload
# Sealed frames at least this large go into pooled buffers.
_POOLED_SEAL = 64 * 1024
FRAME_HEADER_LEN = FRAME_HEADER.size

_NOISE_ERRORS = (
    InvalidTag,
    NoiseHandshakeError,
    NoiseInvalidMessage,
    NoiseValueError,
    NoiseMaxNonceError,
    ValueError,
)
_A = TypeVar("_A")
_UNPACK_ERRORS = (ValueError, TypeError, OverflowError, msgpack.UnpackException)


@dataclass(frozen=True)
class Credentials:
    """A host's Noise static key and the Ed25519 signature binding it to its identity."""

    noise_private: bytes
    noise_public: bytes
    ed25519_public: bytes
    signature: bytes

    @classmethod
    def create(cls, identity: Identity) -> Credentials:
        key = X25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(private, public, identity.public_key, identity.sign(SIGNATURE_DOMAIN + public))

    @property
    def node_id(self) -> bytes:
        return node_id_from_public_key(self.ed25519_public)


class TransportCipher:
    """One direction of the Noise transport: a ``CipherState`` from noiseprotocol's Split.

    :meth:`encrypt` / :meth:`decrypt` call noiseprotocol's ``CipherState``.
    The ``*_into`` variants compute exactly the same thing, ENCRYPT(k, n++,
    ad=empty, plaintext) with Noise's AESGCM nonce encoding and the same
    counter, but let the AEAD (``cryptography``'s AESGCM, keyed by Noise)
    write into our buffer: no allocation and no copy per 64 KiB chunk. They
    read noiseprotocol 0.3.1's ``CipherState`` fields (``n``, ``cipher``,
    ``cipher.format_nonce``) and fall back to the copying calls if those or
    ``encrypt_into`` are missing. Tests check both paths interoperate.
    """

    __slots__ = ("_aead", "_cs", "_nonce")

    def __init__(self, cipher_state: Any) -> None:
        self._cs = cipher_state
        wrapper = getattr(cipher_state, "cipher", None)
        aead = getattr(wrapper, "cipher", None)
        nonce = getattr(wrapper, "format_nonce", None)
        fast = (
            hasattr(aead, "encrypt_into")
            and hasattr(aead, "decrypt_into")
            and callable(nonce)
            and isinstance(getattr(cipher_state, "n", None), int)
        )
        self._aead = aead if fast else None
        self._nonce = nonce

    @property
    def in_place(self) -> bool:
        return self._aead is not None

    def encrypt(self, plaintext: Buffer) -> bytes:
        return self._cs.encrypt_with_ad(None, plaintext)

    def decrypt(self, ciphertext: Buffer) -> bytes:
        cs = self._cs
        if self._aead is None:
            return cs.decrypt_with_ad(None, ciphertext)
        if cs.n >= NOISE_MAX_NONCE:
            raise NoiseMaxNonceError("Nonce has depleted!")
        assert self._nonce is not None
        plaintext: bytes = self._aead.decrypt(self._nonce(cs.n), ciphertext, None)
        cs.n += 1  # only after the tag checked, as noiseprotocol does
        return plaintext

    def encrypt_into(self, plaintext: Buffer, out: memoryview) -> None:
        """``out`` must be exactly ``len(plaintext) + 16`` bytes."""
        cs = self._cs
        if self._aead is None:
            out[:] = cs.encrypt_with_ad(None, plaintext)
            return
        if cs.n >= NOISE_MAX_NONCE:
            raise NoiseMaxNonceError("Nonce has depleted!")
        assert self._nonce is not None
        self._aead.encrypt_into(self._nonce(cs.n), plaintext, None, out)
        cs.n += 1

    def decrypt_into(self, ciphertext: Buffer, out: memoryview) -> None:
        """``out`` must be exactly ``len(ciphertext) - 16`` bytes."""
        cs = self._cs
        if self._aead is None:
            out[:] = cs.decrypt_with_ad(None, ciphertext)
            return
        if cs.n >= NOISE_MAX_NONCE:
            raise NoiseMaxNonceError("Nonce has depleted!")
        assert self._nonce is not None
        self._aead.decrypt_into(self._nonce(cs.n), ciphertext, None, out)
        cs.n += 1  # only after the tag checked, as noiseprotocol does


def _plan_chunks(header: bytes, pieces: Sequence[Buffer]) -> list[list[Any]]:
    """Cut ``header + pieces`` into chunk plaintexts: ``[length, segment, ...]``.

    Bulk data is cut into full chunks read straight from its view; small
    pieces are gathered; a small head before bulk data is its own chunk, so
    the bulk is never copied to line up with chunk boundaries.
    """
    limit = MAX_CHUNK_PLAINTEXT
    plan: list[list[Any]] = []
    cur: list[Any] = [0]
    for piece in (header, *pieces):
        view = piece if isinstance(piece, memoryview) else memoryview(piece)
        pos, end = 0, len(view)
        while pos < end:
            left = end - pos
            if left >= limit:
                if cur[0]:
                    plan.append(cur)
                    cur = [0]
                plan.append([limit, view[pos : pos + limit]])
                pos += limit
                continue
            take = min(left, limit - cur[0])
            cur.append(view[pos : pos + take])
            cur[0] += take
            pos += take
            if cur[0] == limit:
                plan.append(cur)
                cur = [0]
    if cur[0] or not plan:
        plan.append(cur if len(cur) > 1 else [0, b""])
    return plan


class State(enum.StrEnum):
    SEND_MSG1 = "send msg1"
    AWAIT_MSG1 = "await msg1"
    AWAIT_MSG2 = "await msg2"
    AWAIT_MSG3 = "await msg3"
    AWAIT_VERDICT = "await verdict"
    OPEN = "open"
    FAILED = "failed"


class Session:
    """One side of a secure connection (see the module rules)."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        initiator: bool,
        encrypt: bool,
        max_frame: int,
        expected_node_id: bytes | None = None,
        version: int = PROTOCOL_VERSION,
        supported_versions: frozenset[int] = SUPPORTED_VERSIONS,
    ) -> None:
        self.credentials = credentials
        self.initiator = initiator
        self.encrypt = encrypt
        self.expected_node_id = expected_node_id
        self.version = version
        self.supported_versions = supported_versions
        self.remote_public_key: bytes | None = None
        self.remote_node_id: bytes | None = None
        self.remote_version: int | None = None

        noise = NoiseConnection.from_name(NOISE_PROTOCOL)
        if initiator:
            noise.set_as_initiator()
        else:
            noise.set_as_responder()
        noise.set_keypair_from_private_bytes(Keypair.STATIC, credentials.noise_private)
        noise.set_prologue(PROLOGUE)
        noise.start_handshake()
        self._noise = noise
        # noiseprotocol drops handshake_state when the handshake ends; keep it
        # to read the peer's static key (rs) after the last message.
        self._hs = noise.noise_protocol.handshake_state
        self._state = State.SEND_MSG1 if initiator else State.AWAIT_MSG1
        self._chunks = PrefixDecoder(
            MAX_CHUNK,
            header=CHUNK_HEADER,
            what="secure-channel chunk",
            scratch_size=1024 * 1024,
            direct_threshold=MAX_CHUNK + 1,  # chunks always land in the scratch
        )
        self._frames = FrameDecoder(max_frame)
        self._hs_buf: memoryview | None = memoryview(bytearray(MAX_CHUNK + 2))
        self._seal_pool = BufferPool(keep=4)
        self._out: list[Buffer] = []
        self._enc: TransportCipher | None = None
        self._dec: TransportCipher | None = None

    # -- state -------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def established(self) -> bool:
        return self._state is State.OPEN

    @property
    def max_frame(self) -> int:
        return self._frames.max_len

    @property
    def held(self) -> int:
        """Bytes of receive buffers held now (frames and chunks being received,
        read buffers, pooled bodies)."""
        return self._chunks.held + self._frames.held

    @property
    def receiving(self) -> int:
        """Bytes held for frames being received (``held`` without pooled bodies)."""
        return self._chunks.receiving + self._frames.receiving

    def take_outgoing(self) -> list[Buffer]:
        out, self._out = self._out, []
        return out

    def initiate(self) -> None:
        """Initiator only: queue msg1."""
        if self._state is not State.SEND_MSG1:
            raise RuntimeError("initiate() is for a fresh initiator session")
        self._send_chunk(self._noise.write_message(b""))
        self._state = State.AWAIT_MSG2

    # -- receiving ---------------------------------------------------------

    def get_buffer(self) -> memoryview:
        if self._state is State.OPEN:
            if self.encrypt:
                self._frames.release()
                return self._chunks.get_buffer()
            return self._frames.get_buffer()
        if self._state is State.FAILED or self._hs_buf is None:
            raise ProtocolError("session failed")
        return self._hs_buf

    def buffer_updated(self, nbytes: int) -> list[memoryview]:
        """Frames completed by the ``nbytes`` just received.

        Views stay valid until the next :meth:`get_buffer` call.
        """
        if self._state is State.OPEN:
            if not self.encrypt:
                return self._guard(self._frames.buffer_updated, nbytes)
            return self._open_chunks(self._guard(self._chunks.buffer_updated, nbytes))
        assert self._hs_buf is not None
        frames = self._handshake_bytes(self._hs_buf[:nbytes])
        if self._state is State.OPEN:
            self._hs_buf = None  # frames never point into it: see _handshake_bytes
        return frames

    def stable(self, frame: memoryview) -> bool:
        """Whether a frame just returned may be kept past the next ``get_buffer``
        (it sits in its own pooled buffer, not reused while a view of it is alive)."""
        return self._frames.stable(frame)

    def trim(self) -> None:
        """Give back buffers kept for speed; call when the connection is quiet."""
        self._chunks.trim()
        self._frames.trim()
        self._seal_pool.clear()

    def receive_data(self, data: Buffer) -> list[bytes]:
        """Convenience for tests and in-memory pairs: feed bytes, get owned frames."""
        frames: list[bytes] = []
        view = memoryview(data).cast("B")
        while view:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            frames.extend(bytes(f) for f in self.buffer_updated(n))
        return frames

    def eof(self) -> None:
        """The peer closed its side; raise if that truncated something."""
        if self._state is State.FAILED:
            return
        if self._state is not State.OPEN:
            hint = self._state_hint()
            self._state = State.FAILED
            raise HandshakeError(f"connection closed during the handshake ({hint})")
        if not (self._chunks.at_boundary and self._frames.at_boundary):
            self._state = State.FAILED
            raise ProtocolError("connection closed in the middle of a frame")

    # -- sending -----------------------------------------------------------

    def seal(self, pieces: Sequence[Buffer], length: int) -> list[Buffer]:
        """Frame a payload given as ``pieces`` (``length`` bytes in all) for the wire.

        Encrypted, the result is one buffer per frame: chunk headers and
        ciphertext written in place, bulk piece data read straight from the
        caller's views. The buffer comes from a pool and is reused only once
        nothing references it (the transport may keep it).
        """
        if self._state is not State.OPEN:
            raise RuntimeError("session is not open")
        header = frame_header(length)
        if not self.encrypt:
            # one small write for header + envelope prefix, the bulk as is
            if pieces and len(pieces[0]) <= 4096:
                return [header + bytes(pieces[0]), *pieces[1:]]
            return [header, *pieces]
        enc = self._enc
        assert enc is not None
        if len(pieces) == 1 and length + FRAME_HEADER_LEN <= MAX_CHUNK_PLAINTEXT:
            # one small message (most requests and answers): one chunk, no plan
            n = length + FRAME_HEADER_LEN
            small = bytearray(n + CHUNK_OVERHEAD)
            CHUNK_HEADER.pack_into(small, 0, n + TAG_LEN)
            enc.encrypt_into(header + pieces[0], memoryview(small)[2:])
            return [small]
        plan = _plan_chunks(header, pieces)
        size = 0
        for chunk in plan:
            size += chunk[0] + CHUNK_OVERHEAD
        big = size >= _POOLED_SEAL
        view = self._seal_pool.view(size) if big else memoryview(bytearray(size))
        out = view
        pack_into = CHUNK_HEADER.pack_into
        pos = 0
        for chunk in plan:
            n = chunk[0]
            pack_into(out, pos, n + TAG_LEN)
            src = chunk[1] if len(chunk) == 2 else b"".join(chunk[1:])
            enc.encrypt_into(src, view[pos + 2 : pos + 2 + n + TAG_LEN])
            pos += n + CHUNK_OVERHEAD
        return [view]

    # -- internals ---------------------------------------------------------

    def _guard(self, fn: Callable[[_A], list[memoryview]], arg: _A) -> list[memoryview]:
        try:
            return fn(arg)
        except ProtocolError:
            self._state = State.FAILED
            raise

    def _open_chunks(self, chunks: list[memoryview]) -> list[memoryview]:
        frames: list[memoryview] = []
        dec = self._dec
        assert dec is not None
        decoder = self._frames
        for chunk in chunks:
            n = len(chunk) - TAG_LEN
            try:
                # Inside a large frame: decrypt straight into the frame's buffer.
                dest = decoder.reserve(n) if n > 0 else None
                if dest is not None:
                    dec.decrypt_into(chunk, dest)
                    frames.extend(decoder.commit(n))
                    continue
                plain = dec.decrypt(chunk)
            except _NOISE_ERRORS:
                self._state = State.FAILED
                raise ChannelAuthError(
                    "secure channel: a chunk failed authentication (tampered or reordered)"
                ) from None
            frames.extend(self._guard(decoder.feed_views, plain))
        return frames

    def _send_chunk(self, data: bytes | bytearray) -> None:
        self._out += (CHUNK_HEADER.pack(len(data)), bytes(data))

    def _state_hint(self) -> str:
        return {
            State.SEND_MSG1: "nothing sent",
            State.AWAIT_MSG1: "no first message",
            State.AWAIT_MSG2: "no answer to our first message",
            State.AWAIT_MSG3: "no final message",
            State.AWAIT_VERDICT: "no verdict",
        }.get(self._state, self._state.value)

    def _handshake_bytes(self, view: memoryview) -> list[memoryview]:
        pos = 0
        self._chunks.release()
        try:
            while pos < len(view) and self._state is not State.OPEN:
                chunk, used = self._chunks.feed_one(view[pos:])
                pos += used
                if chunk is not None:
                    self._handshake_message(bytes(chunk))
        except HandshakeError:
            self._state = State.FAILED
            raise
        except ProtocolError as exc:
            self._state = State.FAILED
            raise HandshakeError(f"bad handshake message: {exc}") from None
        rest = view[pos:]
        if self._state is not State.OPEN or not rest:
            return []
        if self.encrypt:
            return self._open_chunks(self._guard(self._chunks.feed_views, rest))
        # The frame decoder hands out views of ``rest``: copy it out of the
        # handshake scratch, which the next read reuses.
        return self._guard(self._frames.feed_views, bytes(rest))

    def _handshake_message(self, msg: bytes) -> None:
        state = self._state
        try:
            if state is State.AWAIT_MSG1:
                # XX message 1 is the initiator's ephemeral key and our dialers send
                # no payload with it: anything else is junk, refused now rather than
                # at the handshake timeout.
                if len(msg) != X25519_KEY_LEN:
                    raise HandshakeError(
                        f"first handshake message is {len(msg)} bytes, expected {X25519_KEY_LEN}"
                    )
                self._noise.read_message(msg)
                self._send_chunk(self._noise.write_message(self._identity_payload()))
                self._state = State.AWAIT_MSG3
            elif state is State.AWAIT_MSG2:
                payload = self._noise.read_message(msg)
                self._check_peer(bytes(payload))
                self._send_chunk(self._noise.write_message(self._identity_payload()))
                self._state = State.AWAIT_VERDICT
            elif state is State.AWAIT_MSG3:
                payload = self._noise.read_message(msg)
                self._take_ciphers()
                try:
                    self._check_peer(bytes(payload))
                except HandshakeError as exc:
                    self._send_verdict(False, str(exc))
                    raise
                self._send_verdict(True, "")
                self._state = State.OPEN
            elif state is State.AWAIT_VERDICT:
                self._take_ciphers()
                assert self._dec is not None
                verdict = self._dec.decrypt(msg)
                self._read_verdict(verdict)
                self._state = State.OPEN
            else:
                raise HandshakeError(f"unexpected handshake message in state {state.value}")
        except _NOISE_ERRORS as exc:
            raise HandshakeError(
                f"handshake message failed ({self._state_hint()}): {type(exc).__name__} {exc}"
            ) from None

    def _take_ciphers(self) -> None:
        proto = self._noise.noise_protocol
        self._enc = TransportCipher(proto.cipher_state_encrypt)
        self._dec = TransportCipher(proto.cipher_state_decrypt)

    def _identity_payload(self) -> bytes:
        c = self.credentials
        return msgpack.packb([self.version, self.encrypt, c.ed25519_public, c.signature])

    def _send_verdict(self, ok: bool, reason: str) -> None:
        assert self._enc is not None
        body = msgpack.packb([ok, reason[:512]])
        self._send_chunk(self._enc.encrypt(body))

    def _read_verdict(self, data: bytes) -> None:
        try:
            verdict = msgpack.unpackb(data, use_list=False, max_str_len=1024, max_array_len=4)
        except _UNPACK_ERRORS:
            raise HandshakeError("peer sent an unreadable handshake verdict") from None
        if (
            type(verdict) is not tuple
            or len(verdict) != 2
            or type(verdict[0]) is not bool
            or type(verdict[1]) is not str
        ):
            raise HandshakeError("peer sent a malformed handshake verdict")
        if not verdict[0]:
            raise HandshakeError(f"peer rejected the handshake: {verdict[1]}")

    def _check_peer(self, payload: bytes) -> None:
        try:
            fields = msgpack.unpackb(
                payload, use_list=False, max_bin_len=256, max_str_len=256, max_array_len=16
            )
        except _UNPACK_ERRORS:
            raise HandshakeError("peer's identity payload is not valid msgpack") from None
        if type(fields) is not tuple or not fields or type(fields[0]) is not int:
            raise HandshakeError("peer's identity payload is malformed")
        version = fields[0]
        if version not in self.supported_versions:
            raise HandshakeError(
                f"unsupported protocol version: peer speaks {version}, this node supports "
                f"{', '.join(map(str, sorted(self.supported_versions)))}"
            )
        if (
            len(fields) != 4
            or type(fields[1]) is not bool
            or type(fields[2]) is not bytes
            or len(fields[2]) != PUBLIC_KEY_LEN
            or type(fields[3]) is not bytes
            or len(fields[3]) != SIGNATURE_LEN
        ):
            raise HandshakeError("peer's identity payload is malformed")
        _, encrypt, public_key, signature = fields
        remote_static = self._hs.rs.public_bytes
        if not verify_signature(public_key, signature, SIGNATURE_DOMAIN + remote_static):
            raise HandshakeError(
                "peer's identity signature does not cover its Noise static key "
                "(replayed or forged identity)"
            )
        node_id = node_id_from_public_key(public_key)
        if self.expected_node_id is not None and node_id != self.expected_node_id:
            raise HandshakeError(
                f"wrong peer: expected {peer_id_to_str(self.expected_node_id)}, "
                f"got {peer_id_to_str(node_id)}"
            )
        if node_id == self.credentials.node_id:
            raise HandshakeError("connected to ourselves")
        if encrypt != self.encrypt:
            raise HandshakeError(
                f"encryption mismatch: peer has encrypt={encrypt}, this node encrypt={self.encrypt}"
            )
        self.remote_public_key = public_key
        self.remote_node_id = node_id
        self.remote_version = version
