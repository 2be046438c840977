"""Services between peers: serve a named handler, find it through the DHT, call it.

``Node.serve``/``serve_stream``/``unserve``/``services``/``call``/``call_stream``/
``find_service`` delegate to :class:`~p2pnode.services.service.Services`; the
state and limits are in ``core.py`` (pure), the wire messages in ``messages.py``.
"""

from p2pnode.services.core import NodeServiceLimits, ServiceLimits
from p2pnode.services.names import service_key, validate_service_name
from p2pnode.services.service import CallContext, Services, StreamHandler, UnaryHandler

__all__ = [
    "CallContext",
    "NodeServiceLimits",
    "ServiceLimits",
    "Services",
    "StreamHandler",
    "UnaryHandler",
    "service_key",
    "validate_service_name",
]
