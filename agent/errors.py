"""The hub's exception tree.

Every error the hub raises on purpose derives from :class:`HubError` and carries the
HTTP status the API answers with; the API layer turns any of them into
``{"error": "<message>"}`` in one place (``agent.api.app``)::

    HubError (500)
    ├── BadRequest (400)
    │   ├── InvalidJSON (400)
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
    │   └── InstanceExists (409)
    ├── Gone (410)                          input to an instance that has ended
    ├── PayloadTooLarge (413)
    │   └── ArchiveTooLarge (413)
    ├── UnsupportedMediaType (415)
    ├── PackageInvalid (422)                package.json missing or wrong
    └── InsufficientResources (507)
"""

from __future__ import annotations


class HubError(Exception):
    """Base of every error the hub raises on purpose."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(HubError):
    status = 400


class InvalidJSON(BadRequest):
    pass


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


class Gone(HubError):
    status = 410


class PayloadTooLarge(HubError):
    status = 413


class ArchiveTooLarge(PayloadTooLarge):
    pass


class UnsupportedMediaType(HubError):
    status = 415


class PackageInvalid(HubError):
    status = 422


class InsufficientResources(HubError):
    status = 507
