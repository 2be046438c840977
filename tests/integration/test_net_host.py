"""PeerHost tests over real sockets on 127.0.0.1.

Rules for this module: port 0 only, no fixed ports; no sleep used as
synchronisation (wait on an event, or poll a condition with a deadline via
``eventually``); every host is closed by the ``hosts`` fixture, and
``test_close_leaves_no_tasks`` checks that closing ends every task.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import pytest

from p2pnode.clock import FakeClock
from p2pnode.errors import (
    ClosedUnread,
    HandshakeError,
    LimitExceeded,
    P2PError,
    P2PTimeoutError,
    ProtocolError,
    RequestTimeout,
    UsageError,
)
from p2pnode.exchange.messages import GetHave, GetManifest, GetPiece, Have, ManifestData, PieceData
from p2pnode.identity import Identity, peer_id_to_str
from p2pnode.net import (
    ConnectionClosed,
    NetLimits,
    PeerAddress,
    PeerHost,
    PeerUnreachable,
    RemoteError,
)
from p2pnode.net.connection import PeerConnection
from p2pnode.net.connection import serving as serving_conn
from p2pnode.net.session import Credentials
from p2pnode.wire.messages import (
    ErrorCode,
    ErrorReply,
    Message,
    Ping,
    Pong,
    goaway,
    message,
    request,
    wire,
)
from tests.helpers import can_bind

RID = bytes(range(32))
FAST = NetLimits(handshake_timeout=5.0, request_timeout=10.0)

MakeHost = Callable[..., PeerHost]


@pytest.fixture
async def hosts() -> AsyncIterator[MakeHost]:
    made: list[PeerHost] = []

    def make(limits: NetLimits = FAST, identity: Identity | None = None) -> PeerHost:
        host = PeerHost(identity or Identity.generate(), limits)
        made.append(host)
        return host

    yield make
    for host in made:
        await host.close()


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


async def echo_handler(node_id: bytes, msg: Message) -> Message:
    if isinstance(msg, GetPiece):
        return PieceData(msg.resource_id, msg.index, msg.index.to_bytes(4, "big") * 8)
    if isinstance(msg, GetManifest):
        return ManifestData(msg.resource_id, node_id)
    if isinstance(msg, GetHave):
        return ErrorReply(ErrorCode.NOT_FOUND, "nothing here")
    return ErrorReply(ErrorCode.UNSUPPORTED, type(msg).__name__)


async def serving(make: MakeHost, limits: NetLimits = FAST) -> tuple[PeerHost, PeerAddress]:
    server = make(limits)
    server.set_handler(echo_handler)
    port = await server.listen("127.0.0.1", 0)
    return server, PeerAddress(server.node_id, "127.0.0.1", port)


async def test_request_response_and_remote_error(hosts: MakeHost) -> None:
    server, addr = await serving(hosts)
    client = hosts()
    assert await client.request(addr, Ping()) == Pong()
    reply = await client.request(addr, GetPiece(RID, 7))
    assert reply == PieceData(RID, 7, (7).to_bytes(4, "big") * 8)
    # the handler sees the authenticated node id of the requester
    assert await client.request(addr, GetManifest(RID)) == ManifestData(RID, client.node_id)
    with pytest.raises(RemoteError) as info:
        await client.request(addr, GetHave(RID))
    assert info.value.code == ErrorCode.NOT_FOUND
    stats = client.stats()
    assert stats["connections_dialed"] == 1
    assert stats["remote_errors"] == 1
    assert stats["frames_out"] == 4 and stats["bytes_out"] > 0
    assert server.stats()["connections_accepted"] == 1
    assert client.connected_peers() == [server.node_id]


async def test_many_concurrent_requests_share_one_connection(hosts: MakeHost) -> None:
    server, addr = await serving(hosts)
    client = hosts()
    replies = await asyncio.gather(*(client.request(addr, GetPiece(RID, i)) for i in range(300)))
    for i, reply in enumerate(replies):
        assert isinstance(reply, PieceData) and reply.index == i
    assert client.stats()["connections_dialed"] == 1
    assert server.stats()["connections_accepted"] == 1


async def test_large_pieces_with_backpressure(hosts: MakeHost) -> None:
    data = os.urandom(1 << 20)

    async def pieces(node_id: bytes, msg: Message) -> Message:
        assert isinstance(msg, GetPiece)
        return PieceData(msg.resource_id, msg.index, memoryview(data))

    limits = replace(FAST, write_buffer_high=64 * 1024)
    server = hosts(limits)
    server.set_handler(pieces)
    port = await server.listen("127.0.0.1", 0)
    client = hosts(limits)
    addr = PeerAddress(server.node_id, "127.0.0.1", port)
    replies = await asyncio.gather(*(client.request(addr, GetPiece(RID, i)) for i in range(24)))
    assert all(isinstance(r, PieceData) and r.data == data for r in replies)
    assert server.stats()["write_pauses"] > 0


@pytest.mark.parametrize("encrypt", [True, False])
async def test_plaintext_and_encrypted_modes(hosts: MakeHost, encrypt: bool) -> None:
    limits = replace(FAST, encrypt=encrypt)
    _server, addr = await serving(hosts, limits)
    client = hosts(limits)
    assert await client.request(addr, GetPiece(RID, 1)) == PieceData(
        RID, 1, b"\x00\x00\x00\x01" * 8
    )


async def test_encrypt_mismatch_is_a_handshake_error(hosts: MakeHost) -> None:
    _server, addr = await serving(hosts, replace(FAST, encrypt=False))
    client = hosts()
    with pytest.raises(HandshakeError, match="encryption mismatch"):
        await client.request(addr, Ping())


async def test_wrong_peer_id(hosts: MakeHost) -> None:
    server, addr = await serving(hosts)
    client = hosts()
    wanted = Identity.generate().node_id
    with pytest.raises(HandshakeError) as info:
        await client.request(PeerAddress(wanted, addr.host, addr.port), Ping())
    assert f"expected {peer_id_to_str(wanted)}" in str(info.value)
    assert f"got {peer_id_to_str(server.node_id)}" in str(info.value)
    assert client.stats()["handshake_failures"] == 1
    await eventually(lambda: server.stats()["connections_handshaking"] == 0)
    assert server.stats()["handshake_failures"] == 1


async def test_bootstrap_dial_without_node_id_then_reuse(hosts: MakeHost) -> None:
    server, addr = await serving(hosts)
    client = hosts()
    assert await client.request(PeerAddress(None, addr.host, addr.port), Ping()) == Pong()
    assert client.connected_peers() == [server.node_id]
    assert await client.request(addr, Ping()) == Pong()
    assert await client.request(PeerAddress(None, addr.host, addr.port), Ping()) == Pong()
    assert client.stats()["connections_dialed"] == 1


async def test_concurrent_first_requests_share_one_dial(hosts: MakeHost) -> None:
    _server, addr = await serving(hosts)
    client = hosts()
    await asyncio.gather(*(client.request(addr, Ping()) for _ in range(50)))
    assert client.stats()["connections_dialed"] == 1


async def test_connections_are_symmetric(hosts: MakeHost) -> None:
    server, addr = await serving(hosts)
    client = hosts()
    client.set_handler(echo_handler)
    await client.request(addr, Ping())
    # the server reaches the client over the inbound connection (bogus port: no dial)
    back = PeerAddress(client.node_id, "127.0.0.1", 1)
    assert await server.request(back, GetManifest(RID)) == ManifestData(RID, server.node_id)
    assert server.stats().get("connections_dialed", 0) == 0


async def test_truncated_handshake_from_client(hosts: MakeHost) -> None:
    server, addr = await serving(hosts)
    _reader, writer = await asyncio.open_connection(addr.host, addr.port)
    writer.write(b"\x00\x20" + b"x" * 10)  # msg1 announces 32 bytes, sends 10
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await eventually(lambda: server.stats().get("handshake_failures", 0) == 1)
    await eventually(lambda: server.stats()["connections_handshaking"] == 0)


async def test_truncated_handshake_from_server(hosts: MakeHost) -> None:
    async def half_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(2 + 32)
        writer.write(b"\x00\x60" + os.urandom(40))  # msg2 announces 96 bytes, sends 40
        await writer.drain()
        writer.close()

    fake = await asyncio.start_server(half_answer, "127.0.0.1", 0)
    port = fake.sockets[0].getsockname()[1]
    client = hosts()
    try:
        with pytest.raises(HandshakeError, match="closed during the handshake"):
            await client.request(PeerAddress(None, "127.0.0.1", port), Ping())
    finally:
        fake.close()
        await fake.wait_closed()
    assert client.stats()["handshake_failures"] == 1


async def test_handshake_timeouts(hosts: MakeHost) -> None:
    silent_done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # until the dialer gives up (it resets the connection)
        except ConnectionError:
            pass
        finally:
            writer.close()
            silent_done.set()

    fake = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = fake.sockets[0].getsockname()[1]
    limits = replace(FAST, handshake_timeout=0.2)
    client = hosts(limits)
    try:
        with pytest.raises(P2PTimeoutError, match="timed out"):
            await client.request(PeerAddress(None, "127.0.0.1", port), Ping())
        await asyncio.wait_for(silent_done.wait(), 5)
    finally:
        fake.close()
        await fake.wait_closed()
    assert client.stats()["handshake_timeouts"] >= 1
    # and a server drops a client that never speaks
    server, addr = await serving(hosts, limits)
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        pass  # dropped with a RST: equally gone
    writer.close()
    assert server.stats()["handshake_timeouts"] == 1


async def test_unreachable_peer(hosts: MakeHost) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    client = hosts()
    with pytest.raises(PeerUnreachable, match=f"127.0.0.1:{port}"):
        await client.request(PeerAddress(None, "127.0.0.1", port), Ping())
    assert client.stats()["dial_failures"] == 1


async def test_tampered_ciphertext_closes_connection(hosts: MakeHost) -> None:
    server, addr = await serving(hosts)
    proxy_tasks: set[asyncio.Task[None]] = set()

    async def pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tamper_chunk: int | None
    ) -> None:
        index = 0
        try:
            while True:
                if tamper_chunk is None:
                    data = await reader.read(65536)
                    if not data:
                        break
                    writer.write(data)
                else:
                    head = await reader.readexactly(2)
                    body = bytearray(await reader.readexactly(int.from_bytes(head, "big")))
                    if index == tamper_chunk:
                        body[len(body) // 2] ^= 0x40
                    index += 1
                    writer.write(head + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection(addr.host, addr.port)
        # client->server chunks: msg1, msg3, then the first request: tamper that
        for t in (pipe(c_reader, s_writer, 2), pipe(s_reader, c_writer, None)):
            task = asyncio.create_task(t)
            proxy_tasks.add(task)

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    client = hosts()
    try:
        with pytest.raises(ConnectionClosed):
            await client.request(PeerAddress(server.node_id, "127.0.0.1", port), Ping())
        await eventually(lambda: server.stats().get("tampered_chunks", 0) == 1)
        assert server.stats()["connections_open"] == 0
    finally:
        proxy.close()
        await proxy.wait_closed()
        await asyncio.gather(*proxy_tasks, return_exceptions=True)


async def test_replayed_identity_is_rejected(hosts: MakeHost) -> None:
    server, addr = await serving(hosts)
    victim = hosts()
    attacker = hosts()
    # The attacker presents the victim's public key and signature over the
    # victim's Noise key, but can only use its own Noise static key.
    real = victim._credentials
    own = attacker._credentials
    attacker._credentials = Credentials(
        own.noise_private, own.noise_public, real.ed25519_public, real.signature
    )
    with pytest.raises(HandshakeError, match=r"rejected the handshake: .*replayed or forged"):
        await attacker.request(addr, Ping())
    await eventually(lambda: server.stats().get("handshake_failures", 0) == 1)
    assert server.connected_peers() == []


async def test_oversized_frame_drops_only_that_connection(hosts: MakeHost) -> None:
    small = replace(FAST, max_frame=64 * 1024)
    server, addr = await serving(hosts, small)
    big_client = hosts(replace(FAST, max_frame=1 << 20))
    other = hosts()
    assert await other.request(addr, Ping()) == Pong()
    with pytest.raises(ConnectionClosed):
        await big_client.request(addr, ManifestData(RID, b"m" * 100_000))
    await eventually(lambda: server.stats().get("oversized_frames", 0) == 1)
    assert await other.request(addr, Ping()) == Pong()  # the other peer is untouched
    assert other.stats()["connections_dialed"] == 1
    # and our own limit is checked before sending
    small_client = hosts(small)
    with pytest.raises(LimitExceeded, match="exceeds max_frame"):
        await small_client.request(addr, ManifestData(RID, b"m" * 100_000))


async def test_inflight_limit_answers_busy(hosts: MakeHost) -> None:
    release = asyncio.Event()
    entered = 0

    async def slow(node_id: bytes, msg: Message) -> Message:
        nonlocal entered
        entered += 1
        await release.wait()
        return Have(RID, True, b"")

    limits = replace(FAST, max_inflight_per_connection=2)
    server = hosts(limits)
    server.set_handler(slow)
    port = await server.listen("127.0.0.1", 0)
    client = hosts()
    addr = PeerAddress(server.node_id, "127.0.0.1", port)
    calls = [asyncio.ensure_future(client.request(addr, GetHave(RID))) for _ in range(5)]
    await eventually(lambda: sum(c.done() for c in calls) == 3)
    for c in calls:
        if c.done():
            exc = c.exception()
            assert isinstance(exc, RemoteError) and exc.code == ErrorCode.BUSY
    assert entered == 2
    assert server.stats()["rejected_busy"] == 3
    assert server.stats()["handlers_inflight"] == 2
    assert await client.request(addr, Ping()) == Pong()  # Ping is answered inline
    release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert sum(isinstance(r, Have) for r in results) == 2


async def test_max_connections_per_ip(hosts: MakeHost) -> None:
    server, addr = await serving(hosts, replace(FAST, max_connections_per_ip=2))
    clients = [hosts() for _ in range(3)]
    for c in clients[:2]:
        assert await c.request(addr, Ping()) == Pong()
    with pytest.raises(HandshakeError, match="closed during the handshake"):
        await clients[2].request(addr, Ping())
    assert server.stats()["rejected_per_ip"] == 1
    await clients[0].close()
    await eventually(lambda: server.stats()["connections_inbound"] == 1)
    assert await clients[2].request(addr, Ping()) == Pong()


async def test_max_connections_total_and_outbound_eviction(hosts: MakeHost) -> None:
    server, addr = await serving(hosts, replace(FAST, max_connections=1))
    a, b = hosts(), hosts()
    assert await a.request(addr, Ping()) == Pong()
    # inbound: at the limit, the least recently used idle connection makes room
    assert await b.request(addr, Ping()) == Pong()
    assert server.stats()["evicted_idle_inbound"] == 1
    await eventually(lambda: a.stats()["connections_open"] == 0)
    # outbound: at the limit, the least recently used idle connection is evicted
    _s2, addr2 = await serving(hosts)
    dialer = hosts(replace(FAST, max_outbound=1))
    assert await dialer.request(addr2, Ping()) == Pong()
    s3, addr3 = await serving(hosts)
    assert await dialer.request(addr3, Ping()) == Pong()
    assert dialer.stats()["evicted_idle"] == 1
    assert dialer.connected_peers() == [s3.node_id]


async def test_idle_timeout_closes_and_redials(hosts: MakeHost) -> None:
    limits = replace(FAST, idle_timeout=0.2)
    server, addr = await serving(hosts, limits)
    client = hosts(limits)
    assert await client.request(addr, Ping()) == Pong()
    await eventually(lambda: client.stats()["connections_open"] == 0)
    await eventually(lambda: server.stats()["connections_open"] == 0)
    # either side may time out first (the other then sees its goaway)
    assert client.stats().get("idle_closed", 0) + server.stats().get("idle_closed", 0) >= 1
    assert await client.request(addr, Ping()) == Pong()
    assert client.stats()["connections_dialed"] == 2


async def test_a_request_crossing_a_graceful_close_is_sent_again(hosts: MakeHost) -> None:
    """The race of an idle close (or AutoNAT's closed dial-back) made certain: the
    server stops reading, the client's request reaches its socket, the server
    closes gracefully. Its goaway says it read nothing: the host sends the
    request once more, on a new connection, and it succeeds."""
    seen: list[Message] = []

    async def handler(node_id: bytes, msg: Message) -> Message:
        seen.append(msg)
        return await echo_handler(node_id, msg)

    server = hosts()
    server.set_handler(handler)
    port = await server.listen("127.0.0.1", 0)
    addr = PeerAddress(server.node_id, "127.0.0.1", port)
    client = hosts()
    assert await client.request(addr, Ping()) == Pong()
    (server_conn,) = server.connections_to(client.node_id)
    (client_conn,) = client.connections_to(server.node_id)
    assert server_conn.transport is not None and client_conn.transport is not None
    server_conn.transport.pause_reading()  # the server is busy elsewhere, say
    call = asyncio.ensure_future(client.request(addr, GetPiece(RID, 3)))
    await eventually(
        lambda: (
            client_conn.core.outstanding == 1
            and client_conn.transport is not None
            and client_conn.transport.get_write_buffer_size() == 0
        )
    )
    server_conn.close(ConnectionClosed("idle"))  # graceful: a goaway goes last
    reply = await asyncio.wait_for(call, 5)
    assert reply == PieceData(RID, 3, (3).to_bytes(4, "big") * 8)
    assert seen == [GetPiece(RID, 3)]  # handled once, on the new connection
    stats = client.stats()
    assert stats["goaways_received"] == 1 and stats["requests_resent_unread"] == 1
    assert stats["connections_dialed"] == 2
    assert server.stats()["goaways_sent"] == 1
    assert not client_conn.is_open


async def test_a_request_crossing_the_close_of_a_dial_back_is_sent_again(
    hosts: MakeHost,
) -> None:
    """AutoNAT's case: the server's dial-back is an ordinary inbound connection to
    the client, which sends its own next request over it just as the server,
    done, closes it. The request goes again over a connection of the client's."""
    server, server_addr = await serving(hosts)
    client, client_addr = await serving(hosts)
    dial_back = await server.dial_fresh(client_addr)  # exclusive, the server's alone
    (inbound,) = client.connections_to(server.node_id)  # the client may use it
    assert dial_back.transport is not None and inbound.transport is not None
    dial_back.transport.pause_reading()
    call = asyncio.ensure_future(client.request(server_addr, GetPiece(RID, 5)))
    await eventually(
        lambda: (
            inbound.core.outstanding == 1
            and inbound.transport is not None
            and inbound.transport.get_write_buffer_size() == 0
        )
    )
    dial_back.close(ConnectionClosed("dial-back done"))  # as nat/autonat.py does
    reply = await asyncio.wait_for(call, 5)
    assert reply == PieceData(RID, 5, (5).to_bytes(4, "big") * 8)
    stats = client.stats()
    assert stats["requests_resent_unread"] == 1 and stats["connections_dialed"] == 1


async def test_a_request_the_peer_read_is_not_sent_again(hosts: MakeHost) -> None:
    """The server closes gracefully while it handles the request: its goaway names
    it, so the request fails as before (it may have been acted on)."""
    started = asyncio.Event()
    calls = 0

    async def handler(node_id: bytes, msg: Message) -> Message:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.Event().wait()  # until cancelled by the close
        return Pong()

    server = hosts()
    server.set_handler(handler)
    port = await server.listen("127.0.0.1", 0)
    addr = PeerAddress(server.node_id, "127.0.0.1", port)
    client = hosts()
    call = asyncio.ensure_future(client.request(addr, GetHave(RID)))
    await asyncio.wait_for(started.wait(), 5)
    (server_conn,) = server.connections_to(client.node_id)
    server_conn.close(ConnectionClosed("closing"))
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(call, 5)
    assert not isinstance(info.value, ClosedUnread)
    assert calls == 1
    stats = client.stats()
    assert stats["goaways_received"] == 1 and stats.get("requests_resent_unread", 0) == 0
    assert stats["connections_dialed"] == 1


async def test_a_peer_that_always_claims_it_read_nothing_gets_a_request_twice(
    hosts: MakeHost,
) -> None:
    """A hostile server reads each request and answers it with a goaway that
    names none: the host sends the request once more, not again."""
    calls = 0

    async def liar(node_id: bytes, msg: Message) -> Message:
        nonlocal calls
        calls += 1
        conn = serving_conn.get()
        assert conn is not None
        conn._send_now(goaway())  # "I read nothing", with the request in hand
        await asyncio.Event().wait()  # until the connection goes
        return Pong()

    server = hosts()
    server.set_handler(liar)
    port = await server.listen("127.0.0.1", 0)
    addr = PeerAddress(server.node_id, "127.0.0.1", port)
    client = hosts()
    with pytest.raises(ClosedUnread):
        await client.request(addr, GetHave(RID), timeout=5)
    assert calls == 2
    stats = client.stats()
    assert stats["goaways_received"] == 2 and stats["requests_resent_unread"] == 1
    assert stats["connections_dialed"] == 2 and stats["connections_open"] == 0


async def test_request_timeout_cancels_it_at_the_peer(hosts: MakeHost) -> None:
    """A request that times out is cancelled (the mux's cancel): the peer's handler
    stops and no late answer comes."""
    release = asyncio.Event()
    stopped = asyncio.Event()

    async def slow(node_id: bytes, msg: Message) -> Message:
        try:
            await release.wait()
        except asyncio.CancelledError:
            stopped.set()
            raise
        return Have(RID, False, b"\x80")

    server = hosts()
    server.set_handler(slow)
    port = await server.listen("127.0.0.1", 0)
    client = hosts()
    addr = PeerAddress(server.node_id, "127.0.0.1", port)
    with pytest.raises(P2PTimeoutError, match=r"GetHave .* within 0\.1s"):
        await client.request(addr, GetHave(RID), timeout=0.1)
    assert client.stats()["request_timeouts"] == 1
    await asyncio.wait_for(stopped.wait(), 5)
    assert client.stats()["cancels_sent"] == 1 and server.stats()["cancels_received"] == 1
    await eventually(lambda: server.stats()["handlers_inflight"] == 0)
    release.set()
    assert await client.request(addr, Ping()) == Pong()  # (after anything sent before it)
    assert client.stats().get("unexpected_responses", 0) == 0
    assert client.stats().get("answers_after_cancel", 0) == 0


async def test_handler_failures_become_error_replies(hosts: MakeHost) -> None:
    async def broken(node_id: bytes, msg: Message) -> Message:
        if isinstance(msg, GetHave):
            raise RuntimeError("bug")
        if isinstance(msg, GetPiece):
            return Pong()  # wrong answer type for GetPiece
        return "not a message"  # type: ignore[return-value]

    server = hosts()
    server.set_handler(broken)
    port = await server.listen("127.0.0.1", 0)
    client = hosts()
    addr = PeerAddress(server.node_id, "127.0.0.1", port)
    with pytest.raises(RemoteError) as info:
        await client.request(addr, GetHave(RID))
    assert info.value.code == ErrorCode.INTERNAL
    with pytest.raises(ProtocolError, match="answered GetPiece with Pong"):
        await client.request(addr, GetPiece(RID, 0))
    with pytest.raises(RemoteError, match="internal"):
        await client.request(addr, GetManifest(RID))
    assert server.stats()["handler_errors"] == 2
    assert client.stats()["connections_dialed"] == 1


async def test_unknown_message_type_answered_unsupported(hosts: MakeHost) -> None:
    server, addr = await serving(hosts)
    client = hosts()
    client.registry = client.registry.copy()

    @message(4000, registry=client.registry)
    @dataclass(frozen=True, slots=True)
    class FutureThing(Message):
        note: str = wire(max_len=10)

    with pytest.raises(RemoteError) as info:
        await client.request(addr, FutureThing("hi"))
    assert info.value.code == ErrorCode.UNSUPPORTED
    assert await client.request(addr, Ping()) == Pong()
    assert server.stats()["unknown_messages"] == 1
    assert client.stats()["connections_dialed"] == 1


async def test_no_handler_set(hosts: MakeHost) -> None:
    server = hosts()
    port = await server.listen("127.0.0.1", 0)
    client = hosts()
    with pytest.raises(RemoteError, match="unsupported"):
        await client.request(PeerAddress(server.node_id, "127.0.0.1", port), GetHave(RID))


async def test_close_leaves_no_tasks(hosts: MakeHost) -> None:
    never = asyncio.Event()

    async def stuck(node_id: bytes, msg: Message) -> Message:
        await never.wait()
        return Pong()

    server = hosts()
    server.set_handler(stuck)
    port = await server.listen("127.0.0.1", 0)
    client = hosts()
    addr = PeerAddress(server.node_id, "127.0.0.1", port)
    calls = [asyncio.ensure_future(client.request(addr, GetHave(RID))) for _ in range(10)]
    await eventually(lambda: server.stats()["handlers_inflight"] == 10)
    await server.close()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, (ConnectionClosed, P2PError)) for r in results)
    await client.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert server.stats()["connections_open"] == 0
    assert client.stats()["connections_open"] == 0
    with pytest.raises(P2PError):
        await client.request(addr, Ping())


async def test_peer_that_does_not_read_is_dropped(hosts: MakeHost) -> None:
    limits = replace(FAST, write_buffer_high=1024, max_frame=16 * 1024)
    server, _, conn, _ = await _connected_not_reading(hosts, limits)
    assert conn.transport is not None
    # a peer flooding Pings without reading the Pongs (bypassing our own queueing)
    for i in range(20_000):
        if server.stats().get("closed_slow_reader"):
            break
        conn._send_now(request(i, Ping()))
        if i % 200 == 0:
            await asyncio.sleep(0)  # let the server run; not a synchronisation sleep
    await eventually(lambda: server.stats().get("closed_slow_reader", 0) == 1)
    await eventually(lambda: server.stats()["connections_open"] == 0)
    # the peer, once it reads again, sees the connection end
    conn.transport.resume_reading()
    await asyncio.wait_for(conn.closed, 5)


async def test_request_rate_limit_per_connection(hosts: MakeHost) -> None:
    clock = FakeClock()
    server = PeerHost(
        Identity.generate(), replace(FAST, request_rate=10.0, request_burst=20.0), clock
    )
    try:
        port = await server.listen("127.0.0.1", 0)
        addr = PeerAddress(server.node_id, "127.0.0.1", port)
        a, b = hosts(), hosts()
        results = await asyncio.gather(
            *(a.request(addr, Ping()) for _ in range(30)), return_exceptions=True
        )
        busy = [r for r in results if isinstance(r, RemoteError) and r.code == ErrorCode.BUSY]
        assert len(busy) == 10 and results.count(Pong()) == 20
        assert server.stats()["rate_limited"] == 10
        assert await b.request(addr, Ping()) == Pong()  # its own budget
        clock.advance(0.5)  # five more tokens for a
        results = await asyncio.gather(
            *(a.request(addr, Ping()) for _ in range(6)), return_exceptions=True
        )
        assert results.count(Pong()) == 5
    finally:
        await server.close()


async def test_quiet_connections_give_back_buffers(hosts: MakeHost) -> None:
    limits = replace(FAST, trim_after=0.1)
    data = os.urandom(600_000)

    async def big(node_id: bytes, msg: Message) -> Message:
        return ManifestData(RID, data)

    server = hosts(limits)
    server.set_handler(big)
    port = await server.listen("127.0.0.1", 0)
    client = hosts(limits)
    addr = PeerAddress(server.node_id, "127.0.0.1", port)
    assert await client.request(addr, GetManifest(RID)) == ManifestData(RID, data)
    (conn,) = client._by_peer[server.node_id]
    assert conn.session._chunks._scratch is not None
    await eventually(lambda: conn.session._chunks._scratch is None)
    assert conn.session._frames._pool == []
    assert await client.request(addr, GetManifest(RID)) == ManifestData(RID, data)


async def test_requesting_ourselves_is_a_usage_error(hosts: MakeHost) -> None:
    host = hosts()
    with pytest.raises(UsageError, match="this node"):
        await host.request(PeerAddress(host.node_id, "127.0.0.1", 1), Ping())


async def test_adopted_socket_pair_is_pooled_and_preferred_over_relayed(hosts: MakeHost) -> None:
    """``adopt`` runs the handshake over a socket connected elsewhere (a relay
    circuit, a punched hole): both ends pool it, requests flow both ways, and
    a later direct connection is picked before a relayed one."""
    a, b = hosts(), hosts()
    b.set_handler(echo_handler)
    a.set_handler(echo_handler)
    left, right = tcp_socket_pair()
    conn_a, conn_b = await asyncio.gather(
        a.adopt(left, initiator=True, expected=b.node_id, via="relayed"),
        b.adopt(right, initiator=False, expected=None, via="relayed"),
    )
    assert conn_a.remote_node_id == b.node_id and conn_b.remote_node_id == a.node_id
    assert conn_a.via == conn_b.via == "relayed"
    # the pooled connection is used: nothing listens at the addresses given
    reply = await a.request(PeerAddress(b.node_id, "192.0.2.1", 9), GetPiece(RID, 7))
    assert isinstance(reply, PieceData) and reply.index == 7
    back = await b.request(PeerAddress(a.node_id, "192.0.2.1", 9), GetPiece(RID, 8))
    assert isinstance(back, PieceData) and back.index == 8
    # a direct connection now wins the pool over the relayed one
    port = await b.listen("127.0.0.1", 0)
    direct = await a._dial(PeerAddress(b.node_id, "127.0.0.1", port))
    assert a._pooled(PeerAddress(b.node_id, "127.0.0.1", port)) is direct


async def test_adopt_with_the_wrong_expected_peer_fails(hosts: MakeHost) -> None:
    a, b = hosts(), hosts()
    left, right = tcp_socket_pair()
    results = await asyncio.gather(
        a.adopt(left, initiator=True, expected=Identity.generate().node_id, via="punched"),
        b.adopt(right, initiator=False, expected=None, via="punched"),
        return_exceptions=True,
    )
    assert isinstance(results[0], HandshakeError)
    assert isinstance(results[1], P2PError)


def tcp_socket_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on 127.0.0.1 (what a relay or a punch hands over)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        left = socket.create_connection(server.getsockname())
        right, _ = server.accept()
    left.setblocking(False)
    right.setblocking(False)
    return left, right


async def test_a_host_listening_on_one_address_dials_from_it(hosts: MakeHost) -> None:
    """Peers (and their AutoNAT dial-backs) must see the address a node serves
    at: bound to 127.0.0.2, its connections come from 127.0.0.2, not from the
    kernel's pick (127.0.0.1), where nothing of it listens."""
    if not can_bind("127.0.0.2", socket.SOCK_STREAM):
        pytest.skip("this machine cannot bind 127.0.0.2")
    a, b = hosts(), hosts()
    b.set_handler(echo_handler)
    await a.listen("127.0.0.2", 0)
    port = await b.listen("127.0.0.1", 0)
    await a.request(PeerAddress(b.node_id, "127.0.0.1", port), GetPiece(RID, 1))
    [conn] = b.connections_to(a.node_id)
    assert conn.peername[0] == "127.0.0.2"


class SilentListener:
    """Accepts TCP and never speaks: a dial to it hangs until its handshake
    timeout (a NATed or firewalled address that answers SYN and nothing else)."""

    def __init__(self) -> None:
        self.accepted = asyncio.Event()
        self.ended = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._silent, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _silent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.set()
        try:
            await reader.read()  # until the dialer gives up (it resets the connection)
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.ended.set()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def silent() -> AsyncIterator[SilentListener]:
    listener = SilentListener()
    await listener.start()
    yield listener
    await listener.stop()


async def test_a_hung_dial_is_overtaken_by_the_peers_connection(
    hosts: MakeHost, silent: SilentListener
) -> None:
    """A request waiting on a dial that hangs (the address accepts TCP, never
    speaks) takes the connection the peer opens to us meanwhile: the handshake
    proves the peer id, whichever side dialed. The hung dial, which nobody
    waits on any more, is cancelled."""
    a, b = hosts(), hosts()
    a.set_handler(echo_handler)
    b.set_handler(echo_handler)
    a_port = await a.listen("127.0.0.1", 0)
    assert silent.server is not None
    silent_port = silent.server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    hung = loop.create_task(a.request(PeerAddress(b.node_id, "127.0.0.1", silent_port), Ping()))
    await asyncio.wait_for(silent.accepted.wait(), 5)  # A's dial is in, and hangs
    started = loop.time()
    assert await b.request(PeerAddress(a.node_id, "127.0.0.1", a_port), Ping()) == Pong()
    assert await asyncio.wait_for(hung, FAST.handshake_timeout + 1) == Pong()
    took = loop.time() - started
    assert took < 1.0, f"the request waited {took:.2f}s for its dial"
    # it went over B's connection: A dialed nothing that succeeded
    [conn] = a.connections_to(b.node_id)
    assert conn.dialed is None
    stats = a.stats()
    assert stats.get("connections_dialed", 0) == 0
    assert stats["dials_overtaken"] == 1 and stats["dials_abandoned"] == 1
    await asyncio.wait_for(silent.ended.wait(), 5)  # the hung dial was cancelled
    assert not a._dials and not a._dial_waiters and not a._arrivals
    # later requests use the pool, also those naming the silent address
    reply = await a.request(PeerAddress(b.node_id, "127.0.0.1", silent_port), GetManifest(RID))
    assert reply == ManifestData(RID, a.node_id)


async def test_an_exclusive_connection_never_serves_a_waiting_request(
    hosts: MakeHost, silent: SilentListener
) -> None:
    """A ``dial_fresh`` connection (AutoNAT's dial-back) is its caller's alone:
    a request waiting on a hung dial to the same peer does not take it, and
    fails at its dial's handshake timeout although it was open all along."""
    limits = replace(FAST, handshake_timeout=0.5)
    a = hosts(limits)
    # exclusive from its first moment in the pool, not set after the dial
    # returns (a waiter woken by its handshake could run before that)
    exclusive_when_established: list[bool] = []
    a.on_established(lambda conn: exclusive_when_established.append(conn.exclusive))
    b, b_addr = await serving(hosts)
    assert silent.server is not None
    silent_port = silent.server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    hung = loop.create_task(a.request(PeerAddress(b.node_id, "127.0.0.1", silent_port), Ping()))
    await asyncio.wait_for(silent.accepted.wait(), 5)
    fresh = await a.dial_fresh(b_addr)
    assert fresh.exclusive and fresh.is_open
    assert exclusive_when_established == [True]
    assert await fresh.request(Ping(), timeout=5) == Pong()  # the loop turns meanwhile
    assert not hung.done()
    with pytest.raises(P2PTimeoutError, match="timed out"):
        await hung
    assert fresh.is_open
    assert a._pooled(b_addr) is None
    assert a.stats().get("dials_overtaken", 0) == 0
    assert not a._dial_waiters and not a._arrivals
    fresh.close(ConnectionClosed("done"))


async def test_a_request_by_address_alone_waits_for_its_dial(
    hosts: MakeHost, silent: SilentListener
) -> None:
    """Without a node id nothing proves that a connection the peer opens is the
    one at that address: such a request keeps waiting on its dial."""
    limits = replace(FAST, handshake_timeout=0.5)
    a = hosts(limits)
    a_port = await a.listen("127.0.0.1", 0)
    b = hosts()
    assert silent.server is not None
    silent_port = silent.server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    hung = loop.create_task(a.request(PeerAddress(None, "127.0.0.1", silent_port), Ping()))
    await asyncio.wait_for(silent.accepted.wait(), 5)
    await b.connect(PeerAddress(a.node_id, "127.0.0.1", a_port))
    with pytest.raises(P2PTimeoutError, match="timed out"):
        await hung
    assert a.stats().get("dials_overtaken", 0) == 0


async def test_a_request_that_gives_up_on_a_hung_dial_leaves_nothing_waiting(
    hosts: MakeHost, silent: SilentListener
) -> None:
    """The request's own time limit ends its wait, not the shared dial (others
    may join it); its entries in the waiter maps go with it."""
    a, b = hosts(), hosts()
    assert silent.server is not None
    silent_port = silent.server.sockets[0].getsockname()[1]
    where = PeerAddress(b.node_id, "127.0.0.1", silent_port)
    with pytest.raises(RequestTimeout):
        await a.request(where, Ping(), timeout=0.1)
    assert not a._dial_waiters and not a._arrivals
    assert len(a._dials) == 1  # the dial goes on, bounded by its handshake timeout
    with pytest.raises(RequestTimeout):
        await a.request(where, Ping(), timeout=0.1)
    assert a.stats()["request_timeouts"] == 2
    assert not a._dial_waiters and not a._arrivals


async def test_a_relayed_connection_serves_a_waiting_request_and_the_dial_goes_on(
    hosts: MakeHost, silent: SilentListener
) -> None:
    """A relayed connection the peer made serves a request waiting on a hung
    dial at once, but does not end the dial: a direct connection it made would
    still win the pool (the dial ends at its own handshake timeout here)."""
    limits = replace(FAST, handshake_timeout=1.0)
    a, b = hosts(limits), hosts()
    b.set_handler(echo_handler)
    assert silent.server is not None
    silent_port = silent.server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    hung = loop.create_task(
        a.request(PeerAddress(b.node_id, "127.0.0.1", silent_port), GetManifest(RID))
    )
    await asyncio.wait_for(silent.accepted.wait(), 5)
    left, right = tcp_socket_pair()
    await asyncio.gather(
        a.adopt(left, initiator=False, expected=None, via="relayed"),
        b.adopt(right, initiator=True, expected=a.node_id, via="relayed"),
    )
    assert await asyncio.wait_for(hung, 0.5) == ManifestData(RID, a.node_id)
    assert a.stats().get("dials_abandoned", 0) == 0
    assert len(a._dials) == 1 and not silent.ended.is_set()
    await asyncio.wait_for(silent.ended.wait(), 5)  # the dial timed out by itself
    await eventually(lambda: not a._dials)
    assert a.stats()["handshake_timeouts"] >= 1
    assert not a._dial_waiters and not a._arrivals


async def test_a_dial_cancelled_after_its_handshake_keeps_its_connection(hosts: MakeHost) -> None:
    """Once established a connection is pooled, and waiting requests may take
    it before its dial returns: cancelling the dial then (an overtaken dial
    abandoned an instant too late) must not abort it under them."""
    b, addr = await serving(hosts)
    a = hosts()

    def cancel_dials(conn: object) -> None:
        for task in a._dials.values():
            task.cancel()

    a.on_established(cancel_dials)
    assert await a.request(addr, GetPiece(RID, 3)) == PieceData(RID, 3, (3).to_bytes(4, "big") * 8)
    await eventually(lambda: not a._dials)
    [conn] = a.connections_to(b.node_id)
    assert conn.is_open and a.stats()["connections_dialed"] == 1
    assert await a.request(addr, Ping()) == Pong()
    assert a.connections_to(b.node_id) == [conn]


async def test_a_goaway_from_a_peer_that_does_not_read_leaves_no_zombie(hosts: MakeHost) -> None:
    """A peer's goaway ends the connection at once (found in review: it closed
    gracefully, so a peer that then neither reads nor closes held it, and its budget
    slot, for ever, and PeerHost.close() hung on it)."""
    limits = replace(STALLS, write_stall_timeout=60.0)  # not what ends it
    server, _, conn, served = await _peer_stops_reading(hosts, limits)
    conn._send_now(goaway())  # "I am closing" -- but it never closes, never reads
    try:
        await asyncio.wait_for(asyncio.shield(served.closed), 1.0)
        assert served not in server._conns
        await asyncio.wait_for(server.close(), 2.0)
    finally:
        assert conn.transport is not None
        conn.transport.resume_reading()


STALLS = replace(FAST, write_buffer_high=64 * 1024, max_frame=16 * 1024, write_stall_timeout=0.2)


async def _connected_not_reading(
    hosts: MakeHost, limits: NetLimits
) -> tuple[PeerHost, PeerHost, PeerConnection, PeerConnection]:
    """Server, client, the client's connection (its reading paused) and the server's
    side, with small kernel buffers so the server's transport buffer fills quickly."""
    server, addr = await serving(hosts, limits)
    client = hosts(limits)
    assert await client.request(addr, Ping()) == Pong()
    (conn,) = client._by_peer[server.node_id]
    (served,) = server._by_peer[client.node_id]
    assert conn.transport is not None and served.transport is not None
    served.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.transport.pause_reading()
    return server, client, conn, served


async def _peer_stops_reading(
    hosts: MakeHost, limits: NetLimits
) -> tuple[PeerHost, PeerHost, PeerConnection, PeerConnection]:
    """A client connection whose reading stopped, and the server's side of it with
    bytes stuck in its write buffer."""
    server, client, conn, served = await _connected_not_reading(hosts, limits)
    assert conn.transport is not None and served.transport is not None
    for i in range(20_000):
        if served.transport.get_write_buffer_size() > 0:
            break
        conn._send_now(request(i, Ping()))
        if i % 50 == 0:
            await asyncio.sleep(0)
    await eventually(lambda: served.transport.get_write_buffer_size() > 0)
    return server, client, conn, served


async def test_our_graceful_close_ends_even_if_the_peer_stops_reading(hosts: MakeHost) -> None:
    """A graceful close waits for the write buffer to drain; a peer that does not
    read is reset after write_stall_timeout rather than held for ever."""
    server, _, conn, served = await _peer_stops_reading(hosts, STALLS)
    served.close(ConnectionClosed("closing in good order"))
    try:
        await asyncio.wait_for(asyncio.shield(served.closed), 5 * STALLS.write_stall_timeout)
        assert served not in server._conns
    finally:
        assert conn.transport is not None
        conn.transport.resume_reading()


async def test_a_request_under_way_when_a_limit_ends_its_connection_sees_it_closed(
    hosts: MakeHost,
) -> None:
    """A limit that ends a connection (here as our slow-reader rule would) came after
    the request left, which the peer may have run: its caller gets ConnectionClosed,
    not the LimitExceeded that means "our own limit, before sending" (found in review:
    services took it as safe to send a non-idempotent call elsewhere)."""
    started = asyncio.Event()

    async def hang(node_id: bytes, msg: Message) -> Message:
        started.set()
        await asyncio.Event().wait()
        return Pong()

    server = hosts()
    server.set_handler(hang)
    port = await server.listen("127.0.0.1", 0)
    client = hosts()
    pending = asyncio.create_task(
        client.request(PeerAddress(server.node_id, "127.0.0.1", port), GetHave(RID), timeout=5)
    )
    await asyncio.wait_for(started.wait(), 5)
    (conn,) = client._by_peer[server.node_id]
    conn.close(LimitExceeded(f"{conn.core.name} read nothing of our answers"), abort=True)
    with pytest.raises(ConnectionClosed, match="read nothing") as raised:
        await pending
    assert not isinstance(raised.value, LimitExceeded)
    assert isinstance(raised.value.__cause__, LimitExceeded)
