"""The Kademlia DHT: a typed, hardened facade over ``kademlia.network.Server``.

Pure parts (no asyncio): :mod:`.codec` (datagrams), :mod:`.rpc_schema` (arguments
and answers), :mod:`.storage` (values, provider records), :mod:`.ratelimit`. The
asyncio shell: :mod:`.protocol` (kademlia's protocol subclassed), :mod:`.lookup`
and :mod:`.discovery` (the facade the rest of p2pnode uses).
"""

from p2pnode.dht.config import DhtConfig
from p2pnode.dht.discovery import Contact, Discovery, ProviderRecord

__all__ = ["Contact", "DhtConfig", "Discovery", "ProviderRecord"]
