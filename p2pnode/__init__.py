"""p2pnode: a peer-to-peer node with Kademlia discovery and verified exchange."""

from p2pnode.config import NodeConfig

__version__ = "0.1.0"
__all__ = ["Node", "NodeConfig", "__version__"]


def __getattr__(name: str) -> object:
    # Node pulls in the whole stack; import it lazily so `p2pnode.config` stays light.
    if name == "Node":
        from p2pnode.node import Node

        return Node
    raise AttributeError(name)
