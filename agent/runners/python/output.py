"""The output side: what ``run`` returns or yields, encoded and written to fd 6 with
back-pressure (the hub reads the pipe as fast as the instance's readers take it).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from typing import Any

from spacehub.protocol.runner import (
    FD_OUTPUT,
)

from .base import (
    _NDJSON_TYPES,
    OUTPUT_FLUSH_BYTES,
    OUTPUT_HIGH_WATER,
    SYNC_YIELD_EVERY,
    OutputGone,
    _is_async_iterable,
)


class _WriteProtocol(asyncio.BaseProtocol):
    """Flow control for the output pipe transport."""

    def __init__(self) -> None:
        self.paused = False
        self.lost = False
        self._waiter: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_writable(self) -> None:
        while self.paused and not self.lost:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self.lost:
            raise OutputGone


class _Output:
    """The sequence's output (fd 6).

    Items are coalesced into writes of up to OUTPUT_FLUSH_BYTES: a write per 76-byte line
    would spend more on syscalls than on the data. What is pending is flushed as soon as
    the producing task yields to the loop (``call_soon``), so a slow producer's items are
    not delayed. ``must_drain`` turns true when the transport buffers more than
    OUTPUT_HIGH_WATER; the writer then awaits ``drain`` — back-pressure without blocking.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.WriteTransport | None = None
        self._protocol: _WriteProtocol | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._flush_scheduled = False
        self._opened = False
        self._closed = False

    async def open(self) -> None:
        self._opened = True
        self._loop = loop = asyncio.get_running_loop()
        mode = os.fstat(FD_OUTPUT).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            pipe = open(FD_OUTPUT, "wb", buffering=0)  # noqa: SIM115 - the transport owns (and closes) it
            transport, protocol = await loop.connect_write_pipe(_WriteProtocol, pipe)
            transport.set_write_buffer_limits(high=OUTPUT_HIGH_WATER)
            self._transport, self._protocol = transport, protocol

    @property
    def gone(self) -> bool:
        """The hub closed its end: a write failed (EPIPE) or the transport saw the hang-up.

        ``is_closing`` counts too: after a failed write asyncio only schedules
        ``connection_lost``, and a producer that never yields to the loop (an async
        generator that never awaits) would otherwise write on forever, each write dropped
        with a "pipe closed by peer" warning.
        """
        if self._protocol is None or self._closed:
            return False
        return self._protocol.lost or (self._transport is not None and self._transport.is_closing())

    def write(self, data: bytes) -> None:
        """Queue ``data``; raises OutputGone once the hub no longer reads the output."""
        if self.gone:
            raise OutputGone
        if not data:
            return
        if not self._pending_size and len(data) >= OUTPUT_FLUSH_BYTES:
            self._send(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._transport is None:
            return  # blocking mode: written by drain()
        if self._pending_size >= OUTPUT_FLUSH_BYTES:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
            self._send(data)

    def _send(self, data: bytes) -> None:
        if self._transport is None:
            self._pending.append(data)
            self._pending_size += len(data)
        elif not self.gone:  # (from a call_soon flush: write() raises at the next item)
            self._transport.write(data)

    @property
    def must_drain(self) -> bool:
        if self._protocol is not None:
            return self._protocol.paused or self.gone
        return self._pending_size >= OUTPUT_FLUSH_BYTES

    async def drain(self) -> None:
        if self._protocol is not None:
            if self.gone:
                raise OutputGone
            await self._protocol.wait_writable()
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        try:
            await asyncio.get_running_loop().run_in_executor(None, _write_all, FD_OUTPUT, data)
        except BrokenPipeError:
            raise OutputGone from None

    async def close(self) -> None:
        """Write what is pending and close fd 6, so the hub sees the output's end."""
        if self._closed:
            return
        self._closed = True
        if not self._opened:
            os.close(FD_OUTPUT)
            return
        if self._transport is None:
            await self.drain()
            os.close(FD_OUTPUT)
            return
        self._flush()
        assert self._protocol is not None
        self._transport.close()  # writes the buffer out first
        await self._protocol.closed


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def write_result(out: _Output, result: Any, content_type: str) -> None:
    """Write what ``run`` returned to fd 6 (``content_type``: its media type) and close it.

    A str/bytes result is written once, as it is; an iterable (sync or async) item by
    item, encoded for the content type; anything else as one item. Raises OutputGone
    when the hub stops reading, so an endless producer stops too.
    """
    await out.open()
    encode_item = _encode_ndjson if content_type in _NDJSON_TYPES else _encode_raw
    if isinstance(result, (str, bytes, bytearray, memoryview)):
        out.write(_encode_raw(result))
    elif _is_async_iterable(result):
        async for item in result:
            out.write(encode_item(item))
            if out.must_drain:
                await out.drain()
    elif hasattr(type(result), "__iter__") and not isinstance(result, dict):
        for count, item in enumerate(result, 1):
            out.write(encode_item(item))
            if out.must_drain:
                await out.drain()
            elif count % SYNC_YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let event handlers and the input run
    else:
        out.write(encode_item(result))
    await out.close()


def _encode_raw(item: Any) -> bytes:
    """text/plain, octet-stream and unknown types: bytes as-is, everything else as UTF-8 text."""
    if type(item) is bytes:
        return item
    if type(item) is str:
        try:
            return item.encode()
        except UnicodeEncodeError:  # lone surrogates: keep the data visible rather than fail
            return item.encode("utf-8", "backslashreplace")
    if item is None:
        return b""
    if isinstance(item, (bytearray, memoryview)):
        return bytes(item)
    return str(item).encode("utf-8", "backslashreplace")


def _encode_ndjson(item: Any) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)  # already encoded by the sequence
    return (json.dumps(item) + "\n").encode()
