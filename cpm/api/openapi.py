"""The manager's API as an OpenAPI 3.1 document, served at ``GET /api/v1/openapi.json``.

Every route the manager's router serves is listed here and nothing else
(tests/e2e/test_openapi.py), and so is the forwarding to hubs, which the Space API's gate
answers before routing: ``/api/v1/space/{space}/api/v1/sth/{id}/api/v1/{path}``, where
``{path}`` is any hub route (the hub's own document describes them).
"""

from __future__ import annotations

from functools import cache
from typing import Any, Final

from spacehub.server.openapi import LIST, OBJECT, VERSION, Operation, document, json_body, op

from .. import __version__

__all__ = ["FAULT_OPERATIONS", "FORWARDED", "OPERATIONS", "manager_openapi"]

SPACE: Final = "/api/v1/space/:space/api/v1"
#: The forwarding to a hub: every method, any hub route after it.
FORWARDED: Final = f"{SPACE}/sth/:id/api/v1/:path"
_HTML: Final = "text/html"
_HUB: Final = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "state": {"enum": ["connected", "unhealthy", "disconnected"]},
        "healthy": {"type": "boolean"},
        "isConnectionActive": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["id", "healthy", "isConnectionActive"],
}
_JOIN_TOKEN: Final = {
    "type": "object",
    "properties": {
        "expires": {"type": "number", "exclusiveMinimum": 0, "description": "seconds it lives"},
        "description": {"type": "string", "maxLength": 200},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}
_SPACE_TAG: Final = "space"
#: The Space API's refusal, the original's shape (docs/manager.md: it does not tell why).
FORBIDDEN: Final = {
    "type": "object",
    "properties": {"message": {"const": "Forbidden"}},
    "required": ["message"],
}


def _space(summary: str, errors: tuple[int, ...] = (), **kwargs: Any) -> dict[str, Any]:
    operation = op(summary, tag=_SPACE_TAG, errors=(403, *errors), error_schemas={403: FORBIDDEN}, **kwargs)
    operation["security"] = [{"spaceToken": []}]
    return operation


def _page(summary: str, method: str = "GET") -> dict[str, Any]:
    operation = op(
        summary, ok=200 if method == "GET" else 303, media=_HTML if method == "GET" else "", tag="console"
    )
    operation["description"] = (
        "A console page for browsers (docs/console.md): a session cookie; POSTs need its CSRF token."
    )
    return operation


_FORWARD_METHODS: Final = ("GET", "POST", "PUT", "DELETE")

OPERATIONS: Final[list[Operation]] = [
    (
        "GET",
        "/api/v1/version",
        op("The manager's version, as the original's", schema=VERSION, tag="manager"),
    ),
    (
        "GET",
        "/api/v1/status",
        op("Which manager this is: id, product, version", schema=OBJECT, tag="manager"),
    ),
    (
        "GET",
        "/api/v1/ca.pem",
        op("The CA hubs trust this manager by", media="application/x-pem-file", tag="manager", errors=(404,)),
    ),
    ("GET", "/api/v1/openapi.json", op("This document", schema=OBJECT, tag="manager")),
    (
        "GET",
        "/api/v1/spaces",
        {
            **op(
                "The spaces the token opens",
                schema=LIST,
                tag="manager",
                errors=(403,),
                error_schemas={403: FORBIDDEN},
            ),
            "security": [{"spaceToken": []}],
        },
    ),
    ("GET", f"{SPACE}/version", _space("The manager's version", schema=VERSION)),
    ("GET", f"{SPACE}/load", _space("The manager machine's load", schema=OBJECT)),
    ("GET", f"{SPACE}/list", _space("The space's hubs", schema={"type": "array", "items": _HUB})),
    ("GET", f"{SPACE}/sth/:id/info", _space("One hub", schema=_HUB, errors=(404,))),
    ("GET", f"{SPACE}/sth/:id", _space("One hub", schema=_HUB, errors=(404,))),
    *(
        (
            "GET",
            f"{SPACE}/{kind}",
            _space(
                f"The {kind} of every connected hub",
                schema={"type": "array"},
                query=(("detail", {"enum": ["true", "false"]}, "true: whole items naming their hub"),),
            ),
        )
        for kind in ("sequences", "instances")
    ),
    (
        "GET",
        f"{SPACE}/topics",
        _space(
            "Each topic of the Space once: content type, producers and consumers on each hub,"
            " bytes and records counted, backlogs (the manager's log, each consumer hub's, each"
            " producer hub's spool)",
            schema=LIST,
        ),
    ),
    (
        "POST",
        f"{SPACE}/topic/:name",
        _space(
            "Write records into the Space's topic: they reach its consumers on every hub, whole"
            " (lines for text and NDJSON)",
            ok=202,
            schema=OBJECT,
            description="200 when `x-end-stream: true`, 202 otherwise, as a hub's topic",
            errors=(400, 415),
        ),
    ),
    (
        "GET",
        f"{SPACE}/topic/:name",
        _space(
            "The Space's topic from now on: records from every hub and from POSTs, in the order"
            " the manager took them; never ends by itself",
            media="application/x-ndjson",
            errors=(400, 415),
        ),
    ),
    (
        "GET",
        f"{SPACE}/instances/history",
        _space(
            "Ended instances of every hub, newest first, each naming its hub (those that ran while a"
            " hub's link was down come with its next heartbeat)",
            schema=LIST,
        ),
    ),
    (
        "POST",
        f"{SPACE}/join-tokens",
        _space(
            "Make a join token, its line and cloud-init",
            schema=OBJECT,
            body=json_body(_JOIN_TOKEN),
            errors=(400,),
        ),
    ),
    ("GET", f"{SPACE}/join-tokens", _space("The pending join tokens (no secrets)", schema=LIST)),
    ("DELETE", f"{SPACE}/join-tokens/:id", _space("Revoke a join token", schema=OBJECT, errors=(404,))),
    ("POST", f"{SPACE}/console-login", _space("A one-time console sign-in link", schema=OBJECT)),
    *(
        (
            method,
            FORWARDED,
            _space(
                "Forwarded to the hub as /api/v1/{path}",
                media="",
                description=(
                    "Any hub route ({path} may hold slashes); answered by the hub,"
                    " or 503 when its link is down."
                ),
                errors=(404, 502, 503),
            ),
        )
        for method in _FORWARD_METHODS
    ),
    ("GET", "/install.sh", op("The installer the join line runs", media="text/x-shellscript", tag="joining")),
    (
        "GET",
        "/install/SHA256SUMS",
        op("Checksums of the package it serves", media="text/plain", tag="joining", errors=(404,)),
    ),
    (
        "GET",
        "/install/:name",
        op("The Spacehub .deb", media="application/vnd.debian.binary-package", tag="joining", errors=(404,)),
    ),
    (
        "GET",
        "/metrics",
        {
            **op(
                "Prometheus metrics",
                media="text/plain",
                tag="manager",
                errors=(403,),
                error_schemas={403: FORBIDDEN},
            ),
            "security": [{"metricsToken": []}],
        },
    ),
    ("GET", "/", _page("The console: to the fleet page")),
    ("GET", "/console", _page("The console: to the fleet page")),
    ("GET", "/console/login", _page("Sign-in form")),
    ("POST", "/console/login", _page("Sign in with an API token", "POST")),
    ("GET", "/console/login/once/:code", _page("Sign in with a one-time link")),
    ("POST", "/console/logout", _page("Sign out", "POST")),
    ("POST", "/console/space", _page("Switch space", "POST")),
    ("GET", "/console/fleet", _page("The fleet")),
    ("GET", "/console/fleet/events", _page("The fleet's live updates (Server-Sent Events)")),
    ("GET", "/console/hubs/:id", _page("A hub")),
    ("POST", "/console/hubs/:id/sequences", _page("Upload a package", "POST")),
    ("POST", "/console/hubs/:id/sequences/:seq/start", _page("Start a sequence", "POST")),
    ("POST", "/console/hubs/:id/sequences/:seq/delete", _page("Delete a sequence", "POST")),
    ("GET", "/console/hubs/:id/instances/:inst", _page("An instance")),
    ("POST", "/console/hubs/:id/instances/:inst/stop", _page("Stop an instance", "POST")),
    ("POST", "/console/hubs/:id/instances/:inst/kill", _page("Kill an instance", "POST")),
    (
        "GET",
        "/console/hubs/:id/instances/:inst/tail/:name",
        _page("An instance's stream, live (Server-Sent Events)"),
    ),
    ("GET", "/console/hubs/:id/tail/log", _page("The hub's log, live (Server-Sent Events)")),
    ("POST", "/console/hubs/:id/revoke", _page("Revoke a hub", "POST")),
    ("GET", "/console/topics", _page("The space's topics")),
    ("GET", "/console/join", _page("Hubs and joining")),
    ("POST", "/console/join", _page("Make a join token", "POST")),
    ("POST", "/console/join/:token/revoke", _page("Revoke a join token", "POST")),
    ("GET", "/console/static/:name", _page("The stylesheet and the script")),
]


#: Served only with ``cpm serve --fault-injection``, to loopback callers (cpm/faults.py).
FAULT_OPERATIONS: Final[list[Operation]] = [
    (
        "POST",
        "/api/v1/faults",
        op(
            "Inject a fault: cut, partition or delay hub links, fail registry writes",
            schema=OBJECT,
            body=json_body(
                {
                    "type": "object",
                    "properties": {
                        "hub": {"type": "string", "description": 'a hub id, or "*"'},
                        "cut": {"type": "boolean"},
                        "partition": {"type": "number", "minimum": 0, "maximum": 3600},
                        "delay": {"type": "number", "minimum": 0, "maximum": 3600},
                        "for": {"type": "number", "minimum": 0, "maximum": 3600},
                        "registryWrites": {"type": "number", "minimum": 0, "maximum": 3600},
                    },
                    "additionalProperties": False,
                }
            ),
            tag="faults",
            errors=(400, 403),
        ),
    ),
    ("DELETE", "/api/v1/faults", op("Clear every fault", schema=OBJECT, tag="faults", errors=(403,))),
]


@cache
def manager_openapi(faults: bool = False) -> dict[str, Any]:
    doc = document(
        "Spacehub manager API",
        __version__,
        "The manager (docs/manager.md): spaces, the Space API and its forwarding to hubs,"
        " joining, metrics, the console.",
        "/",
        [*OPERATIONS, *(FAULT_OPERATIONS if faults else [])],
    )
    doc["components"]["securitySchemes"] = {
        "spaceToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "an API token of the space (`cpm token create`)",
        },
        "metricsToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "the scrape token (`cpm metrics-token`)",
        },
    }
    return doc
