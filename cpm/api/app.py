"""The manager's ASGI application: HTTP routes, hubs' websockets, errors to JSON in one place.

Paths::

    GET  /api/v1/version                      public
    GET  /api/v1/ca.pem                       public (hubs pin it by fingerprint)
    GET  /api/v1/spaces                       the spaces the bearer token opens
    WS   /api/v1/link                         a hub's link (it authenticates in the link)
    ...  /api/v1/space/:space/api/v1/...      the Space API, bearer token of that space
    GET  /install.sh, /install/...            public: what a new hub installs (api/joining.py)
    POST /api/v1/space/:space/api/v1/console-login  a one-time console login link
    GET  /, /console/...                      the console (cpm/console/app.py)

A Space API call without a valid token of that space answers 403
``{"message": "Forbidden"}`` before any routing, so it tells nothing about what
exists. Every other :class:`~cpm.errors.ManagerError` becomes ``{"error": message}``
with its status; anything else is logged and answers 500.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

import trio

from spacehub.models import SpaceRecord
from spacehub.server.config import is_loopback
from spacehub.server.http import (
    ANSWERED,
    HttpDispatch,
    Receive,
    Request,
    Response,
    Router,
    Scope,
    Send,
    answer_lifespan,
    error_response,
    json_response,
)

from ..console.app import Console
from ..console.app import register as register_console
from ..console.auth import LOGIN_LINK_SECONDS, same_secret
from ..errors import Forbidden
from ..faults import Faults
from ..link.transport import AsgiWebSocketTransport
from ..metrics import ManagerMetrics, metrics_token
from ..replicas import PEER_LINK_PATH, forwarded
from . import joining as joining_routes
from . import space as space_routes
from .tokens import DatabaseVersion, TokenCache

if TYPE_CHECKING:
    from ..service import Manager

__all__ = ["LINK_PATH", "ManagerApp"]

logger = logging.getLogger("cpm.api")
#: Prometheus's default scrape path
METRICS_PATH: Final = "/metrics"

API_BASE: Final = "/api/v1"
LINK_PATH: Final = "/api/v1/link"
_SPACE_PREFIX: Final = re.compile(r"^/api/v1/space/([^/]+)(?:/|$)")
#: The Space API's topic routes: /topics, /topic/:name
_TOPIC_PATH: Final = re.compile(rb"^/api/v1/space/[^/]+/api/v1/topics?(?:/[^/]+)?/?$")


def build_router(manager: Manager) -> Router:
    router = Router()

    async def version(request: Request) -> Response:
        return json_response(manager.version_info())

    async def ca_pem(request: Request) -> Response:
        pem = manager.ca_pem()
        if pem is None:
            return error_response(404, "This manager has no CA certificate to show (TLS is off or external)")
        return Response(200, pem, "application/x-pem-file")

    async def spaces(request: Request) -> Response:
        token = _bearer(request)
        if token is None:
            raise Forbidden()
        registry = manager.registry

        def opened() -> list[SpaceRecord]:
            return [s.record() for s in registry.list_spaces() if registry.check_api_token(s.name, token)]

        records = await trio.to_thread.run_sync(opened)
        if not records:
            raise Forbidden()
        return json_response(records)

    async def status(request: Request) -> Response:
        return json_response(manager.status())

    router.add("GET", f"{API_BASE}/version", version)
    router.add("GET", f"{API_BASE}/status", status)
    router.add("GET", f"{API_BASE}/ca.pem", ca_pem)
    router.add("GET", f"{API_BASE}/spaces", spaces)
    space_routes.register(router, manager)
    joining_routes.register(router, manager)
    return router


def _bearer(request: Request) -> str | None:
    value = request.header("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class ManagerApp:
    """ASGI entry point; see the module docstring."""

    def __init__(self, manager: Manager) -> None:
        self._manager = manager
        self._router = build_router(manager)
        # Calls other replicas forward here are served by this same app (cpm/replicas.py).
        manager.replicas.app = self
        registry = manager.registry

        async def check(space: str, token: str) -> bool:
            return await trio.to_thread.run_sync(registry.check_api_token, space, token)

        # An in-memory registry has no file another connection could watch: no caching then.
        # A shared one (PostgreSQL): the change counter the watchdog keeps reading.
        version: Callable[[], int | None]
        if registry.shared:
            version = lambda: manager.sessions.registry_version  # noqa: E731
        elif registry.path != ":memory:":
            version = DatabaseVersion(registry.path)
        else:
            version = lambda: None  # noqa: E731
        self._tokens = TokenCache(check, version, trio.current_time)
        self.console = Console(manager, self._tokens.allows)
        register_console(self._router, self.console)
        self._router.add("POST", f"{API_BASE}/space/:space/api/v1/console-login", self._console_login)
        self.metrics = ManagerMetrics(manager)
        self._metrics_token = metrics_token(manager.config.data_dir)
        self._router.add("GET", METRICS_PATH, self._scrape)
        self._router.add("GET", f"{API_BASE}/openapi.json", self._openapi)
        if manager.faults is not None:
            self._router.add("POST", f"{API_BASE}/faults", self._inject_fault)
            self._router.add("DELETE", f"{API_BASE}/faults", self._clear_faults)
        self._http = HttpDispatch(
            self._router,
            internal_error="internal error; see the manager log",
            before_route=self._before_route,
            log=logger,
            metrics=self.metrics.http,
        )

    def _faults(self, request: Request) -> Faults:
        """The faults, for a caller on loopback only (cpm/faults.py)."""
        client = request.scope.get("client")
        if self._manager.faults is None or not client or not is_loopback(str(client[0])):
            raise Forbidden()
        return self._manager.faults

    async def _inject_fault(self, request: Request) -> Response:
        faults = self._faults(request)
        applied = faults.apply(await request.json(default={}))
        cut = await self._manager.sessions.cut(applied["hub"]) if applied["cut"] else []
        logger.warning("fault injected: %s", applied)
        return json_response({**applied, "cutHubs": cut})

    async def _clear_faults(self, request: Request) -> Response:
        self._faults(request).clear()
        logger.warning("faults cleared")
        return json_response({"cleared": True})

    async def _openapi(self, request: Request) -> Response:
        from .openapi import manager_openapi

        return json_response(manager_openapi(self._manager.faults is not None))

    async def _scrape(self, request: Request) -> Response:
        """Prometheus's scrape, with the metrics token (cpm/metrics.py says why a token)."""
        if not same_secret(_bearer(request), self._metrics_token):
            raise Forbidden()
        body, content_type = await self.metrics.scrape(request.header("accept") or "")
        return Response(200, body, content_type)

    async def _console_login(self, request: Request) -> Response:
        """A one-time link that signs a browser in to the console with the caller's token
        (``make run`` prints one): the token itself never goes into a URL."""
        token = _bearer(request)
        if token is None:  # the gate let it through, so there is one
            raise Forbidden()
        code = self.console.sessions.create_login_link(request.params["space"], token)
        return json_response({"path": f"/console/login/once/{code}", "expiresIn": LOGIN_LINK_SECONDS})

    @property
    def router(self) -> Router:
        return self._router

    # Not a coroutine function: it hands back the handler's coroutine, so a link (5,000 of
    # them idle on a fleet) does not keep one more suspended frame for its whole life.
    # hypercorn is told it is an ASGI app (it would guess WSGI from a plain __call__).
    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        kind = scope["type"]
        if kind == "websocket":
            return self._websocket(scope, receive, send)
        if kind == "http":
            return self._http(scope, receive, send)
        if kind == "lifespan":
            return answer_lifespan(receive, send)
        return _ignore()

    def _websocket(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Hands back the link's coroutine too (see __call__): its chain is all a link keeps.
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "?"
        if scope["path"] == PEER_LINK_PATH:  # another replica (cpm/replicas.py)
            replicas = self._manager.replicas
            authorization = None
            for name, value in scope.get("headers", []):
                if name.lower() == b"authorization":
                    authorization = value.decode("latin-1")
            if not replicas.admits(authorization):
                logger.warning("refused a peer link from %s: not a replica of this Space", peer)
                return _refuse_websocket(receive, send)
            return replicas.serve_peer(AsgiWebSocketTransport(receive, send), peer)
        if scope["path"] != LINK_PATH:
            return _refuse_websocket(receive, send)
        transport = AsgiWebSocketTransport(receive, send)
        transport.faults = self._manager.faults
        return self._manager.sessions.serve(transport, peer)

    async def _before_route(self, request: Request, send: Send) -> object | None:
        """The Space API's gate: a bearer token of the space, checked before any routing,
        so a refused call learns nothing of what exists; calls for a hub are proxied
        (answered by the proxy itself). None: route as usual."""
        space_match = _SPACE_PREFIX.match(request.path)
        if space_match is None:
            return None
        space = space_match.group(1)
        request.route = f"{API_BASE}/space/:space/*"  # until routed; metrics label by it
        token = _bearer(request)
        if token is None or not await self._tokens.allows(space, token):
            raise Forbidden()
        raw_path: bytes = request.scope.get("raw_path") or request.path.encode()
        replicas = self._manager.replicas
        if replicas.active and _TOPIC_PATH.match(raw_path) and not forwarded(request):
            # The Space-wide topics are kept by one replica (cpm/replicas.py).
            home = await replicas.topics_home()
            if home is not None:
                request.route = f"{API_BASE}/space/:space/api/v1/topic*"
                await replicas.forward_to_home(home, request, send)
                return ANSWERED
        proxied = space_routes.PROXY_PATH.match(raw_path)
        if proxied is None:
            return None
        request.route = f"{API_BASE}/space/:space/api/v1/sth/:id/*"
        hub_id = unquote(proxied.group(2).decode("latin-1"))
        rest = (proxied.group(3) or b"").decode("latin-1")
        await space_routes.proxy(self._manager, request, send, space, hub_id, rest)
        return ANSWERED


async def _refuse_websocket(receive: Receive, send: Send) -> None:
    await receive()  # websocket.connect
    await send({"type": "websocket.close", "code": 1008})  # before accept: hypercorn answers 403


async def _ignore() -> None:
    """An ASGI scope type this app does not serve."""
