"""The daemons' one HTTP layer: requests, responses, a route table and the ASGI dispatch.

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
import math
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final

import outcome
import trio

from . import limits
from .errors import HttpError, InvalidJSON, MethodNotAllowed, NotFound, PayloadTooLarge, UnsupportedMediaType
from .metrics import HttpMetrics

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


logger = logging.getLogger("spacehub.http")

JSON_TYPES: Final = frozenset({"application/json", "text/json"})


#: The request being served, for log records (``request`` in JSON logs): from the caller's
#: ``X-Request-Id`` when it is a sane one, else made here; sent back in the answer, and on to
#: the hub when the manager forwards the call, so one id follows a call through both daemons.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
_REQUEST_ID_SHAPE: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id(given: str | None) -> str:
    """The caller's id if it is 1-64 of ``[A-Za-z0-9._:-]``, else a new one."""
    if given is not None and _REQUEST_ID_SHAPE.fullmatch(given):
        return given
    return secrets.token_hex(8)


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
        #: the route pattern that answered, for metrics ("unmatched" until routed)
        self.route = "unmatched"
        #: request body bytes read so far
        self.bytes_read = 0
        #: see REQUEST_ID
        self.id = request_id(self.headers.get("x-request-id"))

    @property
    def body_read(self) -> bool:
        """Whether the request body has been read to its end (or the client went away)."""
        return self._body_done

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
                self.bytes_read += len(chunk)
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
        """The JSON body (``default`` when empty or null). A body with a non-JSON
        Content-Type is refused with 415; malformed JSON, NaN or Infinity and nesting
        deeper than ``MAX_JSON_DEPTH`` with 400."""
        raw = await self.body(limits.MAX_JSON_BODY_BYTES)
        if not raw.strip():
            return default
        if self.content_type is not None and self.content_type not in JSON_TYPES:
            raise UnsupportedMediaType(f"expected Content-Type application/json, not {self.content_type}")
        return parse_json(raw, default)

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
                self._body_done = True
                return
            if not message.get("more_body", False):
                self._body_done = True  # what is left is the disconnect: nothing to drain


def _refuse_constant(name: str) -> Any:
    raise InvalidJSON(f"request body is not valid JSON: {name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: valid JSON, but no number anything downstream can use
        raise InvalidJSON(f"request body holds a number too large for a float: {text[:40]}")
    return value


def nests_too_deep(raw: bytes, limit: int = limits.MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects nest more than ``limit`` deep in ``raw`` (brackets
    inside strings do not count).

    Checked before parsing: ``json.loads`` recurses once per level, and a body of a
    million ``[`` would cost the daemon a RecursionError deep in the parser.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # cannot nest that deep: skip the byte-by-byte walk
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def parse_json(raw: bytes, default: Any = None) -> Any:
    """Parse a JSON request body strictly: :class:`InvalidJSON` for malformed JSON,
    ``NaN``/``Infinity`` (Python's extension, no JSON) and absurd nesting."""
    if nests_too_deep(raw):
        raise InvalidJSON(f"request body nests arrays and objects deeper than {limits.MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidJSON("request body nests too deeply") from None
    return default if value is None else value


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(value: Any, status: int = 200) -> Response:
    # allow_nan=False: a NaN or Infinity that slipped into a shape is a bug to see, not
    # a body no JSON parser reads.
    body = json.dumps(value, ensure_ascii=False, default=str, allow_nan=False).encode()
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
    #: more response headers (the console's security headers)
    headers: list[tuple[str, str]] = field(default_factory=list)


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
        self._patterns: list[tuple[str, str]] = []
        #: each route's full pattern, what metrics label it by
        self._route_names: list[str] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        self._patterns.append((method, pattern))
        regex = re.sub(r":(\w+)", r"(?P<\1>[^/]+)", pattern)
        self._routes.append((method, re.compile(f"^{re.escape(self._prefix)}{regex}/?$"), handler))
        self._route_names.append(f"{self._prefix}{pattern}")

    def routes(self) -> list[tuple[str, str]]:
        """Every ``(method, pattern)`` added, in order (tests check each route's guard)."""
        return list(self._patterns)

    def resolve(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], list[str]]:
        """The handler and path parameters, or None and the methods the path has."""
        handler, params, allowed, _ = self.match(method, path)
        return handler, params, allowed

    def match(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], list[str], str]:
        """:meth:`resolve`, and the matching route's full pattern ("unmatched" for none)."""
        allowed: list[str] = []
        for index, (route_method, regex, handler) in enumerate(self._routes):
            match = regex.match(path)
            if match is None:
                continue
            if route_method == method or (method == "HEAD" and route_method == "GET"):
                return handler, match.groupdict(), [], self._route_names[index]
            allowed.append(route_method)
        return None, {}, allowed, "unmatched"


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
            "headers": [
                (b"content-type", response.content_type.encode()),
                (b"cache-control", b"no-store"),
                *((k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers),
            ],
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


#: What a before-route hook returns when it has answered the request itself (a proxy).
ANSWERED: Final = object()

#: A hook run before routing: a response, :data:`ANSWERED`, or None to route as usual.
BeforeRoute = Callable[[Request, Send], Awaitable["Response | StreamResponse | object | None"]]


class HttpDispatch:
    """The one ASGI ``http`` dispatch both daemons serve their API with.

    Routes through ``router``; every :class:`~spacehub.server.errors.HttpError` becomes
    its ``body()`` with its status, anything else is logged and answers 500 with
    ``internal_error``. Before an error is answered, a small unread request body is
    drained (:meth:`Request.drain`) so a client still sending it reads the answer.
    GET and HEAD handlers (long polls such as ``/event`` or ``/health``) are cancelled
    when their client goes away.
    """

    def __init__(
        self,
        router: Router,
        *,
        internal_error: str = "internal error; see the log",
        before_route: BeforeRoute | None = None,
        log: logging.Logger = logger,
        metrics: HttpMetrics | None = None,
    ) -> None:
        self._router = router
        self._internal_error = internal_error
        self._before_route = before_route
        self._log = log
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, {})
        began = time.monotonic()
        metrics = self._metrics
        sent = 0
        id_header = (b"x-request-id", request.id.encode())

        async def answer(message: dict[str, Any]) -> None:
            nonlocal sent
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-request-id" for name, _ in headers):  # a hub's, forwarded
                    headers.append(id_header)
                message = {**message, "headers": headers}
                if metrics is not None:
                    metrics.answered(request.route, request.method, int(message["status"]), began)
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        context = REQUEST_ID.set(request.id)
        if metrics is not None:
            metrics.open_streams += 1
        try:
            await self._serve(request, answer)
        finally:
            REQUEST_ID.reset(context)
            if metrics is not None:
                metrics.open_streams -= 1
                if request.bytes_read:
                    metrics.received.inc(request.route, amount=request.bytes_read)
                if sent:
                    metrics.sent.inc(request.route, amount=sent)

    async def _serve(self, request: Request, send: Send) -> None:
        response: Response | StreamResponse | object
        try:
            response = await self._respond(request, send)
        except HttpError as exc:
            response = json_response(exc.body(), exc.status)
        except trio.BrokenResourceError:
            return  # the client went away while sending its body; nobody to answer
        except Exception:  # noqa: BLE001 - any bug answers 500 and is logged, the daemon goes on
            self._log.exception(
                "internal error on %s %s", request.method, request.path, extra={"request": request.id}
            )
            response = error_response(500, self._internal_error)
        if isinstance(response, StreamResponse):
            await send_stream(send, request, response)
        elif isinstance(response, Response):
            if response.status >= 400:
                await request.drain()
                if not request.body_read:
                    # The rest of the body is still on its way: a connection that cannot be
                    # reused, holding unread megabytes and a descriptor. Close it after the answer.
                    response.headers.append(("connection", "close"))
            await send_response(send, response)
        # else ANSWERED: the hook sent its own response

    async def _respond(self, request: Request, send: Send) -> Response | StreamResponse | object:
        if self._before_route is not None:
            early = await self._before_route(request, send)
            if early is not None:
                return early
        handler, params, allowed, request.route = self._router.match(request.method, request.path)
        if handler is None:
            if allowed:
                raise MethodNotAllowed(
                    f"{request.method} is not allowed on {request.path};"
                    f" use {', '.join(sorted(set(allowed)))}"
                )
            raise NotFound(f"No such route: {request.method} {request.path}")
        request.params = params
        if request.method in ("GET", "HEAD"):
            # Long polls (/event, /once, /health) end when their client goes.
            answered = await _unless_disconnected(request, handler)
            return ANSWERED if answered is None else answered
        return await handler(request)


async def _unless_disconnected(request: Request, handler: Handler) -> Response | StreamResponse | None:
    """Run ``handler``; None if the client disconnected first. The handler's own
    error is raised as is (not wrapped in an exception group by the nursery)."""
    result: outcome.Outcome[Response | StreamResponse] | None = None
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            await request.wait_disconnect()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        # Exceptions only: a Cancelled (the client went, or the daemon stops) must stay
        # inside its cancel scope. Captured and re-raised after the nursery, it escaped its
        # scope and took hypercorn's whole server down with it (the console's pages, slow
        # under load, left by a browser that navigated on).
        try:
            result = outcome.Value(await handler(request))
        except Exception as exc:  # noqa: BLE001 - re-raised as is below, outside the nursery
            result = outcome.Error(exc)
        nursery.cancel_scope.cancel()
    return None if result is None else result.unwrap()
