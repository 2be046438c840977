"""Requests from peers to the part that owns their message type.

``PeerHost`` has one request handler; :func:`routes_of` installs a
:class:`RequestRoutes` as that handler (once) and each feature (the exchange,
the services) routes its own request types to itself. Routing is one dict
lookup by type, and the route's coroutine is returned as is (no extra frame on
the piece path). A type nobody routes is answered ``unsupported``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING

from p2pnode.net.connection import Handler
from p2pnode.wire.messages import ErrorCode, ErrorReply, Message

if TYPE_CHECKING:
    from p2pnode.net.host import PeerHost

__all__ = ["RequestRoutes", "routes_of"]


class RequestRoutes:
    def __init__(self) -> None:
        self._routes: dict[type[Message], Handler] = {}

    def route(self, types: Iterable[type[Message]], handler: Handler) -> None:
        for cls in types:
            self._routes[cls] = handler

    def unroute(self, types: Iterable[type[Message]]) -> None:
        for cls in types:
            self._routes.pop(cls, None)

    def __call__(self, remote: bytes, msg: Message) -> Awaitable[Message]:
        handler = self._routes.get(type(msg))
        if handler is None:
            return _unsupported(msg)
        return handler(remote, msg)


async def _unsupported(msg: Message) -> Message:
    return ErrorReply(ErrorCode.UNSUPPORTED, f"{type(msg).__name__} is not handled here")


def routes_of(host: PeerHost) -> RequestRoutes:
    """The host's request routes, installed as its handler if they are not yet."""
    current = host.handler()
    if isinstance(current, RequestRoutes):
        return current
    routes = RequestRoutes()
    host.set_handler(routes)
    return routes
