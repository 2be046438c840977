"""The simultaneous-open primitive: a TCP connect *from our listening port*.

A hole punch only works if the peer's SYN hits the mapping our NAT made for
the address the peer knows, i.e. our public IP and our *listening* port (a
port-keeping NAT maps both to the same public port). So the connecting socket
binds the listening port with SO_REUSEADDR + SO_REUSEPORT (the listener was
bound with SO_REUSEPORT too: ``p2pnode.endpoints.bind_listeners``). A bound
socket that never listens does not join the listener's reuse-port group:
new inbound connections still go to the listener, while a SYN from the very
address we are connecting to finds our socket in SYN-SENT and completes a
simultaneous open.

Bounded: ``TCP_SYNCNT`` caps the kernel's SYN retransmissions, the whole try
has a deadline, and a refused connect (the peer's router answered RST before
its own SYN left) is retried a few times after a pause, never in a tight loop.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from p2pnode.endpoints import SocketFactory
from p2pnode.errors import HolePunchFailed

__all__ = ["PunchSettings", "punch_any", "punch_connect"]

# Why a punch failed, from the most telling to the least (punch_any reports the
# most telling of its targets' reasons).
REASON_ORDER = ("address_in_use", "refused", "unreachable", "timeout")


@dataclass(frozen=True)
class PunchSettings:
    timeout: float = 5.0
    """Deadline of one punch (all targets, all retries)."""
    syn_retries: int = 2
    """TCP_SYNCNT: SYN retransmissions before the kernel gives up (1 s, 3 s, ...)."""
    refused_retries: int = 3
    """Connects tried again after an RST, each after ``retry_delay``."""
    retry_delay: float = 0.2


async def punch_connect(
    local: tuple[str, int],
    remote: tuple[str, int],
    settings: PunchSettings = PunchSettings(),
    *,
    make_socket: SocketFactory = socket.socket,
) -> socket.socket:
    """A non-blocking TCP socket bound to ``local`` and connected to ``remote``
    (ordinarily or by simultaneous open). Raises :class:`HolePunchFailed` with
    a reason from :data:`REASON_ORDER`."""
    try:
        async with asyncio.timeout(settings.timeout):
            return await _connect_with_retries(local, remote, settings, make_socket)
    except TimeoutError:
        raise HolePunchFailed("timeout", f"no answer from {remote[0]}:{remote[1]}") from None


async def punch_any(
    local: tuple[str, int],
    remotes: Sequence[tuple[str, int]],
    settings: PunchSettings = PunchSettings(),
    *,
    make_socket: SocketFactory = socket.socket,
) -> socket.socket:
    """Punch to every address in ``remotes`` at once; the first connected socket
    wins and the others are closed."""
    if not remotes:
        raise HolePunchFailed("no_address", "no address to punch to")
    tasks = [
        asyncio.ensure_future(punch_connect(local, r, settings, make_socket=make_socket))
        for r in remotes
    ]
    reasons: list[str] = []
    winner: socket.socket | None = None
    try:
        for next_done in asyncio.as_completed(tasks):
            try:
                winner = await next_done
            except HolePunchFailed as exc:
                reasons.append(exc.reason)
                continue
            break
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:  # a loser that connected too
            if isinstance(result, socket.socket) and result is not winner:
                result.close()
    if winner is not None:
        return winner
    reason = min(reasons, key=REASON_ORDER.index)
    raise HolePunchFailed(reason, f"punch to {len(remotes)} address(es) failed: {reason}")


async def _connect_with_retries(
    local: tuple[str, int],
    remote: tuple[str, int],
    settings: PunchSettings,
    make_socket: SocketFactory,
) -> socket.socket:
    loop = asyncio.get_running_loop()
    for tried in range(settings.refused_retries + 1):
        sock = _bound_socket(local, remote, settings, make_socket)
        try:
            await loop.sock_connect(sock, remote)
        except ConnectionRefusedError:
            sock.close()
            if tried == settings.refused_retries:
                raise HolePunchFailed("refused", f"{remote[0]}:{remote[1]} refused") from None
            await asyncio.sleep(settings.retry_delay)  # not a tight loop
            continue
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
                # the 4-tuple is taken: the peer's SYN reached our listener first
                raise HolePunchFailed("address_in_use", str(exc)) from None
            raise HolePunchFailed("unreachable", exc.strerror or str(exc)) from None
        except BaseException:
            sock.close()
            raise
        return sock
    raise AssertionError("unreachable")  # pragma: no cover


def _bound_socket(
    local: tuple[str, int],
    remote: tuple[str, int],
    settings: PunchSettings,
    make_socket: SocketFactory,
) -> socket.socket:
    family = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
    sock = make_socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, max(1, settings.syn_retries))
        sock.bind((_local_host(local[0], family), local[1]))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise HolePunchFailed("address_in_use", str(exc)) from None
        raise HolePunchFailed("unreachable", exc.strerror or str(exc)) from None
    return sock


def _local_host(host: str, family: int) -> str:
    """The address to bind for a target of ``family``: ``host`` if it is of that
    family, else the wildcard (a dual-stack "::" listener shares its port with an
    IPv4 punch socket on 0.0.0.0, both SO_REUSEPORT)."""
    is_v6 = ":" in host
    if family == socket.AF_INET6:
        return host if is_v6 else "::"
    return host if host and not is_v6 else "0.0.0.0"
