"""Topics: named pipes inside the hub that chain Instances into pipelines.

Theory of operation
-------------------
A topic has a content type fixed when it is created (by its first writer,
reader, instance or ``POST /topics``) and one :class:`~agent.streams.Broadcast`
carrying its bytes. Writers (API bodies, providing instances) take turns: the
topic's lock is fair, so they are served one at a time in arrival order and each
writes whole, so NDJSON records never interleave or split. Readers (API
streams, requiring instances) each get every byte written after they attached;
with no reader the broadcast keeps up to its bound and then writers wait:
back-pressure, never a drop.

A topic stays open until it is deleted, as on the original platform: a writer's
``x-end-stream: true`` ends that writer's data, not the topic, so a reader that stays
connected gets the data of one producer after another, in order, and data posted
before any reader arrives is kept (up to the bound) for the first one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from spacehub.models import TopicInfo
from spacehub.protocol.topics import (
    CONTENT_TYPES,
    DEFAULT_CONTENT_TYPE,
    MAX_ENTRY_BYTES,
    NAME_PATTERN,
    NAME_RULE,
    NDJSON_TYPES,
    media_type,
    split_records,
)

from . import limits
from .errors import BadRequest, Conflict, NotFound, UnsupportedMediaType
from .instances.spool import PartialLine
from .streams import Broadcast, Subscription

logger = logging.getLogger("agent.topics")


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise BadRequest(f"Topic name {name!r} is invalid: use {NAME_RULE}")
    return name


def check_content_type(content_type: str | None) -> str:
    if content_type is None:
        return DEFAULT_CONTENT_TYPE
    value = media_type(content_type)
    if value is None:
        raise UnsupportedMediaType(
            f"Unsupported content-type {content_type.split(';', 1)[0].strip().lower()!r}:"
            f" a topic carries one of {', '.join(CONTENT_TYPES)}"
        )
    return value


class SpaceBridge(Protocol):
    """What carries a topic to and from the other hubs of the Space (agent/spacetopics.py)."""

    async def produced(self, topic: Topic, records: bytes | memoryview) -> bool:
        """Whole records written here by a local producer (waits while the spool is full);
        whether the Space took them."""

    def consumers_changed(self, topic: Topic) -> None:
        """A local reader came or went."""


@dataclass(eq=False)
class Topic:
    name: str
    content_type: str
    stream: Broadcast = field(init=False)
    #: writers take turns in arrival order (trio.Lock is fair)
    turn: trio.Lock = field(default_factory=trio.Lock)
    #: who writes and reads now: "api" or instance ids, with a count each
    providers: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, int] = field(default_factory=dict)
    #: told the mark (every local reader has taken the stream up to it) as it moves
    mark_listeners: list[Callable[[int], None]] = field(default_factory=list)
    #: the last byte a local producer wrote (b"" before any)
    last_byte: bytes = b""

    def __post_init__(self) -> None:
        self.stream = Broadcast(limits.TOPIC_BUFFER_BYTES, on_mark=self._mark_moved)

    def _mark_moved(self, position: int) -> None:
        for listener in self.mark_listeners:
            listener(position)

    @property
    def whole_lines(self) -> bool:
        """Whether its records are lines (text and NDJSON), kept whole when producers merge."""
        return self.content_type != "application/octet-stream"

    def info(self) -> TopicInfo:
        return {
            "topic": self.name,
            "topicName": self.name,
            "contentType": self.content_type,
            "localProvider": next(iter(self.providers), ""),
            "providers": sorted(self.providers),
            "consumers": sorted(self.consumers),
            "buffered": self.stream.buffered,
        }


def _count(table: dict[str, int], who: str, delta: int) -> None:
    table[who] = table.get(who, 0) + delta
    if table[who] <= 0:
        del table[who]


@dataclass(slots=True)
class TopicTotals:
    """What went through this hub's topics since start (the metrics read it)."""

    bytes_in: int = 0
    #: newline-ended records written (lines of text, NDJSON records)
    records_in: int = 0
    bytes_out: int = 0


class TopicRouter:
    def __init__(self) -> None:
        self._topics: dict[str, Topic] = {}
        self.totals = TopicTotals()
        #: the Space's side of every topic, once the hub links to a manager
        self.space: SpaceBridge | None = None

    def list(self) -> list[Topic]:
        return list(self._topics.values())

    def find(self, name: str) -> Topic | None:
        """Topic ``name`` if it exists (no check of the name)."""
        return self._topics.get(name)

    def get(self, name: str) -> Topic:
        try:
            return self._topics[check_name(name)]
        except KeyError:
            raise NotFound(f"Topic {name} not found") from None

    def ensure_any(self, name: str, content_type: str | None, default: str = DEFAULT_CONTENT_TYPE) -> Topic:
        """The topic, created with ``content_type`` if new; an existing one whatever it carries
        (an instance's declared type that differs is connected anyway, as on the original)."""
        existing = self._topics.get(check_name(name))
        return existing if existing is not None else self.ensure(name, content_type, default)

    def ensure(self, name: str, content_type: str | None, default: str = DEFAULT_CONTENT_TYPE) -> Topic:
        """The topic, created with ``content_type`` (or ``default``) if new; a
        different type than the existing topic's is refused (415)."""
        check_name(name)
        topic = self._topics.get(name)
        if topic is None:
            topic = Topic(name, check_content_type(content_type or default))
            self._topics[name] = topic
            logger.info("topic %s created (%s)", name, topic.content_type)
        elif content_type is not None and check_content_type(content_type) != topic.content_type:
            raise UnsupportedMediaType(
                f"Topic {name} carries {topic.content_type}, not {check_content_type(content_type)}"
            )
        return topic

    def create(self, name: str, content_type: str | None) -> Topic:
        if check_name(name) in self._topics:
            raise Conflict(f"Topic with given id already exists: {name}")
        return self.ensure(name, content_type)

    def delete(self, name: str) -> None:
        topic = self.get(name)
        topic.stream.close()
        del self._topics[name]
        logger.info("topic %s deleted", name)

    async def write(
        self, topic: Topic, body: AsyncIterable[bytes], *, who: str, partial: PartialLine | None = None
    ) -> int:
        """Write ``body`` as one whole turn; returns the bytes written. The topic goes on
        after it: the end of one producer's data is not the end of the topic.

        Lines are written whole (a partial one waits for its end), so records from the
        other hubs of the Space (:meth:`write_remote`) can come between any two writes."""
        written = 0
        _count(topic.providers, who, +1)
        try:
            async with topic.turn:
                pending = partial.restore() if partial is not None else b""
                whole_lines = topic.whole_lines
                async for chunk in body:
                    if chunk:
                        ready, pending = split_records(pending, chunk, whole_lines)
                        written += len(chunk)
                        if ready:
                            await self._write_local(topic, ready)
                        if partial is not None:
                            partial.save(pending)
                # NDJSON readers must never see two writers' records glued together.
                if topic.content_type in NDJSON_TYPES and (pending or topic.last_byte not in (b"", b"\n")):
                    pending += b"\n"
                if pending:
                    await self._write_local(topic, pending)
                if partial is not None:
                    partial.clear()
        finally:
            _count(topic.providers, who, -1)
            if partial is not None:
                partial.close()
        return written

    async def _write_local(self, topic: Topic, records: bytes) -> None:
        shared = False
        if self.space is not None:
            view = memoryview(records)
            for start in range(0, len(records), MAX_ENTRY_BYTES):
                shared = await self.space.produced(topic, view[start : start + MAX_ENTRY_BYTES])
        # Records the Space took are not kept here for a local reader yet to come: a producer
        # whose consumers are all on other hubs must not wait for one on this hub.
        if not shared or topic.stream.readers:
            await topic.stream.write(records)
        self.totals.bytes_in += len(records)
        self.totals.records_in += records.count(b"\n")
        topic.last_byte = records[-1:]

    async def write_remote(self, topic: Topic, records: bytes) -> None:
        """Whole records from another hub of the Space: to local readers only."""
        await topic.stream.write(records)
        self.totals.bytes_in += len(records)
        self.totals.records_in += records.count(b"\n")

    def subscribe(self, topic: Topic, *, who: str) -> TopicReader:
        """Attach a reader now (bytes written from here on reach it)."""
        _count(topic.consumers, who, +1)
        reader = TopicReader(topic, who, topic.stream.subscribe(), self.totals, self)
        if self.space is not None:
            self.space.consumers_changed(topic)
        return reader

    def reader_closed(self, topic: Topic) -> None:
        if self.space is not None:
            self.space.consumers_changed(topic)


class TopicReader:
    """A topic reader: its bytes until the topic's stream ends; close it when done."""

    def __init__(
        self,
        topic: Topic,
        who: str,
        subscription: Subscription,
        totals: TopicTotals | None = None,
        router: TopicRouter | None = None,
    ) -> None:
        self._totals = totals
        self._router = router
        self._topic = topic
        self._who = who
        self._subscription = subscription
        self._closed = False

    def __aiter__(self) -> TopicReader:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._subscription.__anext__()
        if self._totals is not None:
            self._totals.bytes_out += len(chunk)
        return chunk

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._subscription.close()
            _count(self._topic.consumers, self._who, -1)
            if self._router is not None:
                self._router.reader_closed(self._topic)

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
