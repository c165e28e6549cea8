"""Bounded in-memory streams the hub puts between producers and HTTP readers.

:class:`Broadcast` carries an instance's output, stdout and stderr: one writer,
any number of readers, every reader gets every byte written after it attached, and
the writer waits (back-pressure) once the slowest reader lags ``bound`` bytes
behind. Bytes written while nobody reads are kept, up to the same bound, for the
next reader: nothing is dropped and nothing grows without limit.

:class:`RecordRing` carries logs: a ring of the last N records that readers replay
and then follow live. Writers never wait (a log call must not stall the hub); a
reader that falls more than N records behind is told how many it missed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class _Cursor:
    __slots__ = ("position",)

    def __init__(self, position: int) -> None:
        self.position = position


class Broadcast:
    """One writer, many readers, at most ``bound`` bytes held.

    Offsets are absolute byte positions in the stream. ``_chunks`` holds the bytes
    from ``_start`` to ``_end``; a chunk is dropped once every reader has passed it
    (with no reader attached, nothing is dropped and the writer waits at the bound).
    """

    def __init__(self, bound: int, on_mark: Callable[[int], None] | None = None) -> None:
        if bound <= 0:
            raise ValueError("bound must be positive")
        self._bound = bound
        self._chunks: deque[bytes] = deque()
        self._start = 0
        self._end = 0
        self._readers: set[_Cursor] = set()
        self._closed = False
        self._changed = trio.lowlevel.ParkingLot()
        #: told the mark (every reader has taken the stream up to it) as it moves
        self._on_mark = on_mark
        self._mark = 0

    def restore(self, start: int, data: bytes) -> None:
        """Begin at offset ``start`` holding ``data`` (not yet taken by any reader):
        a stream taken back from a hub that ended (agent/instances/spool.py)."""
        if self._end or self._readers:
            raise RuntimeError("only a new broadcast can be restored")
        self._start = self._end = self._mark = start
        if data:
            self._chunks.append(bytes(data))
            self._end += len(data)

    @property
    def start(self) -> int:
        """The oldest offset held in memory."""
        return self._start

    @property
    def end(self) -> int:
        """The offset the next byte written gets."""
        return self._end

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffered(self) -> int:
        return self._end - self._start

    @property
    def readers(self) -> int:
        """Readers attached now."""
        return len(self._readers)

    def _low_mark(self) -> int:
        if not self._readers:
            return self._start
        return min(cursor.position for cursor in self._readers)

    def _trim(self) -> None:
        low = self._low_mark()
        while self._chunks and self._start + len(self._chunks[0]) <= low:
            self._start += len(self._chunks.popleft())
        if self._readers and low != self._mark:
            self._mark = low
            if self._on_mark is not None:
                self._on_mark(low)

    async def write(self, data: bytes | bytearray) -> None:
        """Append ``data``; waits while the slowest reader lags the bound."""
        if self._closed:
            raise trio.ClosedResourceError("broadcast is closed")
        if not data:
            return
        while self._end - self._low_mark() >= self._bound:
            await self._changed.park()
            if self._closed:
                raise trio.ClosedResourceError("broadcast is closed")
        self._chunks.append(bytes(data))
        self._end += len(data)
        self._changed.unpark_all()

    def close(self) -> None:
        """End of stream: readers get what is left, then EOF. Idempotent."""
        self._closed = True
        self._changed.unpark_all()

    async def _read(self, cursor: _Cursor) -> bytes:
        while cursor.position >= self._end:
            if self._closed:
                return b""
            await self._changed.park()
        # Find the chunk holding cursor.position (few chunks: bound / chunk size).
        offset = self._start
        for chunk in self._chunks:
            if offset + len(chunk) > cursor.position:
                piece = chunk[cursor.position - offset :]
                cursor.position += len(piece)
                self._trim()
                self._changed.unpark_all()
                return piece
            offset += len(chunk)
        raise AssertionError("cursor outside the buffered range")

    def subscribe(self, position: int | None = None) -> Subscription:
        """Attach a reader now; iterate it for the bytes until the stream ends.

        The first reader attached gets what was kept while nobody read; a reader
        joining others starts at the live end; one given ``position`` (between
        :attr:`start` and :attr:`end`) starts there. Close it (``async with``) as
        soon as it is no longer read, or it holds the writer back.
        """
        if position is None:
            position = self._end if self._readers else max(self._start, self._mark)
        elif not self._start <= position <= self._end:
            raise ValueError(f"offset {position} is not held (held: {self._start}-{self._end})")
        cursor = _Cursor(position)
        self._readers.add(cursor)
        return Subscription(self, cursor)

    def _detach(self, cursor: _Cursor) -> None:
        if cursor in self._readers:
            self._readers.discard(cursor)
            self._trim()
            self._changed.unpark_all()


class Subscription:
    """One reader of a :class:`Broadcast`: an async iterator of chunks."""

    def __init__(self, broadcast: Broadcast, cursor: _Cursor) -> None:
        self._broadcast = broadcast
        self._cursor = cursor

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._broadcast._read(self._cursor)
        if not chunk:
            self.close()
            raise StopAsyncIteration
        return chunk

    def close(self) -> None:
        self._broadcast._detach(self._cursor)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RecordRing(Generic[T]):
    """The last ``size`` records, replayed to each reader and then followed live."""

    def __init__(self, size: int) -> None:
        self._records: deque[T] = deque(maxlen=size)
        self._next_index = 0  # index the next appended record gets
        self._closed = False
        self._changed = trio.lowlevel.ParkingLot()

    def append(self, record: T) -> None:
        """Never waits. Must be called from the Trio thread."""
        self._records.append(record)
        self._next_index += 1
        self._changed.unpark_all()

    def close(self) -> None:
        self._closed = True
        self._changed.unpark_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def snapshot(self) -> list[T]:
        return list(self._records)

    def follow(self, *, replay: bool = True) -> AsyncIterator[tuple[int, T]]:
        """Yield ``(missed, record)`` pairs until the ring is closed and drained.

        The reader's place is fixed when this is called (not at its first read).
        ``missed`` counts the records this reader lost since its previous one
        because it fell more than the ring's size behind (0 normally)."""
        position = self._next_index - len(self._records) if replay else self._next_index
        return self._follow_from(position)

    async def _follow_from(self, position: int) -> AsyncIterator[tuple[int, T]]:
        while True:
            while position >= self._next_index:
                if self._closed:
                    return
                await self._changed.park()
            oldest = self._next_index - len(self._records)
            missed = max(0, oldest - position)
            position = max(position, oldest)
            record = self._records[position - oldest]
            position += 1
            yield missed, record
