"""The virtual-time loop and the in-memory network, without nodes: pure, fast."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from p2pnode.sim import vloop
from p2pnode.sim.vnet import LinkModel, VirtualNetwork, address


class Collect(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.transport: Any = None
        self.lost: list[BaseException | None] = []
        self.paused = 0
        self.resumed = 0
        self._buf = bytearray(7)  # small on purpose: deliveries span several buffers

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self._buf[:nbytes]

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)


def test_sleeping_costs_no_real_time() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.sleep(3600)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.sleep(10)
        return loop.time() - t0

    wall = time.perf_counter()
    assert vloop.run(main) == pytest.approx(3605)
    assert time.perf_counter() - wall < 1.0


def test_a_deadlock_is_an_error_not_a_hang() -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(vloop.VirtualTimeDeadlock):
        vloop.run(main)


def test_addresses_are_shared_space_one_per_subnet_first() -> None:
    assert address(0) == "100.64.0.1"
    assert address(1) == "100.64.1.1"
    assert address(1 << 14) == "100.64.0.2"
    assert len({address(i) for i in range(50_000)}) == 50_000


def test_stream_delivers_in_order_with_jitter_and_flow_control() -> None:
    async def main() -> tuple[bytes, Collect, Collect, float]:
        loop = asyncio.get_running_loop()
        net = VirtualNetwork(loop, LinkModel(latency=0.01, jitter=0.05, bandwidth=1e6), seed=3)
        a, b = net.host(0), net.host(1)
        server_side: list[Collect] = []

        def accept() -> Collect:
            server_side.append(Collect())
            return server_side[-1]

        await b.server(accept, b.ip, 4001)
        client = Collect()
        t0 = loop.time()
        await a.connect(lambda: client, b.ip, 4001)
        connected = loop.time() - t0
        client.transport.set_write_buffer_limits(high=1000)
        payload = bytes(range(256)) * 40
        for i in range(0, len(payload), 100):
            client.transport.write(payload[i : i + 100])
        assert client.paused == 1
        assert client.transport.get_extra_info("socket") is None
        assert client.transport.get_extra_info("peername") == (b.ip, 4001)
        await asyncio.sleep(5)  # virtual: far more than 10 KB at 1 MB/s needs, for free
        client.transport.close()
        await asyncio.sleep(1)
        return bytes(server_side[0].data), client, server_side[0], connected

    data, client, server, connected = vloop.run(main)
    assert data == bytes(range(256)) * 40
    assert client.resumed == 1
    assert client.lost == [None] and server.lost == [None]
    assert connected >= 0.02  # a round trip


def test_refused_unknown_and_reset() -> None:
    async def main() -> tuple[type[BaseException], list[BaseException | None]]:
        loop = asyncio.get_running_loop()
        net = VirtualNetwork(loop, LinkModel(latency=0.01), seed=1)
        a, b = net.host(0), net.host(1)
        try:
            await a.connect(Collect, b.ip, 4001)
        except OSError as exc:
            refused = type(exc)
        server = Collect()
        await b.server(lambda: server, b.ip, 4001)
        client = Collect()
        await a.connect(lambda: client, b.ip, 4001)
        b.crash()  # the process dies: its kernel resets the connection
        await asyncio.sleep(1)
        return refused, client.lost

    refused, lost = vloop.run(main)
    assert refused is ConnectionRefusedError
    assert len(lost) == 1 and isinstance(lost[0], ConnectionResetError)


def test_datagrams_lost_and_delayed_the_same_way_for_one_seed() -> None:
    def trial(seed: int) -> list[tuple[float, bytes]]:
        async def main() -> list[tuple[float, bytes]]:
            loop = asyncio.get_running_loop()
            net = VirtualNetwork(loop, LinkModel(latency=0.02, jitter=0.03, loss=0.3), seed)
            got: list[tuple[float, bytes]] = []

            class Sink(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: Any) -> None:
                    got.append((round(loop.time(), 9), data))

            b = net.host(1)
            await b.datagram_endpoint(Sink, b.ip, 4001)
            sender, _ = await net.host(0).datagram_endpoint(asyncio.DatagramProtocol, "0.0.0.0", 0)
            for i in range(200):
                sender.sendto(i.to_bytes(2, "big"), (b.ip, 4001))
            sender.sendto(b"nobody", ("100.127.0.1", 9))  # vanishes
            await asyncio.sleep(1)
            return got

        return vloop.run(main)

    first = trial(5)
    assert first == trial(5)
    assert first != trial(6)
    assert 100 < len(first) < 180  # ~30% lost
    assert [d for _, d in first] != sorted(d for _, d in first)  # jitter reorders datagrams
