"""Instance routes: info, health, streams, input, events, stop and kill."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from spacehub.server.http import Request, Response, Router, StreamResponse, json_response, parse_bool_header

from .. import limits
from ..errors import BadRequest, UnsupportedMediaType
from ..hublog import encode_record
from ..instances.instance import Instance

if TYPE_CHECKING:
    from ..service import Hub

#: Control codes the original's clients put in front of array bodies.
EVENT_CODE, STOP_CODE, KILL_CODE = 5001, 4001, 4002


def _unwrap_array_body(value: Any, code: int) -> Any:
    """Accept ``[code, {...}]`` (the original CLI's form) as well as ``{...}``."""
    if isinstance(value, list):
        if len(value) == 2 and isinstance(value[1], dict | None):
            return value[1] or {}
        raise BadRequest(f"expected an object or [{code}, {{...}}]")
    return value


def _event_body(value: Any) -> tuple[str, Any]:
    value = _unwrap_array_body(value, EVENT_CODE)
    if not isinstance(value, dict):
        raise BadRequest('event must be an object {"eventName", "message"}')
    name = value.get("eventName")
    if not isinstance(name, str) or not name:
        raise BadRequest("Invalid format, eventName missing.")
    # The original's Python client sends the message under the misspelt key "messagee".
    message = value["message"] if "message" in value else value.get("messagee")
    return name, message


def _stop_body(value: Any, default_timeout: int) -> tuple[int, bool]:
    value = _unwrap_array_body(value, STOP_CODE)
    if not isinstance(value, dict):
        raise BadRequest('stop options must be an object {"timeout", "canCallKeepalive"}')
    timeout = value.get("timeout", default_timeout)
    if timeout is None:
        timeout = default_timeout
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 <= timeout <= limits.MAX_STOP_TIMEOUT_MS
    ):
        raise BadRequest(
            f"Invalid timeout format: a number of milliseconds from 0 to {limits.MAX_STOP_TIMEOUT_MS}"
        )
    keep_alive = value.get("canCallKeepalive", False)
    if not isinstance(keep_alive, bool):
        raise BadRequest("Invalid canCallKeepalive format: true or false")
    return int(timeout), keep_alive


def _offset(request: Request) -> int | None:
    """``?offset=N``: read a stream from its byte N (a reader resuming after a cut)."""
    values = parse_qs(request.scope.get("query_string", b"").decode("latin-1")).get("offset")
    if not values:
        return None
    value = values[-1]
    if not value.isdigit() or len(value) > 18:
        raise BadRequest("offset must be a whole number of bytes, 0 or more")
    return int(value)


def _ndjson(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, default=str).encode() + b"\n"


def register(router: Router, hub: Hub) -> None:
    supervisor = hub.supervisor

    def instance(request: Request) -> Instance:
        return supervisor.get(request.params["id"])

    async def list_instances(request: Request) -> Response:
        return json_response([i.info() for i in supervisor.list()])

    async def info(request: Request) -> Response:
        return json_response(instance(request).info())

    async def health(request: Request) -> Response:
        return json_response(await instance(request).health())

    def stream_route(name: str) -> Any:
        async def handler(request: Request) -> StreamResponse:
            return StreamResponse(instance(request).read_stream(name, _offset(request)))

        return handler

    async def log(request: Request) -> StreamResponse:
        ring = instance(request).log

        async def lines() -> AsyncIterator[bytes]:
            async for missed, record in ring.follow():
                if missed:
                    yield encode_record(
                        {"level": "WARN", "from": "Hub", "msg": f"{missed} log records skipped"}
                    )
                yield encode_record(record)

        return StreamResponse(lines(), "application/x-ndjson")

    async def write_input(request: Request) -> Response:
        target = instance(request)
        end = parse_bool_header(request.header("x-end-stream"), True)
        await target.write_input(request.stream(), request.content_type, end)
        return json_response({}, 200 if end else 202)

    async def write_stdin(request: Request) -> Response:
        target = instance(request)
        if request.content_type not in (None, "application/octet-stream", "text/plain"):
            raise UnsupportedMediaType(f"stdin takes raw bytes, not {request.content_type}")
        end = parse_bool_header(request.header("x-end-stream"), True)
        await target.write_stdin(request.stream(), end)
        return json_response({}, 200 if end else 202)

    async def send_event(request: Request) -> Response:
        target = instance(request)
        name, message = _event_body(await request.json(default={}))
        await target.send_event(name, message)
        return json_response({"accepted": "OK"})

    async def last_event(request: Request) -> Response:
        return json_response(await instance(request).last_event(request.params.get("name")))

    async def next_event(request: Request) -> Response:
        return json_response(await instance(request).next_event(request.params.get("name")))

    async def event_stream(request: Request) -> StreamResponse:
        target = instance(request)
        events = target.event_stream(request.params.get("name"))

        async def lines() -> AsyncIterator[bytes]:
            try:
                async for message in events:
                    yield _ndjson(message if message not in (None, "") else {})
            finally:
                await events.aclose()

        return StreamResponse(lines(), "application/x-ndjson")

    async def stop(request: Request) -> Response:
        target = instance(request)
        timeout, keep_alive = _stop_body(await request.json(default={}), hub.config.stop_timeout_ms)
        await target.stop(timeout, keep_alive)
        return json_response(target.info(), 202)

    async def kill(request: Request) -> Response:
        target = instance(request)
        options = _unwrap_array_body(await request.json(default={}), KILL_CODE)
        if not isinstance(options, dict):
            raise BadRequest("kill options must be an object")
        remove = options.get("removeImmediately", False)
        if not isinstance(remove, bool):
            raise BadRequest("removeImmediately must be true or false")
        await target.kill(remove_immediately=remove)
        return json_response(target.info(), 202)

    router.add("GET", "/instances", list_instances)
    router.add("GET", "/instance/:id", info)
    router.add("GET", "/instance/:id/health", health)
    for name in ("output", "stdout", "stderr"):
        router.add("GET", f"/instance/:id/{name}", stream_route(name))
    router.add("GET", "/instance/:id/log", log)
    router.add("POST", "/instance/:id/input", write_input)
    router.add("POST", "/instance/:id/stdin", write_stdin)
    router.add("POST", "/instance/:id/_event", send_event)
    router.add("GET", "/instance/:id/event/:name", last_event)
    router.add("GET", "/instance/:id/event", last_event)
    router.add("GET", "/instance/:id/once/:name", next_event)
    router.add("GET", "/instance/:id/once", next_event)
    router.add("GET", "/instance/:id/events/:name", event_stream)
    router.add("GET", "/instance/:id/events", event_stream)
    router.add("POST", "/instance/:id/_stop", stop)
    router.add("POST", "/instance/:id/_kill", kill)
