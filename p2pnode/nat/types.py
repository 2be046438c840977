"""The words the NAT parts share."""

from __future__ import annotations

import enum


class Reachability(enum.StrEnum):
    """Whether other machines can open connections to this node.

    ``public``: dial-backs (or a working port mapping) confirmed it; the node
    serves the DHT and is dialed directly. ``private``: dial-backs failed; the
    node is a DHT client, reserves relay slots and is reached through them.
    ``unknown``: not enough evidence yet (acts as public, like libp2p).
    """

    PUBLIC = "public"
    PRIVATE = "private"
    UNKNOWN = "unknown"


class Via(enum.StrEnum):
    """How a peer connection was made (``PeerConnection.via``)."""

    DIRECT = "direct"
    RELAYED = "relayed"
    PUNCHED = "punched"
