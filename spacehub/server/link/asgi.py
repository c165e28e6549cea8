"""Serving a link stream with an ASGI app, and the websockets adapter for the link.

:func:`serve_asgi` turns one :class:`InboundStream` into one ASGI HTTP call: the
stream's request head becomes the scope, its body the ``http.request`` messages,
and the app's response goes back on the stream. ``send()`` of a body chunk waits
for the stream's window, so a reader at the far end that stops reading holds back
the app producing this response and nothing else. Credit for a request body chunk
goes back when the app calls ``receive()`` again (it has taken the chunk).

Only targets under ``path_prefix`` are served; any other is refused with a RESET
(``"target refused"``): the link reaches the hub's own API and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final
from urllib.parse import unquote

import trio
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import ClientConnection

from spacehub.protocol.link import MAX_BATCH_BYTES

from .session import InboundStream, LinkClosed, StreamAborted

__all__ = ["REFUSED_REASON", "ASGIApp", "WebsocketsTransport", "serve_asgi"]

logger = logging.getLogger("spacehub.server.link")

ASGIMessage = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[ASGIMessage]]
ASGISend = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], ASGIReceive, ASGISend], Awaitable[None]]

#: The RESET reason for a stream whose target is outside the served prefix.
REFUSED_REASON: Final = "target refused"
#: Longest declared body sent together with its head (a BATCH holds it and the head).
SHORT_BODY: Final = MAX_BATCH_BYTES // 2


def _scope(stream: InboundStream) -> dict[str, Any]:
    raw_path, _, query = stream.path.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": stream.method,
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode("ascii"),
        "query_string": query.encode("ascii"),
        "root_path": "",
        "headers": [
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in stream.headers
        ],
        "client": ("link", 0),
        "server": ("hub", 0),
        "extensions": {},
    }


async def serve_asgi(stream: InboundStream, app: ASGIApp, *, path_prefix: str = "/api/v1/") -> None:
    """Serve one stream with ``app``; refuses (RESET) targets outside ``path_prefix``."""
    raw_path = stream.path.partition("?")[0]
    if not (raw_path.startswith(path_prefix) and unquote(raw_path).startswith(path_prefix)):
        await stream.reset(REFUSED_REASON)
        return
    scope = _scope(stream)
    owed = 0  # bytes of the last chunk handed to the app, credited when it asks again
    body_done = False
    started = False
    finished = False
    #: a short response's head, held back to go with its body (see _short_length)
    held: tuple[int, list[tuple[str, str]]] | None = None

    async def receive() -> ASGIMessage:
        nonlocal owed, body_done
        if owed:
            await stream._credit(owed)
            owed = 0
        if not body_done and not finished:
            try:
                chunk = await stream._next_chunk()
            except (StreamAborted, LinkClosed):
                return {"type": "http.disconnect"}
            if chunk is None:
                body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            owed = len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": True}
        if not finished:
            await stream._wait_failed()
        return {"type": "http.disconnect"}

    async def send(message: ASGIMessage) -> None:
        nonlocal started, finished, held
        if finished or stream._error is not None:
            return  # the exchange is over; the app hears it from receive()
        try:
            if message["type"] == "http.response.start":
                if started:
                    raise RuntimeError("http.response.start sent twice")
                headers = [
                    (bytes(name).decode("latin-1"), bytes(value).decode("latin-1"))
                    for name, value in message.get("headers", [])
                ]
                if stream.batching and _short_length(headers):
                    held = (int(message["status"]), headers)
                else:
                    await stream.respond(int(message["status"]), headers)
                started = True
            elif message["type"] == "http.response.body":
                if not started:
                    raise RuntimeError("http.response.body before http.response.start")
                body = bytes(message.get("body", b""))
                more = message.get("more_body", False)
                if held is not None:
                    (status, headers), held = held, None
                    if not more:
                        await stream.respond_whole(status, headers, body)
                        finished = True
                        return
                    await stream.respond(status, headers)
                if body:
                    await stream.send(body)
                if not more:
                    await stream.end()
                    finished = True
        except (StreamAborted, LinkClosed):
            return

    try:
        await app(scope, receive, send)
    except (StreamAborted, LinkClosed):
        return
    except Exception:
        logger.exception("the app failed on %s %s over the link", stream.method, stream.path)
        if not started:
            try:
                await stream.respond(500, [("content-type", "application/json")])
                await stream.send(b'{"error": "internal error; see the hub log"}')
                await stream.end()
            except (StreamAborted, LinkClosed):
                pass
            return
        await stream.reset("internal error")
        return
    if not finished:
        await stream.reset("the app did not finish its response")
    elif not stream._remote_ended:
        # Answered before the request body was over (e.g. 413): nobody will read the rest.
        await stream.reset("response complete")


def _short_length(headers: list[tuple[str, str]]) -> bool:
    """Whether the app declared a body short enough to go with its head in one BATCH.

    Only then is the head held back until the body comes: a streamed answer (no length)
    must show its head at once, as hypercorn does, whenever its first bytes come.
    """
    for name, value in headers:
        if name.lower() == "content-length":
            return value.isdigit() and int(value) <= SHORT_BODY
    return False


class WebsocketsTransport:
    """A :class:`~spacehub.server.link.session.MessageTransport` over a ``websockets.trio`` client."""

    def __init__(self, websocket: ClientConnection) -> None:
        self._websocket = websocket
        #: trio time the last message arrived (or the transport was made): a liveness clock
        self.last_received = trio.current_time()

    async def send(self, message: bytes) -> None:
        try:
            await self._websocket.send(message)
        except ConnectionClosed as exc:
            raise LinkClosed(str(exc)) from None

    async def receive(self) -> bytes:
        try:
            message = await self._websocket.recv()
        except ConnectionClosed as exc:
            raise LinkClosed(str(exc)) from None
        self.last_received = trio.current_time()
        if isinstance(message, str):
            await self._websocket.aclose(1003, "the link carries binary messages only")
            raise LinkClosed("protocol error: a text message on the link")
        return message

    async def aclose(self) -> None:
        await self._websocket.aclose()
