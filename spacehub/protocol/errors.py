"""The protocols' exception root (import-free: the Python runner loads it in every instance)::

SpacehubError
└── ProtocolError                   bytes a protocol does not allow
    ├── runner.ProtocolError        the runner's control channel (same class)
    └── link.LinkError (status)     the link's framing
        ├── LinkProtocolError (502) the peer broke the protocol
        └── LocalProtocolError (500) we asked to send something not allowed
"""

from __future__ import annotations

from spacehub.errors import SpacehubError

__all__ = ["ProtocolError"]


class ProtocolError(SpacehubError):
    """The peer sent something this protocol does not allow."""
