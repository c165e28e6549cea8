"""The hub's exception tree.

Every error the hub raises on purpose derives from :class:`HubError`, which is an
:class:`~spacehub.server.errors.HttpError`: it carries the HTTP status the API answers
with, and the shared dispatch (``spacehub.server.http.HttpDispatch``) turns any of them
into ``{"error": "<message>"}`` in one place. Errors of the HTTP layer itself (a body
that is not JSON, too large, of the wrong type) are the server layer's own
``HttpError`` subclasses, answered the same way::

    HttpError (spacehub.server.errors)
    └── HubError (500)
        ├── BadRequest (400)
        │   ├── ArchiveInvalid (400)            not a tar.gz, unsafe member, ...
        │   ├── SequenceStartFailed (400)       the runner ended before its handshake
        │   └── InstanceNotRunning (400)
        ├── NotFound (404)
        │   ├── SequenceNotFound (404)
        │   └── InstanceNotFound (404)
        ├── MethodNotAllowed (405)
        ├── NotAcceptable (406)
        ├── Conflict (409)
        │   ├── SequenceInUse (409)
        │   ├── InstanceExists (409)
        │   └── InvalidTransition (409)     a state table refused a trigger (instance, link)
        ├── Gone (410)                          input to an instance that has ended
        ├── PayloadTooLarge (413)
        │   └── ArchiveTooLarge (413)
        ├── UnsupportedMediaType (415)
        ├── PackageInvalid (422)                package.json missing or wrong
        ├── ImageError (500)                    a runner image cannot be built or found
        ├── LinkError (502)                     the link to the manager
        │   ├── LinkRefused (502)               refused for good: no retry helps
        │   └── AttemptFailed (502)             one attempt failed; the next may not
        └── InsufficientResources (507)
"""

from __future__ import annotations

from spacehub.server.errors import HttpError

__all__ = [
    "ArchiveInvalid",
    "ArchiveTooLarge",
    "AttemptFailed",
    "BadRequest",
    "Conflict",
    "Gone",
    "HubError",
    "ImageError",
    "InstanceExists",
    "InstanceNotFound",
    "InstanceNotRunning",
    "InsufficientResources",
    "InvalidTransition",
    "LinkError",
    "LinkRefused",
    "MethodNotAllowed",
    "NotAcceptable",
    "NotFound",
    "PackageInvalid",
    "PayloadTooLarge",
    "SequenceInUse",
    "SequenceNotFound",
    "SequenceStartFailed",
    "UnsupportedMediaType",
]


class HubError(HttpError):
    """Base of every error the hub raises on purpose."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)


class BadRequest(HubError):
    status = 400


class ArchiveInvalid(BadRequest):
    pass


class SequenceStartFailed(BadRequest):
    pass


class InstanceNotRunning(BadRequest):
    pass


class NotFound(HubError):
    status = 404


class SequenceNotFound(NotFound):
    pass


class InstanceNotFound(NotFound):
    pass


class MethodNotAllowed(HubError):
    status = 405


class NotAcceptable(HubError):
    status = 406


class Conflict(HubError):
    status = 409


class SequenceInUse(Conflict):
    pass


class InstanceExists(Conflict):
    pass


class InvalidTransition(Conflict):
    """A state table has no transition for this (state, trigger); each state module
    subclasses it with its own state and trigger types."""


class Gone(HubError):
    status = 410


class PayloadTooLarge(HubError):
    status = 413


class RangeNotSatisfiable(HubError):
    """A stream offset past what the stream has carried so far."""

    status = 416


class ArchiveTooLarge(PayloadTooLarge):
    pass


class UnsupportedMediaType(HubError):
    status = 415


class PackageInvalid(HubError):
    status = 422


class ImageError(HubError):
    """A runner image cannot be built or found."""


class LinkError(HubError):
    """The link to the manager failed."""

    status = 502


class LinkRefused(LinkError):
    """The manager refused the hub for good (or revoked it), or a local problem no retry fixes."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}" if code else reason)
        self.code = code
        self.reason = reason


class AttemptFailed(LinkError):
    """One attempt failed in a way worth retrying; the message is the reason."""


class InsufficientResources(HubError):
    status = 507
