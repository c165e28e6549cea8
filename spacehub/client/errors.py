"""The client's one exception tree.

::

    ClientError                      anything this package raises on purpose
    ├── ConnectionFailed             no answer: refused, reset, DNS, TLS, timed out
    ├── PackageError                 a directory that cannot be packed (no package.json, ...)
    └── ApiError                     the server answered with a status >= 400
        ├── BadRequest               400
        ├── Unauthorized             401
        ├── Forbidden                403
        ├── NotFound                 404
        ├── MethodNotAllowed         405
        ├── Conflict                 409
        ├── Gone                     410
        ├── PayloadTooLarge          413
        ├── UnsupportedMediaType     415
        ├── Unprocessable            422
        └── ServerError              500 and up

Every :class:`ApiError` carries the HTTP ``status``, the server's ``message`` (the ``error`` or
``message`` field of its JSON answer, else the body's text, else the reason phrase) and the parsed
``body`` (``None`` when it was not JSON).
"""

from __future__ import annotations

import json
from typing import Any, Final

from spacehub.errors import SpacehubError

__all__ = [
    "ApiError",
    "BadRequest",
    "ClientError",
    "Conflict",
    "ConnectionFailed",
    "Forbidden",
    "Gone",
    "MethodNotAllowed",
    "NotFound",
    "PackageError",
    "PayloadTooLarge",
    "ServerError",
    "Unauthorized",
    "Unprocessable",
    "UnsupportedMediaType",
    "api_error",
]


class ClientError(SpacehubError):
    """Base of everything the client raises on purpose."""


class ConnectionFailed(ClientError):
    """The server could not be reached, or stopped answering."""


class PackageError(ClientError):
    """A directory could not be packed into a Sequence package."""


class ApiError(ClientError):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.body = body


class BadRequest(ApiError):
    """400: the request was refused as malformed or not possible now."""


class Unauthorized(ApiError):
    """401: no or bad credentials."""


class Forbidden(ApiError):
    """403: the token does not open this Space."""


class NotFound(ApiError):
    """404: unknown route or id."""


class MethodNotAllowed(ApiError):
    """405: e.g. input to an instance fed from a topic."""


class Conflict(ApiError):
    """409: id taken, sequence in use, input already ended."""


class Gone(ApiError):
    """410: the instance ended."""


class PayloadTooLarge(ApiError):
    """413: the package or body is too large."""


class UnsupportedMediaType(ApiError):
    """415: wrong Content-Type."""


class Unprocessable(ApiError):
    """422: invalid package.json, or not a runnable sequence."""


class ServerError(ApiError):
    """5xx: the server failed."""


_BY_STATUS: Final[dict[int, type[ApiError]]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    410: Gone,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: Unprocessable,
}


def api_error(status: int, content: bytes, reason: str = "") -> ApiError:
    """The exception for an error answer ``status`` with body ``content``."""
    body: Any = None
    message = ""
    try:
        body = json.loads(content) if content else None
    except ValueError:
        message = content.decode("utf-8", "replace").strip()
    if isinstance(body, dict):
        for key in ("error", "message"):
            value = body.get(key)
            if value:
                message = value if isinstance(value, str) else json.dumps(value)
                break
    elif isinstance(body, str):
        message = body
    if not message:
        message = reason or f"HTTP {status}"
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return cls(status, message, body)
