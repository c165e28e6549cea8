"""Topic routes: stream into and out of topics; list, create, delete them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from spacehub.server.http import Request, Response, Router, StreamResponse, json_response, parse_bool_header

from ..errors import BadRequest

if TYPE_CHECKING:
    from ..service import Hub


def register(router: Router, hub: Hub) -> None:
    topics = hub.topics

    async def list_topics(request: Request) -> Response:
        return json_response([t.info() for t in topics.list()])

    async def create(request: Request) -> Response:
        body: Any = await request.json(default={})
        if not isinstance(body, dict):
            raise BadRequest('expected {"id": "<name>", "content-type": "<type>"}')
        name = body.get("id") or body.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("Missing body param: id")
        content_type = body.get("content-type") or body.get("contentType")
        if content_type is not None and not isinstance(content_type, str):
            raise BadRequest("content-type must be a string")
        topic = topics.create(name, content_type)
        return json_response(
            {"id": topic.name, "origin": {"id": hub.id, "type": "hub"}, "contentType": topic.content_type}
        )

    async def delete(request: Request) -> Response:
        topics.delete(request.params["name"])
        return json_response({"message": f"Topic {request.params['name']} removed"})

    async def send(request: Request) -> Response:
        topic = topics.ensure(request.params["name"], request.content_type)
        # x-end-stream: true ends this request's data, not the topic (later producers go
        # on into it); it only changes the status, as on the original.
        end = parse_bool_header(request.header("x-end-stream"), False)
        await topics.write(topic, request.stream(), who="api")
        return json_response({}, 200 if end else 202)

    async def receive(request: Request) -> StreamResponse:
        # The original's clients name the type with a Content-Type header, on a GET.
        topic = topics.ensure(request.params["name"], request.content_type)
        reader = topics.subscribe(topic, who="api")

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in reader:
                yield chunk

        return StreamResponse(chunks(), topic.content_type, on_close=reader.close)

    router.add("GET", "/topics", list_topics)
    router.add("POST", "/topics", create)
    router.add("DELETE", "/topics/:name", delete)
    router.add("POST", "/topic/:name", send)
    router.add("GET", "/topic/:name", receive)
