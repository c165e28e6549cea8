"""The hub's ASGI application: routes by resource, errors to JSON in one place."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from spacehub.server.http import HttpDispatch, Receive, Router, Scope, Send, answer_lifespan

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
    """ASGI entry point: the shared dispatch over the hub's routes (every
    :class:`~agent.errors.HubError` becomes ``{"error": message}`` with its status)."""

    def __init__(self, hub: Hub) -> None:
        self._http = HttpDispatch(
            build_router(hub), internal_error="internal error; see the hub log", log=logger
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # websockets are not served by the hub's API
