"""The shared server layer's exception tree.

Every error either daemon answers an API call with derives from :class:`HttpError`,
which carries the HTTP status; the one dispatch (:mod:`spacehub.server.http`) turns
any of them into a JSON body in one place, so the hub's and the manager's trees
(``agent.errors.HubError``, ``cpm.errors.ManagerError``) only subclass it::

    SpacehubError
    └── ServerError                         a daemon's own failure, not an answer
        ├── ConfigError                     a bad config file or option (the daemon exits)
        └── HttpError (500)                 answered as {"error": message} with .status
            ├── BadRequest (400)
            │   └── InvalidJSON (400)       malformed, non-finite numbers, nested too deep
            ├── NotFound (404)
            ├── MethodNotAllowed (405)
            ├── PayloadTooLarge (413)
            └── UnsupportedMediaType (415)
"""

from __future__ import annotations

from typing import Any, ClassVar

from spacehub.errors import SpacehubError

__all__ = [
    "BadRequest",
    "ConfigError",
    "HttpError",
    "InvalidJSON",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "ServerError",
    "UnsupportedMediaType",
]


class ServerError(SpacehubError):
    """Base of the daemons' errors."""


class ConfigError(ServerError):
    """A config file or option that cannot be used; the message says which and why."""


class HttpError(ServerError):
    """An error an API answers with: ``status`` and ``{"error": message}``."""

    status: ClassVar[int] = 500
    #: The message used when none is given.
    default_message: ClassVar[str] = "Internal Server Error"

    def __init__(self, message: str | None = None) -> None:
        message = self.default_message if message is None else message
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        """The JSON body answered for this error."""
        return {"error": self.message}


class BadRequest(HttpError):
    status = 400
    default_message = "Bad Request"


class InvalidJSON(BadRequest):
    default_message = "request body is not valid JSON"


class NotFound(HttpError):
    status = 404
    default_message = "Not Found"


class MethodNotAllowed(HttpError):
    status = 405
    default_message = "Method Not Allowed"


class PayloadTooLarge(HttpError):
    status = 413
    default_message = "Payload Too Large"


class UnsupportedMediaType(HttpError):
    status = 415
    default_message = "Unsupported Media Type"
