"""Hub-wide routes: version, config, status, load-check, log, entities."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio

from spacehub import build
from spacehub.server.http import Request, Response, Router, StreamResponse, json_response
from spacehub.server.load import load_check

from .. import __version__
from ..hublog import encode_record

if TYPE_CHECKING:
    from ..service import Hub


def count_tasks() -> int:
    """How many Trio tasks this hub runs now: a count that only grows would be a leak."""
    count = 0
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count


def register(router: Router, hub: Hub) -> None:
    async def version(request: Request) -> Response:
        return json_response(hub.version_info())

    async def config(request: Request) -> Response:
        return json_response({**hub.config.public(), "id": hub.id})

    async def status(request: Request) -> Response:
        cpm = hub.link.status() if hub.link is not None else {}
        return json_response(
            {
                "id": hub.id,
                "product": "spacehub",
                "version": __version__,
                "build": build(),
                "cpm": cpm,
                **({"spaceTopics": hub.space_topics.status()} if hub.space_topics is not None else {}),
                "uptime": hub.uptime(),
                "tasks": count_tasks(),
            }
        )

    async def load(request: Request) -> Response:
        paths = [hub.config.sequences_root]
        return json_response(await trio.to_thread.run_sync(load_check, paths))

    async def log(request: Request) -> StreamResponse:
        async def lines() -> AsyncIterator[bytes]:
            async for missed, record in hub.log_ring.follow():
                if missed:
                    yield encode_record(
                        {"level": "WARN", "from": "Hub", "msg": f"{missed} log records skipped"}
                    )
                yield encode_record(record)

        return StreamResponse(lines(), "application/x-ndjson")

    async def entities(request: Request) -> Response:
        return json_response(
            {
                "sequences": [s.info() for s in hub.store.list()],
                "instances": [i.info() for i in hub.supervisor.list()],
            }
        )

    router.add("GET", "/version", version)
    router.add("GET", "/config", config)
    router.add("GET", "/status", status)
    router.add("GET", "/load-check", load)
    router.add("GET", "/log", log)
    router.add("GET", "/entities", entities)

    async def openapi(request: Request) -> Response:
        from .openapi import hub_openapi

        return json_response(hub_openapi())

    router.add("GET", "/openapi.json", openapi)
