"""The hub API as an OpenAPI 3.1 document, served at ``GET /api/v1/openapi.json``.

Every route the hub's router serves is listed here and nothing else (tests/e2e/test_openapi.py);
docs/api.md says the same for people.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Final

from spacehub.server.openapi import (
    JSON,
    LIST,
    OBJECT,
    VERSION,
    Operation,
    binary_body,
    document,
    json_body,
    op,
)

from .. import __version__

__all__ = ["OPERATIONS", "hub_openapi"]

_STRINGS: Final = {"type": "array", "items": {"type": "string"}}
_INSTANCE: Final = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "sequence": {"type": "object"},
        "appConfig": {"type": "object"},
        "args": {"type": "array"},
        "created": {"type": "string"},
        "started": {"type": "string"},
        "ended": {"type": "string"},
        "status": {
            "enum": ["initializing", "starting", "running", "stopping", "killing", "completed", "errored"]
        },
        "terminated": {"type": "object"},
        "restart": {"enum": ["never", "on-failure", "always"]},
        "restarts": {"type": "integer", "minimum": 0},
    },
    "required": ["id", "status"],
}
_SEQUENCE: Final = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "config": {"type": "object"}, "instances": _STRINGS},
    "required": ["id"],
}
_START: Final = {
    "type": "object",
    "properties": {
        "appConfig": {"type": "object"},
        "args": {"type": "array"},
        "instanceId": {"type": "string"},
        "limits": {"type": "object"},
        "restart": {
            "enum": ["never", "on-failure", "always"],
            "description": "restart it when it ends, after a reboot too (default never)",
        },
    },
}
_STOP: Final = {
    "description": '`{"timeout": ms, "canCallKeepalive": bool}`, or the original\'s `[4001, {...}]`',
    "oneOf": [{"type": "object"}, {"type": "array"}],
}
_EVENT: Final = {
    "description": '`{"eventName": name, "message": any}`, or the original\'s `[5001, {...}]`',
    "oneOf": [{"type": "object"}, {"type": "array"}],
}
_END_STREAM: Final = ("x-end-stream", {"type": "string"}, "true ends the stream after this body")
_STREAM_TYPES: Final = ("application/octet-stream", "text/plain", "application/x-ndjson")
_TEXT: Final = "text/plain"

OPERATIONS: Final[list[Operation]] = [
    ("GET", "/version", op("The hub's version, as the original's", schema=VERSION, tag="hub")),
    ("GET", "/config", op("The running configuration: no secrets, no paths", schema=OBJECT, tag="hub")),
    (
        "GET",
        "/status",
        op("Id, product, version, the link to the manager, uptime, tasks", schema=OBJECT, tag="hub"),
    ),
    ("GET", "/load-check", op("CPU, memory and disk use", schema=OBJECT, tag="hub")),
    (
        "GET",
        "/log",
        op("The hub's log: the last records, then live (NDJSON)", media="application/x-ndjson", tag="hub"),
    ),
    ("GET", "/entities", op("Sequences and instances", schema=OBJECT, tag="hub")),
    ("GET", "/openapi.json", op("This document", schema=OBJECT, tag="hub")),
    (
        "GET",
        "/sequences",
        op("Every sequence", schema={"type": "array", "items": _SEQUENCE}, tag="sequences"),
    ),
    (
        "POST",
        "/sequence",
        op(
            "Upload a sequence (a .tar.gz package)",
            schema=_SEQUENCE,
            body=binary_body("application/octet-stream", "application/gzip"),
            tag="sequences",
            errors=(400, 413, 422),
        ),
    ),
    ("GET", "/sequence/:id", op("One sequence", schema=_SEQUENCE, tag="sequences", errors=(404,))),
    (
        "PUT",
        "/sequence/:id",
        op(
            "Replace a sequence's package",
            schema=_SEQUENCE,
            body=binary_body("application/octet-stream", "application/gzip"),
            tag="sequences",
            errors=(400, 404, 409),
        ),
    ),
    ("DELETE", "/sequence/:id", op("Delete a sequence", schema=OBJECT, tag="sequences", errors=(404, 409))),
    (
        "GET",
        "/sequence/:id/instances",
        op("Its instances' ids", schema=_STRINGS, tag="sequences", errors=(404,)),
    ),
    (
        "POST",
        "/sequence/:id/start",
        op(
            "Start an instance",
            schema=_INSTANCE,
            body=json_body(_START),
            tag="sequences",
            errors=(400, 404, 409, 422),
        ),
    ),
    (
        "GET",
        "/instances",
        op("Every instance", schema={"type": "array", "items": _INSTANCE}, tag="instances"),
    ),
    ("GET", "/instance/:id", op("One instance", schema=_INSTANCE, tag="instances", errors=(404,))),
    (
        "GET",
        "/instance/:id/health",
        op("Its health, as its runner reports it", schema=OBJECT, tag="instances"),
    ),
    *(
        (
            "GET",
            f"/instance/:id/{name}",
            op(
                f"Its {name}, live: from where its readers left off, or from byte `offset`",
                media="application/octet-stream",
                tag="instances",
                query=(
                    (
                        "offset",
                        {"type": "integer", "minimum": 0},
                        "the byte to start from, counted from the instance's start across hub restarts"
                        " (410: no longer kept; 416: not written yet)",
                    ),
                ),
                errors=(400, 404, 410, 416),
            ),
        )
        for name in ("output", "stdout", "stderr")
    ),
    ("GET", "/instance/:id/log", op("Its log, live (NDJSON)", media="application/x-ndjson", tag="instances")),
    (
        "POST",
        "/instance/:id/input",
        op(
            "Write to its input",
            schema=OBJECT,
            body=binary_body(*_STREAM_TYPES, required=False),
            headers=(_END_STREAM,),
            tag="instances",
        ),
    ),
    (
        "POST",
        "/instance/:id/stdin",
        op(
            "Write to its stdin",
            schema=OBJECT,
            body=binary_body(_TEXT, "application/octet-stream", required=False),
            headers=(_END_STREAM,),
            tag="instances",
        ),
    ),
    (
        "POST",
        "/instance/:id/_event",
        op("Send it an event", schema=OBJECT, body=json_body(_EVENT), tag="instances"),
    ),
    ("GET", "/instance/:id/event/:name", op("The last event of that name", tag="instances")),
    ("GET", "/instance/:id/event", op("The last event", tag="instances")),
    ("GET", "/instance/:id/once/:name", op("Wait for the next event of that name", tag="instances")),
    ("GET", "/instance/:id/once", op("Wait for the next event", tag="instances")),
    (
        "GET",
        "/instance/:id/events/:name",
        op("Events of that name, live (NDJSON)", media="application/x-ndjson", tag="instances"),
    ),
    (
        "GET",
        "/instance/:id/events",
        op("Every event, live (NDJSON)", media="application/x-ndjson", tag="instances"),
    ),
    (
        "POST",
        "/instance/:id/_stop",
        op("Stop it, with its stop handler", schema=OBJECT, body=json_body(_STOP), tag="instances"),
    ),
    ("POST", "/instance/:id/_kill", op("Kill it", schema=OBJECT, body=json_body(OBJECT), tag="instances")),
    ("GET", "/topics", op("Every topic", schema=LIST, tag="topics")),
    (
        "POST",
        "/topics",
        op(
            "Make a topic",
            schema=OBJECT,
            body=json_body(
                {
                    "type": "object",
                    "properties": {"id": {"type": "string"}, "content-type": {"type": "string"}},
                    "required": ["id"],
                },
                required=True,
            ),
            tag="topics",
            errors=(400,),
        ),
    ),
    ("DELETE", "/topics/:name", op("Delete a topic", schema=OBJECT, tag="topics", errors=(404,))),
    (
        "POST",
        "/topic/:name",
        op(
            "Send data to a topic (made if missing)",
            ok=202,
            schema=OBJECT,
            body=binary_body(*_STREAM_TYPES, required=False),
            headers=(_END_STREAM,),
            tag="topics",
            description="200 when `x-end-stream: true`, 202 otherwise, as the original",
        ),
    ),
    ("GET", "/topic/:name", op("A topic's data, live", media="application/octet-stream", tag="topics")),
]


@cache
def hub_openapi() -> dict[str, Any]:
    doc = document(
        "Spacehub hub API",
        __version__,
        "The Transform Hub's REST API (docs/api.md): sequences, instances, their streams, topics.",
        "/api/v1",
        OPERATIONS,
    )
    # POST /topic answers 200 too (x-end-stream: true).
    topic_post = doc["paths"]["/topic/{name}"]["post"]
    topic_post["responses"]["200"] = {"description": "done", "content": {JSON: {"schema": OBJECT}}}
    return doc
