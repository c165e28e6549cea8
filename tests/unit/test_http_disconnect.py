"""A client that leaves while a GET handler is still working: the handler is cancelled and
the dispatch returns quietly. (Its Cancelled once escaped its cancel scope, and hypercorn's
whole server stopped: the console's slow pages, left by a browser that navigated on.)"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from spacehub.server.errors import NotFound
from spacehub.server.http import HttpDispatch, Request, Response, Router, json_response


def app_with(handler: Any) -> HttpDispatch:
    router = Router()
    router.add("GET", "/slow", handler)
    return HttpDispatch(router)


async def serve(app: HttpDispatch, leave_after: float) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"", "more_body": False}
        await trio.sleep(leave_after)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": "GET", "path": "/slow", "headers": []}, receive, send)
    return sent


async def test_a_client_leaving_a_slow_get_ends_it_quietly(autojump_clock: Any) -> None:
    cancelled = []

    async def slow(request: Request) -> Response:
        try:
            await trio.sleep(10)
        except trio.Cancelled:
            cancelled.append(trio.current_time())
            raise
        return json_response({})

    escaped: list[BaseException] = []
    with trio.fail_after(5):
        try:
            sent = await serve(app_with(slow), leave_after=1)
        except trio.Cancelled as exc:  # not ours to see: caught here, or the runner eats it
            escaped.append(exc)
            sent = []
    assert not escaped, f"a Cancelled escaped its cancel scope: {escaped}"
    assert sent == [] and cancelled == [pytest.approx(1)]


async def test_a_handler_error_is_still_answered(autojump_clock: Any) -> None:
    async def missing(request: Request) -> Response:
        await trio.sleep(0.1)
        raise NotFound("no such thing")

    sent = await serve(app_with(missing), leave_after=100)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 404
    assert b"no such thing" in b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def test_a_quick_answer_is_sent(autojump_clock: Any) -> None:
    async def quick(request: Request) -> Response:
        return json_response({"ok": True})

    sent = await serve(app_with(quick), leave_after=100)
    assert next(m for m in sent if m["type"] == "http.response.start")["status"] == 200
