"""The Python client of the hub, Space and manager APIs, sync and async.

::

    HubClient ─┬─ SequenceClient ── start() → InstanceClient
               └─ InstanceClient (input, stdin, output, stdout, stderr, log, events, stop, kill, health)
    ManagerClient ── space(name) → SpaceClient ── hub(id) → HubClient (through the tunnel)

``Async*`` are the same over ``httpx.AsyncClient`` (Trio or asyncio). Errors: :mod:`.errors`.
Packing a directory by hand: :func:`spacehub.client.pack.pack`.
"""

from .aio import AsyncHubClient, AsyncInstanceClient, AsyncResponseStream, AsyncSequenceClient
from .errors import (
    ApiError,
    BadRequest,
    ClientError,
    Conflict,
    ConnectionFailed,
    Forbidden,
    Gone,
    MethodNotAllowed,
    NotFound,
    PackageError,
    PayloadTooLarge,
    ServerError,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)
from .hub import HubClient, InstanceClient, ResponseStream, SequenceClient
from .pack import IgnoreRules
from .space import AsyncManagerClient, AsyncSpaceClient, ManagerClient, SpaceClient

__all__ = [
    "ApiError",
    "AsyncHubClient",
    "AsyncInstanceClient",
    "AsyncManagerClient",
    "AsyncResponseStream",
    "AsyncSequenceClient",
    "AsyncSpaceClient",
    "BadRequest",
    "ClientError",
    "Conflict",
    "ConnectionFailed",
    "Forbidden",
    "Gone",
    "HubClient",
    "IgnoreRules",
    "InstanceClient",
    "ManagerClient",
    "MethodNotAllowed",
    "NotFound",
    "PackageError",
    "PayloadTooLarge",
    "ResponseStream",
    "SequenceClient",
    "ServerError",
    "SpaceClient",
    "Unauthorized",
    "Unprocessable",
    "UnsupportedMediaType",
]
