"""Spacehub: the client library and the wire formats every side shares.

Kept import-light on purpose: the Python runner imports ``spacehub.protocol`` inside
every instance, so nothing heavy (httpx, trio) may be imported here. The client's names
(``from spacehub import HubClient``) are loaded on first use by ``__getattr__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


def build() -> str:
    """Which build this is: ``$SPACEHUB_BUILD``, else the stamp a package build wrote
    (``spacehub/_build.py``: version, commit, date), else ``source`` (a checkout)."""
    import os

    override = os.environ.get("SPACEHUB_BUILD")
    if override:
        return override
    try:
        from ._build import BUILD  # type: ignore[import-not-found]
    except ImportError:
        return "source"
    return str(BUILD)


#: Names re-exported from ``spacehub.client``, imported only when first asked for.
_CLIENT_NAMES = frozenset(
    {
        "ApiError",
        "AsyncHubClient",
        "AsyncInstanceClient",
        "AsyncManagerClient",
        "AsyncSequenceClient",
        "AsyncSpaceClient",
        "BadRequest",
        "ClientError",
        "Conflict",
        "ConnectionFailed",
        "Forbidden",
        "Gone",
        "HubClient",
        "InstanceClient",
        "ManagerClient",
        "NotFound",
        "PackageError",
        "SequenceClient",
        "ServerError",
        "SpaceClient",
    }
)

if TYPE_CHECKING:
    from .client import ApiError as ApiError
    from .client import AsyncHubClient as AsyncHubClient
    from .client import AsyncInstanceClient as AsyncInstanceClient
    from .client import AsyncManagerClient as AsyncManagerClient
    from .client import AsyncSequenceClient as AsyncSequenceClient
    from .client import AsyncSpaceClient as AsyncSpaceClient
    from .client import BadRequest as BadRequest
    from .client import ClientError as ClientError
    from .client import Conflict as Conflict
    from .client import ConnectionFailed as ConnectionFailed
    from .client import Forbidden as Forbidden
    from .client import Gone as Gone
    from .client import HubClient as HubClient
    from .client import InstanceClient as InstanceClient
    from .client import ManagerClient as ManagerClient
    from .client import NotFound as NotFound
    from .client import PackageError as PackageError
    from .client import SequenceClient as SequenceClient
    from .client import ServerError as ServerError
    from .client import SpaceClient as SpaceClient

__all__ = ["__version__", *sorted(_CLIENT_NAMES)]


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from . import client

        value = getattr(client, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_CLIENT_NAMES})
