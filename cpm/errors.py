"""The manager's exception tree.

Every error the manager raises on purpose derives from :class:`ManagerError` and
carries the HTTP status the API answers with; the API layer turns any of them into
JSON in one place. Join refusals also carry a stable ``code`` the link sends to the
hub, next to the message the hub shows its operator::

    HttpError (spacehub.server.errors)
    └── ManagerError (500)
        ├── BadRequest (400)                    invalid space name, public key, tags, ttl, ...
        ├── Unauthorized (401)                  no credentials at all
        ├── Forbidden (403)                     bad or revoked bearer token: {"message": "Forbidden"}
        ├── JoinRefused (403)                   a hub may not join or connect; ``code`` + message
        │   ├── TokenUnknown (403)              no such join token in this space
        │   ├── TokenExpired (403)
        │   ├── TokenUsed (403)                 join tokens are one-time
        │   └── HubRevoked (403)                the hub's key was revoked by an operator
        ├── Refusal (403)                       a link refused with a code chosen at the time
        ├── NotFound (404)
        │   ├── SpaceNotFound (404)
        │   ├── HubNotFound (404)
        │   └── ApiTokenNotFound (404)
        ├── Conflict (409)                      space exists, public key already registered, ...
        ├── RegistryUnavailable (503)           the registry's database cannot be reached now
        └── HubUnavailable (503)                the hub is not connected
            ├── ManagerNotRunning (503)         nothing answers on the admin socket
            └── HubLinkFailed (502)             the link broke or the hub answered nonsense mid-request
"""

from __future__ import annotations

from typing import Any, ClassVar

from spacehub.server.errors import HttpError


class ManagerError(HttpError):
    """Base of every error the manager raises on purpose."""


class BadRequest(ManagerError):
    status = 400
    default_message = "Bad Request"


class Unauthorized(ManagerError):
    status = 401
    default_message = "Unauthorized"


class Forbidden(ManagerError):
    """A missing, wrong or revoked bearer token; the Space API answers ``{"message": "Forbidden"}``."""

    status = 403
    default_message = "Forbidden"

    def body(self) -> dict[str, Any]:
        # The original's answer, word for word: it tells nothing about what exists.
        return {"message": "Forbidden"}


class JoinRefused(ManagerError):
    """A hub may not join (or connect); the hub shows ``message`` and stops retrying.

    ``code`` is stable and machine-readable (it goes on the wire); ``message`` is for people.
    """

    status = 403
    code: ClassVar[str] = "join-refused"
    default_message = "The manager refused this hub"


class TokenUnknown(JoinRefused):
    code = "token-unknown"
    default_message = "The join token is not known in this space; ask the space's operator for a new one"


class TokenExpired(JoinRefused):
    code = "token-expired"
    default_message = "The join token has expired; ask the space's operator for a new one"


class TokenUsed(JoinRefused):
    code = "token-used"
    default_message = "The join token was already used (join tokens are one-time); ask for a new one"


class TokenRevoked(JoinRefused):
    code = "token-revoked"
    default_message = "The join token was revoked by the space's operator; ask for a new one"


class HubRevoked(JoinRefused):
    code = "hub-revoked"
    default_message = "This hub's key was revoked by the space's operator"


class Refusal(ManagerError):
    """Refuse a hub's link with this wire ``code`` and operator-facing ``reason``."""

    status = 403

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class NotFound(ManagerError):
    status = 404
    default_message = "Not Found"


class SpaceNotFound(NotFound):
    default_message = "Space not found"


class HubNotFound(NotFound):
    default_message = "Hub not found"


class ApiTokenNotFound(NotFound):
    default_message = "API token not found"


class JoinTokenNotFound(NotFound):
    default_message = "Join token not found"


class Conflict(ManagerError):
    status = 409
    default_message = "Conflict"


class RegistryUnavailable(ManagerError):
    """The registry's database (PostgreSQL, or a locked SQLite file) cannot serve a call now."""

    status = 503
    default_message = "The registry's database is unavailable; try again shortly"


class HubUnavailable(ManagerError):
    """The hub is not connected, so a request for it cannot be served now."""

    status = 503
    default_message = "Hub unavailable"


class ManagerNotRunning(HubUnavailable):
    """No manager answers on the data dir's admin socket."""

    default_message = "The manager is not running"


class HubLinkFailed(HubUnavailable):
    """The link to the hub broke, or the hub answered nonsense, while serving a request."""

    status = 502
    default_message = "Bad Gateway"


class ConsoleRefused(ManagerError):
    """A console request without a live session or without its session's CSRF token."""

    status = 403
    default_message = "Forbidden: sign in to the console (again) and retry from its page"


class HubRefusedCall(ManagerError):
    """A hub answered the console's call with an error of its own (not a link failure)."""

    status = 502
    default_message = "The hub refused the call"


def hub_refusal(status: int, message: str) -> ManagerError:
    """The manager's error for a hub's error answer: the same class of status where one fits."""
    by_status: dict[int, type[ManagerError]] = {400: BadRequest, 404: NotFound, 409: Conflict}
    return by_status.get(status, HubRefusedCall)(message)
