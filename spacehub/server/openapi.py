"""OpenAPI 3.1 documents of the daemons' APIs, and the check that they match the routers.

Each daemon lists its operations as ``(method, pattern, operation)`` with the patterns its
router uses (``/instance/:id``); :func:`document` turns them into the document, and
:func:`mismatches` compares the listed operations with what a router serves, both ways: a
test keeps the two equal, so the document cannot drift from the code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

__all__ = [
    "ERROR",
    "JSON",
    "LIST",
    "OBJECT",
    "VERSION",
    "Operation",
    "binary_body",
    "document",
    "json_body",
    "mismatches",
    "op",
    "path_template",
]

JSON: Final = "application/json"
#: Every error of both daemons: ``{"error": "<message>"}`` with the error's status.
ERROR: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
}

#: Shapes both documents use.
OBJECT: Final[dict[str, Any]] = {"type": "object"}
LIST: Final[dict[str, Any]] = {"type": "array", "items": {"type": "object"}}
#: ``GET /version`` of either daemon: exactly the original's keys.
VERSION: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "service": {"type": "string"},
        "apiVersion": {"type": "string"},
        "version": {"type": "string"},
        "build": {"type": "string"},
    },
    "required": ["service", "apiVersion", "version", "build"],
}

Operation = tuple[str, str, dict[str, Any]]


def path_template(pattern: str) -> str:
    """A router pattern as an OpenAPI path: ``/instance/:id`` -> ``/instance/{id}``."""
    return re.sub(r":(\w+)", r"{\1}", pattern)


def op(
    summary: str,
    *,
    ok: int = 200,
    media: str = JSON,
    schema: Mapping[str, Any] | None = None,
    body: Mapping[str, Any] | None = None,
    query: Sequence[tuple[str, Mapping[str, Any], str]] = (),
    headers: Sequence[tuple[str, Mapping[str, Any], str]] = (),
    tag: str = "",
    description: str = "",
    errors: Sequence[int] = (),
    error_schemas: Mapping[int, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """One operation: its summary, success answer, body, query and header parameters; every
    operation also documents its errors (``errors``, and ``default``) as :data:`ERROR`, or
    as ``error_schemas`` gives for a status."""
    operation: dict[str, Any] = {"summary": summary}
    if description:
        operation["description"] = description
    if tag:
        operation["tags"] = [tag]
    parameters = [
        {"name": name, "in": "query", "required": False, "schema": dict(value), "description": text}
        for name, value, text in query
    ] + [
        {"name": name, "in": "header", "required": False, "schema": dict(value), "description": text}
        for name, value, text in headers
    ]
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = dict(body)
    success: dict[str, Any] = {"description": "done"}
    if media:
        success["content"] = {media: {"schema": dict(schema) if schema is not None else {}}}
    error = {"description": "an error", "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}
    special = error_schemas or {}
    operation["responses"] = {
        str(ok): success,
        **{
            str(code): (
                {"description": "an error", "content": {JSON: {"schema": dict(special[code])}}}
                if code in special
                else error
            )
            for code in errors
        },
        "default": error,
    }
    return operation


def json_body(schema: Mapping[str, Any], *, required: bool = False) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": dict(schema)}}}


def binary_body(*media: str, required: bool = True) -> dict[str, Any]:
    return {
        "required": required,
        "content": {m: {"schema": {"type": "string", "contentMediaType": m}} for m in media},
    }


def document(
    title: str, version: str, description: str, server: str, operations: Iterable[Operation]
) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, pattern, operation in operations:
        template = path_template(pattern)
        item = paths.setdefault(template, {})
        names = re.findall(r"{(\w+)}", template)
        if names and "parameters" not in item:
            item["parameters"] = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
                for name in names
            ]
        item[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "servers": [{"url": server}],
        "paths": paths,
        "components": {"schemas": {"Error": ERROR}},
    }


def mismatches(
    documented: Iterable[tuple[str, str]], served: Iterable[tuple[str, str]]
) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """``(served but not documented, documented but not served)``, as (METHOD, /path/{x})."""
    have = {(method.upper(), path_template(pattern)) for method, pattern in documented}
    serve = {(method.upper(), path_template(pattern)) for method, pattern in served}
    return serve - have, have - serve
