"""The Space API: ``/api/v1/space/:space/api/v1/...``.

Every route here runs after the app has checked the bearer token for ``:space``.
Hub records and the aggregates come from the registry and from what each hub's
link last reported (:class:`cpm.link.sessions.HubSessions`); ``sth/:id/api/v1/...``
is carried to the hub itself.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

import trio

from spacehub.server.http import (
    Handler,
    Request,
    Response,
    Router,
    Send,
    StreamResponse,
    json_response,
    parse_bool_header,
)
from spacehub.server.load import load_check

from ..errors import HubNotFound, HubUnavailable, RegistryUnavailable
from ..link.sessions import forward
from ..registry import Hub, HubOwner
from ..replicas import forwarded
from ..topics import topic_listing

if TYPE_CHECKING:
    from ..service import Manager

__all__ = ["PROXY_PATH", "SPACE_BASE", "proxy", "register"]

SPACE_BASE: Final = "/api/v1/space/:space/api/v1"
#: ``sth/:id/api/v1`` and whatever follows, matched on the raw (still percent-encoded) path.
PROXY_PATH: Final = re.compile(rb"^/api/v1/space/([^/]+)/api/v1/sth/([^/]+)/api/v1(/[^?#]*)?$")


def register(router: Router, manager: Manager) -> None:
    sessions = manager.sessions

    async def hub_of(request: Request) -> Hub:
        hub = await sessions.db(manager.registry.get_hub, request.params["id"])
        if hub.space != request.params["space"]:
            raise HubNotFound(f"hub {request.params['id']!r} not found")
        return hub

    async def version(request: Request) -> Response:
        return json_response(manager.version_info())

    async def load(request: Request) -> Response:
        return json_response(await trio.to_thread.run_sync(load_check, [manager.config.data_dir]))

    async def hubs(request: Request) -> Response:
        space = request.params["space"]
        listed = await sessions.db(manager.registry.list_hubs, space, include_revoked=False)
        remote = await manager.replicas.remote_hubs(space)
        return json_response([sessions.record(hub, remote) for hub in listed])

    async def hub_info(request: Request) -> Response:
        hub = await hub_of(request)
        remote = await manager.replicas.remote_hubs(hub.space) if sessions.live(hub.id) is None else None
        return json_response(sessions.record(hub, remote))

    def aggregate(kind: str) -> Handler:
        async def handler(request: Request) -> Response:
            space = request.params["space"]
            # Hubs revoked while their link was down are not in the space any more.
            listed = await sessions.db(manager.registry.list_hubs, space, include_revoked=False)
            remote = await manager.replicas.remote_hubs(space)
            items = sessions.aggregate(space, kind, {hub.id for hub in listed}, remote)
            if kind == "topics":
                return json_response(topic_listing(manager.topics, space, items))
            if kind == "history" or _wants_detail(request):
                return json_response(items)
            return json_response(original_shape(kind, items))

        return handler

    async def topic_send(request: Request) -> Response:
        space, name = request.params["space"], request.params["name"]
        # As on a hub: x-end-stream ends this request's data, not the topic.
        end = parse_bool_header(request.header("x-end-stream"), False)
        await manager.topics.post(space, name, request.content_type, request.stream())
        return json_response({}, 200 if end else 202)

    async def topic_receive(request: Request) -> StreamResponse:
        space, name = request.params["space"], request.params["name"]
        topic, chunks, close = manager.topics.read(space, name, request.content_type)
        return StreamResponse(chunks, topic.content_type or "application/x-ndjson", on_close=close)

    router.add("GET", f"{SPACE_BASE}/version", version)
    router.add("POST", f"{SPACE_BASE}/topic/:name", topic_send)
    router.add("GET", f"{SPACE_BASE}/topic/:name", topic_receive)
    router.add("GET", f"{SPACE_BASE}/load", load)
    router.add("GET", f"{SPACE_BASE}/list", hubs)
    router.add("GET", f"{SPACE_BASE}/sth/:id/info", hub_info)
    router.add("GET", f"{SPACE_BASE}/sth/:id", hub_info)
    for kind in ("sequences", "instances", "topics"):
        router.add("GET", f"{SPACE_BASE}/{kind}", aggregate(kind))
    # Ended instances of every hub, newest first: those that started and ended while a
    # hub's link (or the hub) was down reach it at the hub's next heartbeat.
    router.add("GET", f"{SPACE_BASE}/instances/history", aggregate("history"))


def _wants_detail(request: Request) -> bool:
    """``?detail=true``: our richer listing (each item whole, naming its hub)."""
    values = parse_qs(request.scope.get("query_string", b"").decode("latin-1")).get("detail", [])
    return any(value.lower() in ("1", "true", "yes") for value in values)


def original_shape(kind: str, items: list[dict[str, Any]]) -> list[Any]:
    """The Space's listings as the seeds' API reference gives them, which the original's
    clients read: ``/sequences`` a list of ids; ``/instances`` one list per hub, holding
    each instance's id in a list of its own (``[[["id1"], ["id2"]], [["id3"]]]``)."""
    if kind == "sequences":
        return [item.get("id") for item in items]
    per_hub: dict[str, list[list[Any]]] = {}
    for item in items:
        per_hub.setdefault(str(item.get("hub")), []).append([item.get("id")])
    return list(per_hub.values())


def known_owner(manager: Manager, hub_id: str) -> tuple[str, HubOwner | None]:
    """The hub's space and owner as last read from the registry (it cannot be read now);
    :class:`RegistryUnavailable` if nothing was known of the hub."""
    standing = manager.sessions.known_standing.get(hub_id)
    if standing is None or standing[1] is not None:
        raise RegistryUnavailable()
    held = manager.sessions.known_owners.get(hub_id)
    peers = {peer.id: peer for peer in manager.replicas.peers}
    if held is None or held[0] not in peers:
        return standing[0], None
    peer = peers[held[0]]
    return standing[0], HubOwner(peer.id, held[1], peer.url, peer.seen)


async def proxy(manager: Manager, request: Request, send: Send, space: str, hub_id: str, rest: str) -> None:
    """Forward to hub ``hub_id`` of ``space`` as ``/api/v1<rest>`` with the same query string."""
    session = manager.sessions.live(hub_id)
    if session is None:
        # Not connected here: the registry tells "no such hub here" (404) from "offline"
        # (503) and, with replicas, which replica holds its link (cpm/replicas.py).
        try:
            hub = await manager.sessions.db(manager.registry.get_hub, hub_id)
            hub_space = hub.space
            owner = None
            if manager.replicas.active and not forwarded(request) and hub_space == space:
                owner = await manager.sessions.db(manager.registry.hub_owner, hub_id)
        except RegistryUnavailable:
            # The database is down: what the watchdog last read of it still routes the call.
            hub_space, owner = known_owner(manager, hub_id)
        if hub_space != space:
            raise HubNotFound(f"hub {hub_id!r} not found")
        if owner is not None and owner.replica != manager.id and not forwarded(request):
            await manager.replicas.forward(owner, request, send)
            return
        raise HubUnavailable(f"Hub {hub_id} is not connected")
    if session.space != space:  # a live link was authenticated for its space: no registry trip
        raise HubNotFound(f"hub {hub_id!r} not found")
    target = f"/api/v1{rest}"
    query = request.scope.get("query_string", b"")
    if query:
        target += "?" + query.decode("latin-1")
    await forward(session, request, send, target)
