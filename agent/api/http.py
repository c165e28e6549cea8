"""A small ASGI layer: requests, responses and a route table.

Why not a framework: the hub needs exactly streaming request bodies, streaming
responses that end when the client goes away, and JSON errors in one place; a
framework would add memory on a 256 MB device and hide the back-pressure that
the raw ASGI ``receive``/``send`` pair gives us (hypercorn waits in ``send``
while the client is slow, and reads the socket only as fast as we ``receive``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import hypercorn.trio.tcp_server
import trio

from .. import limits
from ..errors import InvalidJSON, PayloadTooLarge, UnsupportedMediaType

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge an ASGI lifespan scope's startup and shutdown (hypercorn's Trio worker
    needs the startup acknowledged, not ignored)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


logger = logging.getLogger("agent.api")

JSON_TYPES: Final = frozenset({"application/json", "text/json"})


def tune_hypercorn(read_bytes: int = limits.SOCKET_READ_BYTES) -> None:
    """Make hypercorn's Trio server read sockets ``read_bytes`` at a time.

    hypercorn (0.18, pinned) reads 64 KiB per ``receive_some`` from a module constant,
    with no setting for it; every read then goes through h11, the stream and the app's
    queue. Streaming 1 GB in, that per-read cost was about a third of the hub's CPU.
    The constant is read on every call, so setting it once before serving is enough;
    the request queue (``max_app_queue_size``) still bounds what is read ahead.
    """
    if not isinstance(getattr(hypercorn.trio.tcp_server, "MAX_RECV", None), int):
        raise RuntimeError("hypercorn.trio.tcp_server.MAX_RECV is gone: check the pinned hypercorn version")
    hypercorn.trio.tcp_server.MAX_RECV = read_bytes


class Request:
    def __init__(self, scope: Scope, receive: Receive, params: dict[str, str]) -> None:
        self.scope = scope
        self._receive = receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.params = params
        self.headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", []):
            self.headers[raw_name.decode("latin-1").lower()] = raw_value.decode("latin-1")
        self._body_done = False

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def content_type(self) -> str | None:
        value = self.headers.get("content-type")
        if value is None:
            return None
        return value.split(";", 1)[0].strip().lower() or None

    async def stream(self) -> AsyncGenerator[bytes, None]:
        """The request body, chunk by chunk, as fast as the consumer takes it."""
        while not self._body_done:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._body_done = True
                raise trio.BrokenResourceError("client disconnected before the body ended")
            self._body_done = not message.get("more_body", False)
            chunk = message.get("body", b"")
            if chunk:
                yield chunk

    async def body(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in self.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def json(self, default: Any = None) -> Any:
        """The JSON body (``default`` when empty). A body with a non-JSON
        Content-Type is refused with 415; malformed JSON with 400."""
        raw = await self.body(limits.MAX_JSON_BODY_BYTES)
        if not raw.strip():
            return default
        if self.content_type is not None and self.content_type not in JSON_TYPES:
            raise UnsupportedMediaType(f"expected Content-Type application/json, not {self.content_type}")
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidJSON(f"request body is not valid JSON: {exc}") from None
        return default if value is None else value

    async def drain(
        self, limit: int = limits.DRAIN_BODY_BYTES, seconds: float = limits.DRAIN_SECONDS
    ) -> None:
        """Read and drop what is left of the body, up to ``limit`` bytes or ``seconds``.

        Answering an error before the body is in makes the server close the connection
        with data unread; a client still writing then gets a broken pipe or a reset
        instead of our ``{"error"}``. A small body is read first so the answer arrives;
        a large or stalled one is not waited for.
        """
        size = 0
        with trio.move_on_after(seconds), contextlib.suppress(trio.BrokenResourceError):
            async with contextlib.aclosing(self.stream()) as chunks:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        break

    async def wait_disconnect(self) -> None:
        """Returns when the client has gone (consumes what is left of the body)."""
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(value: Any, status: int = 200) -> Response:
    body = json.dumps(value, ensure_ascii=False, default=str).encode()
    return Response(status, body, "application/json")


def error_response(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


@dataclass(slots=True)
class StreamResponse:
    """A response whose body is produced as it is sent; ends when the client goes."""

    chunks: AsyncIterator[bytes]
    content_type: str = "application/octet-stream"
    status: int = 200
    #: called once the response is over, sent or not (releases what the handler
    #: attached eagerly, e.g. a topic reader, even if ``chunks`` never started)
    on_close: Callable[[], None] | None = None


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


def parse_bool_header(value: str | None, default: bool) -> bool:
    """``x-end-stream`` and friends: true/false in any case (the original's Python
    client sends ``True``/``False``), ``success`` meaning false as the original."""
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", "success"):
        return False
    return default


class Router:
    def __init__(self, prefix: str = "") -> None:
        self._prefix = prefix
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = re.sub(r":(\w+)", r"(?P<\1>[^/]+)", pattern)
        self._routes.append((method, re.compile(f"^{re.escape(self._prefix)}{regex}/?$"), handler))

    def resolve(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], list[str]]:
        """The handler and path parameters, or None and the methods the path has."""
        allowed: list[str] = []
        for route_method, regex, handler in self._routes:
            match = regex.match(path)
            if match is None:
                continue
            if route_method == method or (method == "HEAD" and route_method == "GET"):
                return handler, match.groupdict(), []
            allowed.append(route_method)
        return None, {}, allowed


async def send_response(send: Send, response: Response) -> None:
    headers = [(b"content-length", str(len(response.body)).encode())]
    if response.content_type:
        headers.append((b"content-type", response.content_type.encode()))
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


async def send_stream(send: Send, request: Request, response: StreamResponse) -> None:
    """Send headers at once, then each chunk; stop when the source ends or the
    client disconnects (the source's generator is closed either way)."""
    try:
        await _send_stream(send, request, response)
    finally:
        if response.on_close is not None:
            response.on_close()


async def _send_stream(send: Send, request: Request, response: StreamResponse) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": [(b"content-type", response.content_type.encode()), (b"cache-control", b"no-store")],
        }
    )
    finished = False
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            await request.wait_disconnect()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        try:
            async for chunk in response.chunks:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finished = True
        except Exception:
            # Headers are gone already: all we can do is cut the response short
            # (the client sees an unterminated chunked body) and say why in the log.
            logger.exception("stream %s %s failed", request.method, request.path)
        finally:
            aclose = getattr(response.chunks, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()
        nursery.cancel_scope.cancel()
    if finished:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
