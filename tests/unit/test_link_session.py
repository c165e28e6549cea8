"""The link's Trio shell: two LinkSessions over an in-memory transport pair.

Rules for these tests: every wait is bounded by ``trio.fail_after``; the two ends
talk through ``memory_transport_pair()`` (bounded channels, so a session that
stopped reading would show up as a hang); "blocked" is asserted with
``trio.testing.wait_all_tasks_blocked()``, never with sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from spacehub.protocol.link import (
    INITIAL_WINDOW,
    MAX_CONCURRENT_STREAMS,
    MAX_WINDOW,
    FrameType,
    LinkConnection,
)
from spacehub.server.link import (
    InboundStream,
    LinkClosed,
    LinkSession,
    MessageTransport,
    StreamAborted,
    memory_transport_pair,
    serve_asgi,
)

Handler = Callable[[InboundStream], Awaitable[None]]
Control = Callable[[dict[str, Any]], Awaitable[None]]


@asynccontextmanager
async def pair(
    on_stream: Handler | None = None,
    *,
    hub_control: Control | None = None,
    manager_control: Control | None = None,
) -> AsyncIterator[tuple[LinkSession, LinkSession]]:
    """A running manager session and hub session; both closed on exit."""
    a, b = memory_transport_pair()
    manager = LinkSession(LinkConnection("manager"), a, on_control=manager_control)
    hub = LinkSession(LinkConnection("hub"), b, on_stream=on_stream, on_control=hub_control)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await nursery.start(hub.run)
        yield manager, hub
        manager.close()
        hub.close()


async def collect(body: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in body])


async def chunks_of(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def upper_echo(stream: InboundStream) -> None:
    body = await collect(stream.body())
    await stream.respond(200, [("content-type", "text/plain"), ("x-path", stream.path)])
    await stream.send(body.upper())
    await stream.end()


async def test_request_response_round_trip() -> None:
    with trio.fail_after(5):
        async with pair(upper_echo) as (manager, _):
            stream = await manager.open_stream("POST", "/api/v1/echo?x=1", [("content-type", "text/plain")])
            await stream.send_body(chunks_of(b"hello link"))
            status, headers = await stream.response()
            assert status == 200
            assert ("x-path", "/api/v1/echo?x=1") in headers
            assert await collect(stream.body()) == b"HELLO LINK"


async def test_twenty_concurrent_streams() -> None:
    results: dict[int, bytes] = {}

    async def one(manager: LinkSession, n: int) -> None:
        stream = await manager.open_stream("POST", f"/api/v1/n/{n}", [])
        await stream.send_body(chunks_of(f"stream {n} ".encode() * 5000, 7000))
        assert (await stream.response())[0] == 200
        results[n] = await collect(stream.body())

    with trio.fail_after(10):
        async with pair(upper_echo) as (manager, _), trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(one, manager, n)
    assert results == {n: f"STREAM {n} ".encode() * 5000 for n in range(20)}


async def test_stalled_reader_holds_back_only_its_own_stream() -> None:
    hub_streams: dict[str, InboundStream] = {}
    controls: list[dict[str, Any]] = []

    async def handler(stream: InboundStream) -> None:
        hub_streams[stream.path] = stream
        await stream.respond(200, [])
        if stream.path == "/api/v1/firehose":
            while True:  # produces until the window stops it
                await stream.send(b"x" * 65536)
        await stream.send(b"small")
        await stream.end()

    async def on_control(message: dict[str, Any]) -> None:
        controls.append(message)

    with trio.fail_after(5):
        async with pair(handler, manager_control=on_control) as (manager, hub):
            firehose = await manager.open_stream("GET", "/api/v1/firehose", [])
            await firehose.end()
            await firehose.response()
            # Nobody reads the firehose: the hub's writer must block on the window.
            await trio.testing.wait_all_tasks_blocked()
            assert firehose.buffered == INITIAL_WINDOW
            # Other streams and control messages still pass, in both directions.
            for n in range(3):
                other = await manager.open_stream("GET", "/api/v1/other", [])
                await other.end()
                assert await other.response() == (200, [])
                assert await collect(other.body()) == b"small"
                await hub.send_control({"type": "heartbeat", "n": n})
            await trio.testing.wait_all_tasks_blocked()
            assert [m["n"] for m in controls] == [0, 1, 2]
            assert firehose.buffered == INITIAL_WINDOW  # still held back, never more
            # Reading the firehose again makes it flow again.
            taken = 0
            async for chunk in firehose.body():
                taken += len(chunk)
                if taken > 4 * INITIAL_WINDOW:
                    break
            assert firehose.peak_buffered <= INITIAL_WINDOW
            await firehose.reset("enough")


async def test_slow_control_handler_does_not_block_streams() -> None:
    release = trio.Event()
    seen: list[int] = []

    async def on_control(message: dict[str, Any]) -> None:
        await release.wait()
        seen.append(message["n"])

    with trio.fail_after(5):
        async with pair(upper_echo, hub_control=on_control) as (manager, _):
            for n in range(10):
                await manager.send_control({"type": "x", "n": n})
            stream = await manager.open_stream("POST", "/api/v1/echo", [])
            await stream.send_body(chunks_of(b"abc"))
            assert await collect(stream.body()) == b"ABC"
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            assert seen == list(range(10))


async def test_eight_mib_each_way_with_bounded_buffers() -> None:
    size = 8 * 1024 * 1024
    hub_side: list[InboundStream] = []

    async def streaming_echo(stream: InboundStream) -> None:
        hub_side.append(stream)
        await stream.respond(200, [])
        async for chunk in stream.body():
            await stream.send(chunk)
        await stream.end()

    data = bytes(range(256)) * (size // 256)
    with trio.fail_after(30):
        async with pair(streaming_echo) as (manager, _):
            stream = await manager.open_stream("PUT", "/api/v1/big", [])
            received = bytearray()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_body, chunks_of(data, 300_000))
                await stream.response()
                async for chunk in stream.body():
                    received += chunk
    assert bytes(received) == data
    assert 0 < stream.peak_buffered <= INITIAL_WINDOW <= MAX_WINDOW
    assert 0 < hub_side[0].peak_buffered <= INITIAL_WINDOW


async def test_reset_by_the_hub_reaches_the_manager() -> None:
    async def refuse(stream: InboundStream) -> None:
        await stream.reset("no thanks")

    with trio.fail_after(5):
        async with pair(refuse) as (manager, _):
            stream = await manager.open_stream("GET", "/api/v1/x", [])
            with pytest.raises(StreamAborted, match="no thanks"):
                await stream.response()
            with pytest.raises(StreamAborted):
                await stream.end()


async def test_reset_by_the_manager_reaches_the_hub() -> None:
    outcome: list[BaseException] = []
    done = trio.Event()

    async def reader(stream: InboundStream) -> None:
        try:
            await collect(stream.body())
        except StreamAborted as exc:
            outcome.append(exc)
            with pytest.raises(StreamAborted):
                await stream.respond(200, [])
        done.set()

    with trio.fail_after(5):
        async with pair(reader) as (manager, _):
            stream = await manager.open_stream("POST", "/api/v1/x", [])
            await trio.testing.wait_all_tasks_blocked()
            await stream.reset("changed my mind")
            await done.wait()
    assert "changed my mind" in str(outcome[0])


async def test_transport_closing_fails_open_streams() -> None:
    entered = trio.Event()
    hub_errors: list[BaseException] = []

    async def waits(stream: InboundStream) -> None:
        entered.set()
        try:
            await collect(stream.body())
        except LinkClosed as exc:
            hub_errors.append(exc)
            raise

    with trio.fail_after(5):
        async with pair(waits) as (manager, hub):
            stream = await manager.open_stream("POST", "/api/v1/x", [])
            await entered.wait()
            await trio.testing.wait_all_tasks_blocked()
            hub.close()  # the hub's transport goes; the manager's session sees it end
            with pytest.raises(LinkClosed):
                await stream.response()
            with pytest.raises(LinkClosed):
                await manager.send_control({"type": "x"})
            assert manager.closed and hub.closed
            assert manager.close_reason is not None and "transport closed" in manager.close_reason
    # The hub's handler was cancelled or saw LinkClosed; either way it is over.
    assert all(isinstance(exc, LinkClosed) for exc in hub_errors)


async def test_on_control_error_ends_the_session_and_is_raised() -> None:
    class Revoked(Exception):
        pass

    async def on_control(message: dict[str, Any]) -> None:
        raise Revoked(message["reason"])

    a, b = memory_transport_pair()
    manager = LinkSession(LinkConnection("manager"), a)
    hub = LinkSession(LinkConnection("hub"), b, on_control=on_control)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            await manager.send_control({"type": "revoked", "reason": "bye"})
            with pytest.raises(Revoked, match="bye"):
                await hub.run()
    assert manager.closed


async def test_streams_over_the_limit_are_refused_with_the_reply_sent() -> None:
    a, b = memory_transport_pair(buffer=1024)
    raw = LinkConnection("manager")
    hub = LinkSession(LinkConnection("hub"), b, on_stream=lambda s: trio.sleep_forever())
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            ids = []
            for _ in range(MAX_CONCURRENT_STREAMS):
                stream_id, frame = raw.open_stream("GET", "/api/v1/x", [])
                ids.append(stream_id)
                await a.send(frame)
            raw.reset_stream(ids[0], "forgotten here, but never sent")
            extra, frame = raw.open_stream("GET", "/api/v1/x", [])
            await a.send(frame)
            reply = await a.receive()
            assert reply[0] == FrameType.RESET and int.from_bytes(reply[1:5], "big") == extra
            hub.close()


async def test_close_before_run_returns_at_once() -> None:
    a, _ = memory_transport_pair()
    session = LinkSession(LinkConnection("hub"), a)
    session.close()
    with trio.fail_after(1):
        await session.run()
    assert session.closed
    with pytest.raises(LinkClosed):
        await session.send_control({"type": "x"})


# --- serve_asgi ----------------------------------------------------------------------------------------


DISCONNECTS: list[str] = []


async def tiny_app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> None:
    assert scope["type"] == "http"
    if scope["path"] == "/api/v1/echo":
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 201, "headers": [(b"x-echo", b"1")]})
        await send({"type": "http.response.body", "body": body})
    elif scope["path"] == "/api/v1/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for n in range(5):
            await send({"type": "http.response.body", "body": f"line {n}\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    elif scope["path"] == "/api/v1/scope/a b":
        info = {
            key: scope[key]
            for key in ("method", "path", "raw_path", "query_string", "client", "server", "scheme")
        }
        info["headers"] = scope["headers"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": repr(info).encode()})
    elif scope["path"] == "/api/v1/short":
        body = b'{"short": true}'
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif scope["path"] == "/api/v1/slow":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await SLOW_GO.wait()
        await send({"type": "http.response.body", "body": b"late"})
    elif scope["path"] == "/api/v1/disconnect":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        DISCONNECTS.append((await receive())["type"])
        DISCONNECTS.append((await receive())["type"])
    else:
        raise RuntimeError("boom")


SLOW_GO = trio.Event()


async def serve_tiny(stream: InboundStream) -> None:
    await serve_asgi(stream, tiny_app)


async def test_serve_asgi_echo_streaming_and_scope() -> None:
    with trio.fail_after(5):
        async with pair(serve_tiny) as (manager, _):
            echo = await manager.open_stream("POST", "/api/v1/echo", [])
            await echo.send_body(chunks_of(b"z" * 1_000_000, 65536))
            assert await echo.response() == (201, [("x-echo", "1")])
            assert await collect(echo.body()) == b"z" * 1_000_000

            lines = await manager.open_stream("GET", "/api/v1/stream", [])
            await lines.end()
            assert (await lines.response())[0] == 200
            assert await collect(lines.body()) == b"".join(f"line {n}\n".encode() for n in range(5))

            scoped = await manager.open_stream("GET", "/api/v1/scope/a%20b?q=1&r=2", [("X-Thing", "Yes")])
            await scoped.end()
            info = (await collect(scoped.body())).decode()
            assert "'path': '/api/v1/scope/a b'" in info
            assert "'raw_path': b'/api/v1/scope/a%20b'" in info
            assert "'query_string': b'q=1&r=2'" in info
            assert "(b'x-thing', b'Yes')" in info
            assert "'client': ('link', 0)" in info and "'server': ('hub', 0)" in info

            broken = await manager.open_stream("GET", "/api/v1/broken", [])
            await broken.end()
            assert (await broken.response())[0] == 500


async def test_serve_asgi_refuses_other_targets() -> None:
    with trio.fail_after(5):
        async with pair(serve_tiny) as (manager, _):
            for target in ("/other", "/api/v2/x", "/api/v1", "/api%2fv1/x"):
                stream = await manager.open_stream("GET", target, [])
                with pytest.raises(StreamAborted, match="target refused"):
                    await stream.response()


async def test_serve_asgi_tells_the_app_about_a_reset() -> None:
    with trio.fail_after(5):
        async with pair(serve_tiny) as (manager, _):
            stream = await manager.open_stream("GET", "/api/v1/disconnect", [])
            await stream.end()
            await stream.response()
            await stream.reset("client went away")
            await trio.testing.wait_all_tasks_blocked()
    assert DISCONNECTS == ["http.request", "http.disconnect"]


async def test_on_control_nowait_is_called_in_order_without_a_control_task() -> None:
    seen: list[dict[str, Any]] = []
    a, b = memory_transport_pair()
    manager = LinkSession(LinkConnection("manager"), a, on_control_nowait=seen.append)
    hub = LinkSession(LinkConnection("hub"), b)
    assert manager._control_send is None  # no channel kept for an idle link
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            await nursery.start(hub.run)
            for n in range(3):
                await hub.send_control({"type": "heartbeat", "n": n})
            await trio.testing.wait_all_tasks_blocked()
            assert [message["n"] for message in seen] == [0, 1, 2]
            manager.close()
            hub.close()


async def test_on_control_nowait_error_ends_the_session_and_is_raised() -> None:
    def on_control(message: dict[str, Any]) -> None:
        raise ValueError(message["reason"])

    a, b = memory_transport_pair()
    manager = LinkSession(LinkConnection("manager"), a, on_control_nowait=on_control)
    hub = LinkSession(LinkConnection("hub"), b)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            await hub.send_control({"type": "x", "reason": "bye"})
            with pytest.raises(ValueError, match="bye"):
                await manager.run()
    assert manager.closed


def test_on_control_and_on_control_nowait_exclude_each_other() -> None:
    a, _ = memory_transport_pair()

    async def on_control(message: dict[str, Any]) -> None:
        pass

    with pytest.raises(ValueError):
        LinkSession(LinkConnection("manager"), a, on_control=on_control, on_control_nowait=print)


class CountingTransport:
    """A transport that keeps every message it sends."""

    def __init__(self, inner: MessageTransport) -> None:
        self.inner = inner
        self.sent: list[bytes] = []

    async def send(self, message: bytes) -> None:
        self.sent.append(message)
        await self.inner.send(message)

    async def receive(self) -> bytes:
        return await self.inner.receive()

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def counted_pair(
    batching: bool,
) -> AsyncIterator[tuple[LinkSession, CountingTransport, CountingTransport]]:
    a, b = memory_transport_pair()
    to_hub, to_manager = CountingTransport(a), CountingTransport(b)
    manager = LinkSession(LinkConnection("manager"), to_hub)
    hub = LinkSession(LinkConnection("hub"), to_manager, on_stream=serve_tiny)
    manager.batching = hub.batching = batching
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await nursery.start(hub.run)
        yield manager, to_hub, to_manager
        manager.close()
        hub.close()


async def test_a_short_call_is_one_message_each_way_to_a_peer_that_batches() -> None:
    with trio.fail_after(5):
        async with counted_pair(batching=True) as (manager, to_hub, to_manager):
            stream = await manager.open_stream("GET", "/api/v1/short", [], end=True)
            assert await stream.response() == (
                200,
                [("content-type", "application/json"), ("content-length", "15")],
            )
            assert await collect(stream.body()) == b'{"short": true}'
            assert [m[0] for m in to_hub.sent] == [FrameType.BATCH]  # OPEN + END
            assert [m[0] for m in to_manager.sent] == [FrameType.BATCH]  # RESPONSE + DATA + END
            assert manager._connection.open_streams() == 0


async def test_a_streamed_head_is_not_held_for_its_body() -> None:
    """Without a short declared length the head goes at once, as hypercorn sends it."""
    with trio.fail_after(5):
        async with counted_pair(batching=True) as (manager, _, to_manager):
            stream = await manager.open_stream("GET", "/api/v1/slow", [], end=True)
            assert await stream.response() == (200, [])  # while the app still waits
            assert [m[0] for m in to_manager.sent] == [FrameType.RESPONSE]
            SLOW_GO.set()
            assert await collect(stream.body()) == b"late"


async def test_no_batches_to_a_peer_that_did_not_ask_for_them() -> None:
    with trio.fail_after(5):
        async with counted_pair(batching=False) as (manager, to_hub, to_manager):
            stream = await manager.open_stream("GET", "/api/v1/short", [], end=True)
            assert await collect(stream.body()) == b'{"short": true}'
            assert [m[0] for m in to_hub.sent] == [FrameType.OPEN, FrameType.END]
            assert [m[0] for m in to_manager.sent] == [FrameType.RESPONSE, FrameType.DATA, FrameType.END]


# -- whole_body: the manager's quick path for short answers ---------------------------------------


async def answer_in_pieces(stream: InboundStream) -> None:
    """Answers ``/n/<size>`` with that many bytes in 1,000-byte DATA frames, one scheduler turn
    apart, so the reader sees the body arrive in pieces before END."""
    size = int(stream.path.rsplit("/", 1)[1])
    await stream.respond(200, [("x-size", str(size))])
    for start in range(0, size, 1000):
        await stream.send(bytes([start // 1000 % 256]) * min(1000, size - start))
        await trio.sleep(0)
    await stream.end()


def expected_body(size: int) -> bytes:
    return b"".join(bytes([start // 1000 % 256]) * min(1000, size - start) for start in range(0, size, 1000))


async def test_whole_body_waits_for_end_and_takes_it_all() -> None:
    with trio.fail_after(5):
        async with pair(answer_in_pieces) as (manager, _):
            stream = await manager.open_stream("GET", "/api/v1/n/9500", [], end=True)
            assert (await stream.response())[0] == 200
            assert await stream.whole_body(10_000) == expected_body(9500)
            assert stream.buffered == 0
            assert await collect(stream.body()) == b""  # taken: body() is at its end


async def test_whole_body_over_the_limit_takes_nothing() -> None:
    with trio.fail_after(5):
        async with pair(answer_in_pieces) as (manager, _):
            stream = await manager.open_stream("GET", "/api/v1/n/50000", [], end=True)
            assert await stream.whole_body(10_000) is None
            assert 10_000 < stream.buffered < 50_000  # gave up as soon as it was over, not at END
            assert await collect(stream.body()) == expected_body(50_000)


async def test_whole_body_of_a_stream_longer_than_its_window_does_not_wait_for_credit() -> None:
    with trio.fail_after(5):
        async with pair(answer_in_pieces) as (manager, _):
            size = 2 * INITIAL_WINDOW
            stream = await manager.open_stream("GET", f"/api/v1/n/{size}", [], end=True)
            assert await stream.whole_body(INITIAL_WINDOW // 4) is None
            assert await collect(stream.body()) == expected_body(size)


async def test_whole_body_of_a_reset_stream_raises_with_nothing_taken() -> None:
    async def half_then_reset(stream: InboundStream) -> None:
        await stream.respond(200, [])
        await stream.send(b"partial")
        await trio.sleep(0)
        await stream.reset("hub gave up")

    with trio.fail_after(5):
        async with pair(half_then_reset) as (manager, _):
            stream = await manager.open_stream("GET", "/api/v1/x", [], end=True)
            with pytest.raises(StreamAborted, match="hub gave up"):
                await stream.whole_body(10_000)
            with pytest.raises(StreamAborted):
                await collect(stream.body())


async def test_whole_body_can_be_cancelled_and_the_body_read_after() -> None:
    release = trio.Event()

    async def slow(stream: InboundStream) -> None:
        await stream.respond(200, [])
        await stream.send(b"first ")
        await release.wait()
        await stream.send(b"second")
        await stream.end()

    with trio.fail_after(5):
        async with pair(slow) as (manager, _):
            stream = await manager.open_stream("GET", "/api/v1/x", [], end=True)
            with trio.move_on_after(0.05):
                await stream.whole_body(10_000)
            release.set()
            assert await collect(stream.body()) == b"first second"
