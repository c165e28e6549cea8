"""The original's API for the input: a ``scramjet.streams.DataStream`` (or the small
stand-in when scramjet is not installed) fed from fd 5, for sequences written for the
original runner.

``_TransformSource`` applies ``map``/``filter``/``each`` item by item with scramjet's
semantics; both ``_SimpleStream`` (no scramjet) and the fast path of the scramjet
subclass (``_scramjet_input``) are built on it, so the two behave alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

from .base import _END, _End, _isawaitable
from .input import _InputSource, _Source

_MAP: Final = "map"
_FILTER: Final = "filter"
_EACH: Final = "each"
_SKIP: Final = _End()  # internal to _TransformSource: this item is dropped


class _TransformSource(_Source):
    """``map``/``filter``/``each`` of another source, one item at a time, in order.

    Semantics follow scramjet: a map result of None ends the stream (None is scramjet's
    end marker), ``drop`` (scramjet's DropChunk) drops the item; an awaitable result is
    awaited.
    """

    def __init__(
        self, upstream: _Source, kind: str, func: Callable[..., Any], args: tuple[Any, ...], drop: Any
    ) -> None:
        self._upstream = upstream
        self._kind = kind
        self._func = func
        self._args = args
        self._drop = drop
        self._ended = False

    async def _apply(self, item: Any) -> Any:
        result = self._func(item, *self._args)
        if _isawaitable(result):
            result = await result
        if self._kind is _MAP:
            if result is None:
                self._ended = True
                return _END
            return _SKIP if result is self._drop else result
        if self._kind is _FILTER:
            return item if result else _SKIP
        return item

    async def next(self) -> Any:
        while not self._ended:
            item = await self._upstream.next()
            if item is _END:
                return _END
            result = await self._apply(item)
            if result is not _SKIP:
                return result
        return _END

    async def iterate(self) -> AsyncIterator[Any]:
        if self._ended:
            return
        async for item in self._upstream.iterate():
            result = await self._apply(item)
            if result is _END:
                return
            if result is not _SKIP:
                yield result


class _SimpleStream:
    """The input when scramjet is not importable: just enough of its Stream API."""

    def __init__(self, source: _Source) -> None:
        self._source = source

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._source.iterate()

    async def read(self) -> Any:
        item = await self._source.next()
        return None if item is _END else item

    def map(self, func: Callable[..., Any], *args: Any) -> _SimpleStream:
        return _SimpleStream(_TransformSource(self._source, _MAP, func, args, _SKIP))

    def filter(self, func: Callable[..., Any], *args: Any) -> _SimpleStream:
        return _SimpleStream(_TransformSource(self._source, _FILTER, func, args, _SKIP))

    def each(self, func: Callable[..., Any], *args: Any) -> _SimpleStream:
        return _SimpleStream(_TransformSource(self._source, _EACH, func, args, _SKIP))

    async def to_list(self) -> list[Any]:
        return [item async for item in self]


_SCRAMJET_METHODS: Final = ("_uncork", "_mark_consumed", "write", "end", "read", "__aiter__", "map", "each")


def _scramjet_input(stream_cls: Any, drop: Any, source: _InputSource) -> Any:
    """The input as a ``scramjet.streams.Stream`` (a subclass, so isinstance holds).

    Scramjet hands every item through a task of its own (~10 µs), which caps a text
    input near 5 MB/s. So while nothing but iteration, ``read`` and sync
    ``map``/``filter``/``each`` is asked of the input, items come straight from the source
    through those transforms (in order, one at a time: async transforms, which scramjet
    runs concurrently, are left to scramjet). Anything else (``pipe``, ``to_list``,
    ``batch``, ...) uncorks the stream: a feeder task then writes the remaining items into
    scramjet as ``Stream.read_from`` would. This leans on scramjet internals (``_uncork``,
    ``_consumed``), so a vendored copy without them gets the plain ``read_from`` stream.
    """
    if drop is None or not all(hasattr(stream_cls, name) for name in _SCRAMJET_METHODS):
        return stream_cls.read_from(source.iterate())

    class InputStream(stream_cls):  # type: ignore[misc]
        _spacehub_source: _Source | None = None
        _spacehub_feeder: asyncio.Task[None] | None = None

        def _direct(self) -> bool:
            return (
                self._spacehub_source is not None
                and self._spacehub_feeder is None
                and not getattr(self, "_consumed", False)
            )

        def _uncork(self) -> None:
            source = self._spacehub_source
            if source is not None and self._spacehub_feeder is None:
                self._spacehub_feeder = asyncio.get_running_loop().create_task(self._spacehub_feed(source))
            super()._uncork()

        async def _spacehub_feed(self, source: _Source) -> None:
            try:
                while (item := await source.next()) is not _END:
                    await self.write(item)
            finally:
                self.end()

        def __aiter__(self) -> AsyncIterator[Any]:
            if self._direct():
                assert self._spacehub_source is not None
                return self._spacehub_source.iterate()
            return super().__aiter__()  # type: ignore[no-any-return]

        async def read(self) -> Any:
            if self._direct():
                assert self._spacehub_source is not None
                item = await self._spacehub_source.next()
                return None if item is _END else item
            return await super().read()

        def _spacehub_transform(self, kind: str, func: Callable[..., Any], args: tuple[Any, ...]) -> Any:
            import inspect  # here: see _STAND_INS

            if not self._direct() or inspect.iscoroutinefunction(func):
                return None
            assert self._spacehub_source is not None
            self._mark_consumed()  # as scramjet does: a stream is transformed once
            child = InputStream(name=f"{self.name}+{kind[0]}")
            child._spacehub_source = _TransformSource(self._spacehub_source, kind, func, args, drop)
            return child

        def map(self, func: Callable[..., Any], *args: Any) -> Any:
            return self._spacehub_transform(_MAP, func, args) or super().map(func, *args)

        def filter(self, func: Callable[..., Any], *args: Any) -> Any:
            return self._spacehub_transform(_FILTER, func, args) or super().filter(func, *args)

        def each(self, func: Callable[..., Any], *args: Any) -> Any:
            return self._spacehub_transform(_EACH, func, args) or super().each(func, *args)

    stream = InputStream(name="input")
    stream._spacehub_source = source
    return stream


def _import_scramjet() -> tuple[Any, Any]:
    """scramjet's (Stream, DropChunk); (None, None) without scramjet, DropChunk None if absent."""
    try:
        from scramjet.streams import Stream
    except Exception:  # noqa: BLE001 - a vendored copy may fail in any way; we then use _SimpleStream
        return None, None
    try:
        from scramjet.pyfca import DropChunk
    except Exception:  # noqa: BLE001 - as above
        return Stream, None
    return Stream, DropChunk
