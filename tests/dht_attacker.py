"""An attacker's DHT tools, shared by the hostile tests and ``bench_hostile``'s DHT
rows: hand-made datagrams, datagrams with a forged IPv4 source, Sybil sockets that
answer every RPC with lies, and keys ground to sit next to a target key.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from typing import Any

import msgpack  # type: ignore[import-untyped,unused-ignore]

from p2pnode.dht import proof
from p2pnode.identity import Identity


def dht_datagram(name: str, *args: object, msg_id: bytes | None = None) -> bytes:
    """A kademlia request datagram (rpcudp framing), made by hand."""
    packed = msgpack.packb([name, list(args)], use_bin_type=True)
    return b"\x00" + (msg_id or os.urandom(20)) + packed


def raw_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 + UDP datagram from ``src``, whatever our address (checksum 0: none)."""
    length = 8 + len(payload)
    udp = struct.pack("!HHHH", src[1], dst[1], length, 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + length,
        int.from_bytes(os.urandom(2), "big"),
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(src[0]),
        socket.inet_aton(dst[0]),
    )
    return header + udp


def raw_socket() -> socket.socket | None:
    """A raw socket to forge source addresses with, if we may (root, CAP_NET_RAW)."""
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError:
        return None


def grind(target: bytes, bits: int) -> Identity:
    """A real key pair whose id shares ``bits`` leading bits with ``target``
    (2**bits tries of ~70 µs expected; bounded at 256 times that)."""
    want = int.from_bytes(target, "big") >> (160 - bits)
    for _ in range(1 << (bits + 8)):
        identity = Identity.generate()
        if int.from_bytes(identity.node_id, "big") >> (160 - bits) == want:
            return identity
    raise RuntimeError(f"no key sharing {bits} bits with the target found")


class Sybil(asyncio.DatagramProtocol):
    """One of many sockets on one IP with an id next to the target, answering every
    RPC: closer nodes are its fellows, values are forged, writes are "accepted" and
    dropped. With an ``identity`` it proves its (ground) id; without, it answers
    identify with garbage (it cannot sign for an id it does not own)."""

    def __init__(self, node_id: bytes, identity: Identity | None, forged: list[object]) -> None:
        self.node_id = node_id
        self.identity = identity
        self.forged = forged
        self.fellows: list[list[object]] = []
        self.transport: Any = None
        self.requests = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error of an earlier answer: nothing to do

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data[:1] != b"\x00":
            return
        self.requests += 1
        try:
            name, args = msgpack.unpackb(data[21:])
        except (ValueError, TypeError, msgpack.ExtraData):
            return
        answer: object
        if name == "ping":
            answer = self.node_id
        elif name == "identify":
            if self.identity is None:
                answer = [os.urandom(32), os.urandom(64), os.urandom(8), addr[0]]
            else:
                signature = proof.prove(self.identity, args[0], args[1])
                answer = [self.identity.public_key, signature, os.urandom(8), addr[0]]
        elif name == "find_value":
            answer = {"value": self.forged[self.requests % len(self.forged)]}
        elif name == "get_providers":
            answer = {"providers": [], "nodes": self.fellows, "token": os.urandom(8)}
        elif name in ("store", "add_provider"):
            answer = True
        else:
            answer = self.fellows
        reply = b"\x01" + data[1:21] + msgpack.packb(answer, use_bin_type=True)
        self.transport.sendto(reply, addr)
