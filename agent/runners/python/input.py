"""The input side: fd 5 (the instance's input) and fd 0 (stdin) read through the asyncio
loop with back-pressure, typed by the content-type preamble, as plain async iterables.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import stat
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

from spacehub.protocol.runner import (
    FD_INPUT,
    FD_STDIN,
    MAX_PREAMBLE_BYTES,
    PreambleReader,
    ProtocolError,
)

from .base import (
    _END,
    _NDJSON_TYPES,
    _PREAMBLE_START,
    CHUNK_SIZE,
    MAX_INPUT_LINE,
    _Log,
    _media_type,
)


class _InputOwner(Protocol):
    """What the input needs of the runner: its log, and the declared content type."""

    log: _Log

    def declared_input_type(self) -> str: ...


class _FdReader:
    """Reads an inherited fd through the loop: a pipe transport when the fd is a pipe or
    socket (never blocks the loop, pauses reading when the buffer is full), else blocking
    reads in the default executor (regular files, /dev/null: epoll refuses those)."""

    def __init__(self, fd: int, *, close: bool) -> None:
        self._fd = fd
        self._close = close
        self._reader: asyncio.StreamReader | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._opened = False

    async def _open(self) -> None:
        self._opened = True
        loop = asyncio.get_running_loop()
        mode = os.fstat(self._fd).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            reader = asyncio.StreamReader(limit=CHUNK_SIZE)
            pipe = open(self._fd, "rb", buffering=0, closefd=self._close)  # noqa: SIM115 - the transport owns it
            self._transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), pipe
            )
            self._reader = reader

    async def read(self) -> bytes:
        """Up to CHUNK_SIZE bytes; b"" at end of stream."""
        if not self._opened:
            await self._open()
        if self._reader is not None:
            return await self._reader.read(CHUNK_SIZE)
        return await asyncio.get_running_loop().run_in_executor(None, os.read, self._fd, CHUNK_SIZE)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class _Source:
    """Where the input's items come from: ``next()`` gives one item or ``_END``."""

    async def next(self) -> Any:
        raise NotImplementedError

    async def iterate(self) -> AsyncIterator[Any]:
        while (item := await self.next()) is not _END:
            yield item


class _InputSource(_Source):
    """The sequence's input (fd 5) as typed items, read on demand.

    One chunk is read only when the decoded items of the previous one are used up, so
    a slow sequence back-pressures the hub through the pipe. Items: text/plain → str
    lines with their "\\n" (a partial last line at EOF too); NDJSON → one JSON value per
    non-empty line (``null`` is skipped: scramjet ends a stream on None); anything else →
    bytes chunks.
    """

    def __init__(self, runner: _InputOwner) -> None:
        self._runner = runner
        self._items: deque[Any] = deque()
        self._eof = False
        self._lock = asyncio.Lock()
        self._reader: _FdReader | None = None
        self._kind = ""
        self._rest = b""
        self._decoder: codecs.IncrementalDecoder | None = None
        self._text_tail = ""
        self._bytes_tail = b""
        self._skipping = False

    async def next(self) -> Any:
        """The next item, or ``_END``."""
        items = self._items
        while not items:
            if self._eof:
                return _END
            async with self._lock:  # one refill at a time; readers queue behind it
                if not items and not self._eof:
                    await self._fill()
        return items.popleft()

    async def iterate(self) -> AsyncIterator[Any]:
        items = self._items
        while True:
            if items:
                yield items.popleft()
                continue
            item = await self.next()
            if item is _END:
                return
            yield item

    async def _fill(self) -> None:
        try:
            if self._reader is None:
                await self._start()
                if self._eof:  # ended before any data: nothing to decode
                    self._finish()
                    return
            if self._rest:
                chunk, self._rest = self._rest, b""
            else:
                assert self._reader is not None
                chunk = await self._reader.read()
        except (OSError, ValueError, RuntimeError) as exc:
            self._runner.log.record("ERROR", f"Reading the input failed: {exc!r}")
            chunk = b""
        if chunk:
            self._decode(chunk)
        else:
            self._finish()

    async def _start(self) -> None:
        self._reader = _FdReader(FD_INPUT, close=True)
        content_type = self._runner.declared_input_type()
        if content_type:
            await self._skip_preamble(content_type)
        else:
            content_type = await self._read_preamble()
        kind = _media_type(content_type or "")
        self._kind = "ndjson" if kind in _NDJSON_TYPES else "text" if kind == "text/plain" else "bytes"
        if self._kind == "text":
            self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._runner.log.record("DEBUG", f"Input content type: {content_type or 'none (empty input)'}")

    async def _read_preamble(self) -> str:
        assert self._reader is not None
        preamble = PreambleReader()
        seen = False
        while True:
            data = await self._reader.read()
            if not data:
                if seen:
                    self._runner.log.record("ERROR", "Input ended inside its Content-Type preamble")
                self._eof = True  # no preamble at all: an empty input, not an error
                return ""
            seen = True
            try:
                complete = preamble.receive_data(data)
            except ProtocolError as exc:
                self._runner.log.record("ERROR", f"Bad input preamble ({exc}); input ignored")
                self._eof = True
                return ""
            if complete:
                self._rest = preamble.rest
                assert preamble.headers is not None
                return preamble.headers.get("content-type", "")

    async def _skip_preamble(self, declared: str) -> None:
        """With a declared type no preamble is due, but a hub may still send one (topic
        input): input that opens with a complete ``Content-Type: ...\\r\\n\\r\\n`` loses it."""
        assert self._reader is not None
        data = b""
        while True:
            chunk = await self._reader.read()
            data += chunk
            head = data[: len(_PREAMBLE_START)].lower()
            if not chunk or not _PREAMBLE_START.startswith(head) or len(data) > MAX_PREAMBLE_BYTES:
                break  # the end, or not a preamble: it is all input
            if len(head) == len(_PREAMBLE_START) and b"\r\n\r\n" in data:
                preamble = PreambleReader()
                try:
                    preamble.receive_data(data)
                except ProtocolError:
                    break  # looked like one, is not: input
                sent = (preamble.headers or {}).get("content-type", "")
                if _media_type(sent) != _media_type(declared):
                    self._runner.log.record("WARN", f"Input sent as {sent}, read as the declared {declared}")
                data = preamble.rest
                break
        self._rest = data

    def _decode(self, chunk: bytes) -> None:
        if self._kind == "text":
            assert self._decoder is not None
            lines = (self._text_tail + self._decoder.decode(chunk)).split("\n")
            tail = lines.pop()
            if lines:
                self._items.extend([line + "\n" for line in lines])
            if len(tail) > MAX_INPUT_LINE:  # no line break in sight: hand it over as it is
                self._items.append(tail)
                tail = ""
            self._text_tail = tail
        elif self._kind == "ndjson":
            records = (self._bytes_tail + chunk).split(b"\n")
            rest = records.pop()
            for record in records:
                if self._skipping:  # the rest of an over-long record
                    self._skipping = False
                    continue
                self._parse_json(record)
            if len(rest) > MAX_INPUT_LINE:
                self._runner.log.record("ERROR", f"NDJSON input record over {MAX_INPUT_LINE} B dropped")
                self._skipping = True
                rest = b""
            self._bytes_tail = rest
        else:
            self._items.append(chunk)

    def _parse_json(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            value = json.loads(line)
        except ValueError as exc:  # one bad record must not end (or hang) the whole input
            self._runner.log.record("ERROR", f"Invalid NDJSON input record skipped: {exc}")
            return
        if value is not None:
            self._items.append(value)

    def _finish(self) -> None:
        if self._kind == "text" and self._decoder is not None:
            tail = self._text_tail + self._decoder.decode(b"", final=True)
            if tail:
                self._items.append(tail)
        elif self._kind == "ndjson" and self._bytes_tail and not self._skipping:
            self._parse_json(self._bytes_tail)
        self._text_tail, self._bytes_tail = "", b""
        self._eof = True
        if self._reader is not None:
            self._reader.close()


class _AsyncStdin:
    """``sys.stdin`` for sequences: fd 0 decoded as UTF-8, read through the loop.

    ``await sys.stdin.read()``, ``await sys.stdin.readline()``, ``async for line in sys.stdin``.
    """

    encoding = "utf-8"

    def __init__(self) -> None:
        self._reader: _FdReader | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._buffer = ""
        self._scan = 0
        self._eof = False
        self._lock: asyncio.Lock | None = None

    async def _fill(self) -> bool:
        """Append one chunk to the buffer; False at end of stream."""
        if self._eof:
            return False
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._reader is None:
                self._reader = _FdReader(FD_STDIN, close=False)
            try:
                chunk = await self._reader.read()
            except (OSError, ValueError):
                chunk = b""
            self._buffer += self._decoder.decode(chunk, final=not chunk)
            if not chunk:
                self._eof = True
                self._reader.close()
            return bool(chunk)

    async def readline(self) -> str:
        """One line with its "\\n"; "" at end of stream."""
        while True:
            end = self._buffer.find("\n", self._scan)
            if end >= 0:
                line, self._buffer, self._scan = self._buffer[: end + 1], self._buffer[end + 1 :], 0
                return line
            self._scan = len(self._buffer)
            if not await self._fill():
                line, self._buffer, self._scan = self._buffer, "", 0
                return line

    async def read(self, size: int = -1) -> str:
        """All of stdin (or up to ``size`` characters)."""
        while (size < 0 or len(self._buffer) < size) and await self._fill():
            pass
        if size < 0:
            size = len(self._buffer)
        data, self._buffer, self._scan = self._buffer[:size], self._buffer[size:], 0
        return data

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        while line := await self.readline():
            yield line

    def fileno(self) -> int:
        return FD_STDIN

    def isatty(self) -> bool:
        return False

    def readable(self) -> bool:
        return True
