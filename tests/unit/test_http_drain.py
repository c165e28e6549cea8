"""spacehub.server.http.Request.drain: a small unread body is read before an error is answered."""

from __future__ import annotations

from typing import Any

import trio

from spacehub.server.http import Request


def request_over(messages: list[dict[str, Any]], *, then_wait: bool = False) -> tuple[Request, list[int]]:
    """A Request whose receive() hands out ``messages`` (then blocks forever if ``then_wait``)."""
    taken: list[int] = []

    async def receive() -> dict[str, Any]:
        if messages:
            taken.append(1)
            return messages.pop(0)
        assert then_wait, "read past the end of the body"
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    scope = {"method": "POST", "path": "/topic/x", "headers": []}
    return Request(scope, receive, {}), taken


def body(chunk: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.request", "body": chunk, "more_body": more}


async def test_reads_a_small_body_to_its_end(autojump_clock: trio.abc.Clock) -> None:
    request, taken = request_over([body(b"a" * 10, True), body(b"b" * 10, True), body(b"", False)])
    await request.drain()
    assert len(taken) == 3
    await request.drain()  # nothing left: returns at once, reads nothing more
    assert len(taken) == 3


async def test_stops_past_the_limit(autojump_clock: trio.abc.Clock) -> None:
    request, taken = request_over([body(b"x" * 100, True) for _ in range(10)])
    await request.drain(limit=250)
    assert len(taken) == 3  # 300 bytes read: past 250, it gives up


async def test_stops_at_a_disconnect(autojump_clock: trio.abc.Clock) -> None:
    request, taken = request_over([body(b"x", True), {"type": "http.disconnect"}])
    await request.drain()
    assert len(taken) == 2


async def test_does_not_wait_for_a_stalled_client(autojump_clock: trio.abc.Clock) -> None:
    request, taken = request_over([body(b"x", True)], then_wait=True)
    began = trio.current_time()
    await request.drain(seconds=1.0)
    assert trio.current_time() - began == 1.0
    assert len(taken) == 1
