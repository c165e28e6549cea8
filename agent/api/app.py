"""The hub's ASGI application: routes by resource, errors to JSON in one place."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import outcome
import trio

from ..errors import HubError
from .http import (
    Handler,
    Receive,
    Request,
    Response,
    Router,
    Scope,
    Send,
    StreamResponse,
    answer_lifespan,
    error_response,
    send_response,
    send_stream,
)

if TYPE_CHECKING:
    from ..service import Hub

API_BASE = "/api/v1"
logger = logging.getLogger("agent.api")


def build_router(hub: Hub) -> Router:
    from . import hub as hub_routes
    from . import instances, sequences, topics

    router = Router(API_BASE)
    hub_routes.register(router, hub)
    sequences.register(router, hub)
    instances.register(router, hub)
    topics.register(router, hub)
    return router


class HubApp:
    """ASGI entry point. Every :class:`HubError` becomes ``{"error": message}``
    with its status; anything else is logged and answers 500."""

    def __init__(self, hub: Hub) -> None:
        self._router = build_router(hub)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets are not served by the hub's API
        handler, params, allowed = self._router.resolve(scope["method"], scope["path"])
        request = Request(scope, receive, params)
        response: Response | StreamResponse
        if handler is None:
            if allowed:
                response = error_response(
                    405,
                    f"{scope['method']} is not allowed on {scope['path']};"
                    f" use {', '.join(sorted(set(allowed)))}",
                )
            else:
                response = error_response(404, f"No such route: {scope['method']} {scope['path']}")
        else:
            try:
                if scope["method"] in ("GET", "HEAD"):
                    # Long polls (/event, /once, /health) end when their client goes.
                    answered = await _unless_disconnected(request, handler)
                    if answered is None:
                        return
                    response = answered
                else:
                    response = await handler(request)
            except HubError as exc:
                response = error_response(exc.status, exc.message)
            except trio.BrokenResourceError:
                return  # the client went away while sending its body; nobody to answer
            except Exception:
                logger.exception("internal error on %s %s", scope["method"], scope["path"])
                response = error_response(500, "internal error; see the hub log")
        if isinstance(response, StreamResponse):
            await send_stream(send, request, response)
        else:
            if response.status >= 400:
                await request.drain()
            await send_response(send, response)


async def _unless_disconnected(request: Request, handler: Handler) -> Response | StreamResponse | None:
    """Run ``handler``; None if the client disconnected first. The handler's own
    error is raised as is (not wrapped in an exception group by the nursery)."""
    result: outcome.Outcome[Response | StreamResponse] | None = None
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            await request.wait_disconnect()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        result = await outcome.acapture(handler, request)
        nursery.cancel_scope.cancel()
    return None if result is None else result.unwrap()
