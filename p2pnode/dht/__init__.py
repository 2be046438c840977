"""The Kademlia DHT (wire compatible with kademlia 2.2.3): pure cores under a thin
asyncio shell.

Pure parts (no asyncio, no I/O): :mod:`.codec` (datagrams), :mod:`.rpc_schema`
(arguments and answers), :mod:`.storage` (values, provider records), :mod:`.table`
(k-buckets), :mod:`.core` (the protocol: datagrams and a time in; datagrams,
events and a deadline out). The asyncio shell: :mod:`.protocol` (moves datagrams
and arms one timer for the core), :mod:`.lookup` (iterative lookups) and
:mod:`.discovery` (the facade the rest of p2pnode uses).

Importing this package loads only the config: ``Discovery``, ``Contact`` and
``ProviderRecord`` are imported on first use, so ``p2pnode.dht.codec`` and the
other pure modules do not pull in asyncio and the lookup machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from p2pnode.dht.config import DhtConfig

if TYPE_CHECKING:
    from p2pnode.dht.discovery import Contact, Discovery, ProviderRecord

__all__ = ["Contact", "DhtConfig", "Discovery", "ProviderRecord"]


def __getattr__(name: str) -> object:
    # Lazy, like p2pnode.Node: the facade pulls in asyncio and kademlia.
    if name in ("Contact", "Discovery", "ProviderRecord"):
        from p2pnode.dht import discovery

        return getattr(discovery, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
