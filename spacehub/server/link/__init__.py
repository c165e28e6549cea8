"""The link's Trio shell, shared by the hub and the manager.

:class:`LinkSession` runs a :class:`~spacehub.protocol.link.LinkConnection` over a
:class:`MessageTransport` (one websocket); :func:`serve_asgi` answers a stream with an
ASGI app. See ``docs/link.md``.
"""

from .asgi import REFUSED_REASON, ASGIApp, WebsocketsTransport, serve_asgi
from .session import (
    CONTROL_QUEUE,
    InboundStream,
    LinkClosed,
    LinkSession,
    MemoryTransport,
    MessageTransport,
    OutboundStream,
    StreamAborted,
    memory_transport_pair,
)

__all__ = [
    "CONTROL_QUEUE",
    "REFUSED_REASON",
    "ASGIApp",
    "InboundStream",
    "LinkClosed",
    "LinkSession",
    "MemoryTransport",
    "MessageTransport",
    "OutboundStream",
    "StreamAborted",
    "WebsocketsTransport",
    "memory_transport_pair",
    "serve_asgi",
]
