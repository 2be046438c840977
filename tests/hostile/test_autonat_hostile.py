"""Attacks on AutoNAT (p2pnode/nat/autonat.py), real nodes on loopback: a server
that lies about a dial-back, a server that answers over the connection we opened,
a request that would aim the dial-back elsewhere, a dial-back flood and dial-backs
held open."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest

from p2pnode import Node
from p2pnode.errors import MessageDecodeError
from p2pnode.identity import Identity
from p2pnode.nat.autonat import SENT, DialBack, DialBackRequest, DialBackResponse
from p2pnode.nat.reachability import AutoNatConfig
from p2pnode.nat.types import Reachability
from p2pnode.net.config import NetLimits
from p2pnode.net.connection import serving
from p2pnode.net.dispatch import routes_of
from p2pnode.net.host import PeerAddress, PeerHost
from p2pnode.wire.messages import Message, decode_envelope
from tests.helpers import can_bind, eventually, fast_config


@pytest.fixture
async def started(homes: Callable[[str], Path]) -> AsyncIterator[Callable[..., object]]:
    nodes: list[Node] = []

    async def start(name: str, **kw: object) -> Node:
        node = Node(fast_config(homes(name), **kw))
        await node.start()
        nodes.append(node)
        return node

    yield start  # type: ignore[misc]
    for node in reversed(nodes):
        await node.stop()


async def _client_of(start: Callable[..., object], liar: Node) -> Node:
    client = await start("client", bootstrap=(("127.0.0.1", liar.port),))  # type: ignore[misc]
    assert isinstance(client, Node)
    await client.wait_joined(timeout=10)
    return client


async def test_a_server_claiming_success_without_dialing_does_not_make_us_public(
    started: Callable[..., object],
) -> None:
    liar = await started("liar")  # type: ignore[misc]
    assert isinstance(liar, Node)

    async def claim(remote: bytes, msg: Message) -> Message:
        return DialBackResponse("ok", SENT, "127.0.0.1")  # never dials

    routes_of(liar.peer_host).route([DialBackRequest], claim)
    client = await _client_of(started, liar)
    nat = lambda: client.status()["nat"]  # noqa: E731
    await eventually(lambda: nat()["claimed_unverified"] >= 1, what="a lying answer")
    await eventually(lambda: nat()["probe_udp_failure"] >= 1, what="the datagram never came")
    assert client.reachability.tcp is Reachability.UNKNOWN
    assert client.reachability.udp is not Reachability.PUBLIC
    assert nat()["probe_tcp_success"] == 0 and nat()["probe_udp_success"] == 0


async def test_a_nonce_sent_over_the_connection_we_opened_does_not_count(
    started: Callable[..., object],
) -> None:
    """The dial-back must come on a new inbound connection: a server behind its
    own firewall cannot prove our reachability with the connection we dialed."""
    liar = await started("liar")  # type: ignore[misc]
    assert isinstance(liar, Node)

    async def reuse(remote: bytes, msg: Message) -> Message:
        assert isinstance(msg, DialBackRequest)
        conn = serving.get()
        assert conn is not None
        await conn.request(DialBack(msg.nonce))  # over the pooled connection
        return DialBackResponse("ok", "skipped", "127.0.0.1")

    routes_of(liar.peer_host).route([DialBackRequest], reuse)
    client = await _client_of(started, liar)
    nat = lambda: client.status()["nat"]  # noqa: E731
    await eventually(lambda: nat()["nonce_wrong_connection"] >= 1, what="the reused connection")
    await eventually(lambda: nat()["claimed_unverified"] >= 1, what="its claim weighed")
    assert client.reachability.tcp is Reachability.UNKNOWN
    assert nat()["probe_tcp_success"] == 0


def test_a_dial_back_request_cannot_name_an_address() -> None:
    """No field of the request holds an address (the server dials the IP the
    request came from): one with an extra field, an IP, does not even decode."""
    fields = [f.name for f in DialBackRequest.WIRE_FIELDS]
    assert fields == ["nonce", "tcp_port", "udp_port"]
    good = msgpack.packb([0, 1, 64, os.urandom(16), 4001, 4001])
    assert isinstance(decode_envelope(good).message, DialBackRequest)
    wire = msgpack.packb([0, 1, 64, os.urandom(16), 4001, 4001, "198.51.100.7"])
    with pytest.raises(MessageDecodeError):
        decode_envelope(wire)


@pytest.mark.skipif(not can_bind("127.0.0.2", socket.SOCK_STREAM), reason="no 127.0.0.2")
async def test_the_server_dials_only_the_ip_the_request_came_from(
    started: Callable[..., object], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await started("server")  # type: ignore[misc]
    assert isinstance(server, Node)
    dialed: list[PeerAddress] = []
    real = server.peer_host.dial_fresh

    async def spy(peer: PeerAddress) -> object:
        dialed.append(peer)
        return await real(peer)

    monkeypatch.setattr(server.peer_host, "dial_fresh", spy)
    client = await started(  # type: ignore[misc]
        "client", host="127.0.0.2", bootstrap=(("127.0.0.1", server.port),)
    )
    assert isinstance(client, Node)
    await eventually(lambda: bool(dialed), what="a dial-back")
    # The client listens on 127.0.0.2 and its connections leave from there: the
    # server dials that source IP (the request names only ports: nothing in it
    # can point the dial-back anywhere else), and the client turns public.
    assert {(p.host, p.node_id) for p in dialed} == {("127.0.0.2", client.node_id)}
    await eventually(
        lambda: client.reachability.tcp is Reachability.PUBLIC, what="the client public"
    )


async def test_dial_back_floods_are_refused_and_counted(started: Callable[..., object]) -> None:
    server = await started("server", autonat=AutoNatConfig(enabled=False))  # type: ignore[misc]
    assert isinstance(server, Node)
    attacker = PeerHost(Identity.generate(), NetLimits())
    try:
        target = PeerAddress(server.node_id, "127.0.0.1", server.port)
        answers = []
        for _ in range(20):
            request = DialBackRequest(os.urandom(16), 0, 9)  # UDP to the discard port
            answers.append(await attacker.request(target, request, timeout=10))
        served = [a for a in answers if isinstance(a, DialBackResponse) and a.udp == SENT]
        refused = [a for a in answers if isinstance(a, DialBackResponse) and a.udp == "refused"]
        limit = server.config.autonat.max_per_ip
        assert len(served) == limit and len(refused) == 20 - limit
        nat = server.status()["nat"]
        assert nat["refused_rate"] == 20 - limit
        assert nat["dial_backs_served"] == limit
    finally:
        await attacker.close()


async def test_concurrent_dial_backs_are_capped_and_counted(
    started: Callable[..., object],
) -> None:
    """Requests that hold a dial-back open (a port that accepts and never speaks)
    fill max_concurrent; more at once are refused and counted, not queued."""
    quiet = AutoNatConfig(enabled=False, max_concurrent=2, max_per_ip=100, dial_timeout=2.0)
    server = await started("server", autonat=quiet)  # type: ignore[misc]
    assert isinstance(server, Node)
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    attacker = PeerHost(Identity.generate(), NetLimits())
    try:
        target = PeerAddress(server.node_id, "127.0.0.1", server.port)
        answers = await asyncio.gather(
            *(
                attacker.request(target, DialBackRequest(os.urandom(16), port, 0), timeout=10)
                for _ in range(6)
            )
        )
        tcp = sorted(a.tcp for a in answers if isinstance(a, DialBackResponse))
        assert tcp == ["failed"] * 2 + ["refused"] * 4, tcp
        assert server.status()["nat"]["refused_concurrency"] == 4
    finally:
        await attacker.close()
        silent.close()
        await silent.wait_closed()
