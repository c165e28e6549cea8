"""The hub's ASGI application: routes by resource, errors to JSON in one place."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from spacehub.server.http import (
    HttpDispatch,
    Receive,
    Request,
    Response,
    Router,
    Scope,
    Send,
    answer_lifespan,
)

from ..metrics import hub_metrics

if TYPE_CHECKING:
    from ..service import Hub

API_BASE = "/api/v1"
#: Prometheus's default scrape path
METRICS_PATH = "/metrics"
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
    :class:`~agent.errors.HubError` becomes ``{"error": message}`` with its status), and
    ``GET /metrics`` beside ``/api/v1`` where Prometheus looks by default."""

    def __init__(self, hub: Hub) -> None:
        self.metrics, http_metrics = hub_metrics(hub)
        self._http = HttpDispatch(
            build_router(hub),
            internal_error="internal error; see the hub log",
            log=logger,
            metrics=http_metrics,
        )
        root = Router()
        root.add("GET", METRICS_PATH, self._scrape)
        self._root = HttpDispatch(root, log=logger, metrics=http_metrics)

    async def _scrape(self, request: Request) -> Response:
        body, content_type = self.metrics.render(request.header("accept") or "")
        return Response(200, body, content_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        elif scope["type"] == "http":
            if scope["path"] == METRICS_PATH:
                await self._root(scope, receive, send)
            else:
                await self._http(scope, receive, send)
        # websockets are not served by the hub's API
