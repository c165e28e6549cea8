"""Space-wide topics: one topic per name per Space, over every hub of the Space.

Theory of operation
-------------------
Each topic of a Space has a *log* here (:class:`~spacehub.server.recordlog.RecordLog`,
``<data dir>/topics/<space>/<name>/``): the records its producers sent, in the order
they arrived, each entry naming the hub it came from::

    entry = <u32 length> <u8 origin length> <u64 origin offset> origin records

Hubs reach it through link streams they open (:mod:`spacehub.protocol.topics`):

- a hub that produces a topic the Space *wants* pushes its spool; each entry is
  appended here once (its offset in the hub's spool, kept per hub as ``producers``,
  tells a repeat after a reconnect from a new entry) and acknowledged;
- a hub with consumers of the topic pulls it: it is a *consumer* of the topic
  from then on, until it says it has none (``DELETE .../pull``), and its position
  (what it acknowledged) is kept here and on disk, so records for a hub whose link
  is down wait for it;
- readers of the Space API's ``GET /topic/:name`` read the log as it grows.

A topic is *wanted* while it has a consumer hub or a Space API reader; the hubs of
the Space hear the wanted names on ``GET /space-topics``, and only wanted topics are
pushed. Records nobody but their own hub consumes are not kept. A log is trimmed up
to the slowest consumer (whole segments); when it holds :attr:`capacity` bytes,
appends wait: producers are back-pressured, nothing is dropped.

``state.json`` keeps the content type, the producers' offsets, the consumers'
positions and the log's end when written (at most every :data:`STATE_SAVE_SECONDS`,
and at once when a consumer comes or goes). After a crash, the entries past that end
are read again for their origins' offsets, so a record acknowledged is never taken
twice; a consumer position older than the last save only keeps records longer.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

import trio

from spacehub.protocol.topics import (
    ACK,
    CONTENT_TYPES,
    DEFAULT_CONTENT_TYPE,
    ENTRY,
    MAX_ENTRY_BYTES,
    NAME_PATTERN,
    NAME_RULE,
    NDJSON_TYPES,
    FrameError,
    FrameReader,
    ack,
    delivery,
    media_type,
    split_records,
)
from spacehub.server.files import write_atomic
from spacehub.server.link.session import InboundStream, LinkClosed, StreamAborted
from spacehub.server.recordlog import RecordLog

from .config import TOPIC_LOG_BYTES
from .errors import BadRequest, ManagerError

__all__ = [
    "CONTENT_TYPES",
    "LOG_SEGMENT_BYTES",
    "TOPIC_LOG_BYTES",
    "SpaceTopic",
    "SpaceTopics",
    "UnsupportedMediaType",
]

logger = logging.getLogger("cpm.topics")

#: Size of one log segment file (the unit the log is trimmed by).
LOG_SEGMENT_BYTES: Final = 16 * 1024 * 1024
#: Bytes of the newest records a topic also keeps in memory for the readers at its end.
RECENT_BYTES: Final = 2 * 1024 * 1024
#: A producer hub is acknowledged at least every this many bytes while its entries keep coming.
ACK_EVERY_BYTES: Final = 4 * 1024 * 1024
#: Seconds the console's and the listing's rates are averaged over.
RATE_WINDOW: Final = 10
#: The smallest segment (a small capacity still trims in eighths).
MIN_SEGMENT_BYTES: Final = 64 * 1024
#: Bytes read from a log at a time for a reader, and the most one delivery carries.
READ_BYTES: Final = 256 * 1024
#: state.json is rewritten at most this often while records flow.
STATE_SAVE_SECONDS: Final = 1.0
#: The entry header in a topic's log (see the module docstring).
_ENTRY: Final = struct.Struct("<IBQ")
#: The origin of records posted to the Space API rather than produced on a hub.
API_ORIGIN: Final = ""


class UnsupportedMediaType(ManagerError):
    status = 415
    default_message = "Unsupported content-type"


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise BadRequest(f"Topic name {name!r} is invalid: use {NAME_RULE}")
    return name


def check_content_type(value: str | None) -> str | None:
    if value is None:
        return None
    kind = media_type(value)
    if kind is None:
        raise UnsupportedMediaType(
            f"Unsupported content-type {value.split(';', 1)[0].strip().lower()!r}:"
            f" a topic carries one of {', '.join(CONTENT_TYPES)}"
        )
    return kind


class RateMeter:
    """Bytes a second over the last :data:`RATE_WINDOW` seconds (one bucket a second)."""

    def __init__(self) -> None:
        self._buckets: deque[list[int]] = deque()

    def add(self, count: int) -> None:
        second = int(time.monotonic())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += count
        else:
            self._buckets.append([second, count])
            while self._buckets and self._buckets[0][0] <= second - RATE_WINDOW:
                self._buckets.popleft()

    def rate(self) -> float:
        now = int(time.monotonic())
        return sum(count for second, count in self._buckets if second > now - RATE_WINDOW) / RATE_WINDOW


@dataclass(eq=False)
class _Reader:
    """A Space API reader: its position in the log."""

    position: int


@dataclass(eq=False)
class SpaceTopic:
    """One topic of one Space: its log and who produces and consumes it."""

    space: str
    name: str
    directory: Path
    capacity: int
    log: RecordLog = field(init=False)
    content_type: str | None = None
    #: hub id -> the offset in that hub's spool up to which its entries are stored here
    producers: dict[str, int] = field(default_factory=dict)
    #: hub id -> the log position its consumers have taken the topic up to
    consumers: dict[str, int] = field(default_factory=dict)
    readers: set[_Reader] = field(default_factory=set)
    #: hubs pushing or pulling now, with a count each (the listing)
    pushing: dict[str, int] = field(default_factory=dict)
    pulling: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    records_in: int = 0
    bytes_out: int = 0
    rate_in: RateMeter = field(default_factory=RateMeter)
    rate_out: RateMeter = field(default_factory=RateMeter)
    grown: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    trimmed: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    _saved_at: float = 0.0
    _dirty: bool = False
    #: the newest entries (see _remember): their starts, and (end, origin, records) each
    _recent_starts: list[int] = field(default_factory=list)
    _recent: list[tuple[int, str, bytes]] = field(default_factory=list)
    #: the oldest of them still counted; bytes of records from there on
    _recent_head: int = 0
    _recent_bytes: int = 0

    def __post_init__(self) -> None:
        segment = max(MIN_SEGMENT_BYTES, min(LOG_SEGMENT_BYTES, self.capacity // 8))
        self.log = RecordLog(self.directory / "log", segment)
        self._load()

    # -- state on disk -----------------------------------------------------------------------
    def _load(self) -> None:
        saved: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            loaded = json.loads((self.directory / "state.json").read_text())
            if isinstance(loaded, dict):
                saved = loaded
        kind = saved.get("contentType")
        self.content_type = kind if kind in CONTENT_TYPES else None
        for key, table in (("producers", self.producers), ("consumers", self.consumers)):
            values = saved.get(key)
            if isinstance(values, dict):
                table.update({str(k): int(v) for k, v in values.items() if isinstance(v, int) and v >= 0})
        log_end = saved.get("logEnd")
        if not self.log.end and isinstance(log_end, int) and log_end > 0:
            self.log.begin_at(log_end)  # the files went; the positions go on
        scan_from = (
            log_end
            if isinstance(log_end, int) and self.log.start <= log_end <= self.log.end
            else self.log.start
        )
        self._recover(scan_from)
        for hub, position in list(self.consumers.items()):
            self.consumers[hub] = min(max(position, self.log.start), self.log.end)

    def _recover(self, position: int) -> None:
        """Read the entries past the last save for their origins' offsets; cut a torn one."""
        while position < self.log.end:
            head = self.log.read(position, _ENTRY.size)
            if len(head) < _ENTRY.size:
                break
            length, origin_length, origin_end = _ENTRY.unpack(head)
            size = _ENTRY.size + origin_length + length
            if position + size > self.log.end:
                break
            origin = self.log.read(position + _ENTRY.size, origin_length).decode("utf-8", "replace")
            if origin:
                self.producers[origin] = max(self.producers.get(origin, 0), origin_end)
            position += size
        if position < self.log.end:
            logger.warning("topic %s/%s: a torn last record cut off the log", self.space, self.name)
            self.log.truncate(position)

    def save(self, *, now: bool = False) -> None:
        self._dirty = True
        if not now and time.monotonic() - self._saved_at < STATE_SAVE_SECONDS:
            return
        state = {
            "contentType": self.content_type,
            "producers": self.producers,
            "consumers": self.consumers,
            "logEnd": self.log.end,
        }
        write_atomic(self.directory / "state.json", json.dumps(state).encode(), 0o600)
        self._saved_at = time.monotonic()
        self._dirty = False

    def flush(self) -> None:
        if self._dirty:
            self.save(now=True)

    # -- what it is ---------------------------------------------------------------------------
    @property
    def wanted(self) -> bool:
        return bool(self.consumers or self.readers)

    def wanted_by_others(self, hub: str | None) -> bool:
        return bool(self.readers) or any(consumer != hub for consumer in self.consumers)

    @property
    def low_mark(self) -> int:
        """The position every consumer hub and reader has taken the log up to."""
        positions = [*self.consumers.values(), *(reader.position for reader in self.readers)]
        return min(positions) if positions else self.log.end

    @property
    def unread(self) -> int:
        """Log bytes the slowest consumer has not taken: what the capacity bounds (the disk
        holds up to a segment more, as the log is trimmed by whole segments)."""
        return self.log.end - self.low_mark

    def backlog(self, hub: str) -> int:
        """Log bytes consumer ``hub`` has not taken yet."""
        position = self.consumers.get(hub)
        return 0 if position is None else self.log.end - position

    def info(self) -> dict[str, Any]:
        return {
            "contentType": self.content_type or DEFAULT_CONTENT_TYPE,
            "bytes": self.bytes_in,
            "records": self.records_in,
            "bytesOut": self.bytes_out,
            "bytesPerSecondIn": round(self.rate_in.rate()),
            "bytesPerSecondOut": round(self.rate_out.rate()),
            "backlog": self.unread,
            "consumerBacklogs": {hub: self.backlog(hub) for hub in sorted(self.consumers)},
            "readers": len(self.readers),
            "pushing": sorted(self.pushing),
            "pulling": sorted(self.pulling),
        }

    def set_type(self, content_type: str | None) -> None:
        if self.content_type is None and content_type is not None:
            self.content_type = content_type
            self.save(now=True)

    # -- writing -------------------------------------------------------------------------------
    def _kept_for(self, origin: str) -> bool:
        """Whether records from ``origin`` have anyone to go to."""
        return self.wanted_by_others(origin)

    async def append(self, origin: str, origin_end: int, records: bytes) -> None:
        """Store ``records`` (whole ones) from ``origin``; waits while the log is full."""
        if self._kept_for(origin):
            while self.unread >= self.capacity:
                await self.trimmed.park()
            raw = origin.encode()
            start = self.log.end
            self.log.append(_ENTRY.pack(len(records), len(raw), origin_end), raw, records)
            self._remember(start, origin, records)
            self.grown.unpark_all()
        if origin:
            self.producers[origin] = origin_end
        self.bytes_in += len(records)
        self.rate_in.add(len(records))
        self.records_in += records.count(b"\n")
        self.save()

    # -- reading -------------------------------------------------------------------------------
    def _remember(self, start: int, origin: str, records: bytes) -> None:
        """Keep the newest entries in memory too: readers at the end of the log (the usual
        case) take them from here, not from the file."""
        self._recent_starts.append(start)
        self._recent.append((self.log.end, origin, records))
        self._recent_bytes += len(records)
        while self._recent_bytes > RECENT_BYTES and self._recent_head < len(self._recent) - 1:
            self._recent_bytes -= len(self._recent[self._recent_head][2])
            self._recent_head += 1
        if self._recent_head > 1024 and self._recent_head * 2 > len(self._recent):
            del self._recent[: self._recent_head], self._recent_starts[: self._recent_head]
            self._recent_head = 0

    def _entries_in_memory(self, position: int) -> tuple[list[tuple[int, str, bytes]], int] | None:
        starts = self._recent_starts
        index = bisect.bisect_left(starts, position, self._recent_head)
        if index >= len(starts) or starts[index] != position:
            return None
        found: list[tuple[int, str, bytes]] = []
        size = 0
        while index < len(starts) and size < READ_BYTES:
            entry = self._recent[index]
            found.append(entry)
            size += len(entry[2])
            position = entry[0]
            index += 1
        return found, position

    def entries(self, position: int) -> tuple[list[tuple[int, str, bytes]], int]:
        """The entries from ``position`` (up to about :data:`READ_BYTES`) as ``(end, origin,
        records)``, and the position past them."""
        if position >= self.log.end:
            return [], position
        remembered = self._entries_in_memory(position)
        if remembered is not None:
            return remembered
        found: list[tuple[int, str, bytes]] = []
        position = max(position, self.log.start)
        while position < self.log.end:
            data = self.log.read(position, READ_BYTES)
            view = memoryview(data)
            at = 0
            while at + _ENTRY.size <= len(view):
                length, origin_length, _origin_end = _ENTRY.unpack_from(view, at)
                size = _ENTRY.size + origin_length + length
                if at + size > len(view):
                    break
                origin = bytes(view[at + _ENTRY.size : at + _ENTRY.size + origin_length]).decode(
                    "utf-8", "replace"
                )
                records = bytes(view[at + _ENTRY.size + origin_length : at + size])
                at += size
                found.append((position + at, origin, records))
            if at == 0:  # one entry larger than a read: read it whole
                length, origin_length, _origin_end = _ENTRY.unpack(self.log.read(position, _ENTRY.size))
                size = _ENTRY.size + origin_length + length
                whole = self.log.read(position, size)
                origin = whole[_ENTRY.size : _ENTRY.size + origin_length].decode("utf-8", "replace")
                found.append((position + size, origin, whole[_ENTRY.size + origin_length :]))
                at = size
            position += at
            if found:
                break
        return found, position

    def trim(self) -> None:
        low = self.low_mark
        self.log.trim(low)
        # What every consumer has taken is not kept in memory either: an idle topic holds none.
        while self._recent_head < len(self._recent) and self._recent[self._recent_head][0] <= low:
            self._recent_bytes -= len(self._recent[self._recent_head][2])
            self._recent_head += 1
        if self._recent_head == len(self._recent):
            self._recent.clear()
            self._recent_starts.clear()
            self._recent_head = 0
        self.trimmed.unpark_all()

    def close(self) -> None:
        self.flush()
        self.log.close()


class SpaceTopics:
    """Every Space's topics on this manager."""

    def __init__(self, directory: Path, capacity: int = TOPIC_LOG_BYTES) -> None:
        self.directory = directory
        self.capacity = capacity
        self._topics: dict[tuple[str, str], SpaceTopic] = {}
        #: per space: unparked when its wanted names change
        self._wanted_changed: dict[str, trio.lowlevel.ParkingLot] = {}
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for space_dir in sorted(directory.iterdir()):
            if not space_dir.is_dir():
                continue
            for topic_dir in sorted(space_dir.iterdir()):
                if topic_dir.is_dir() and NAME_PATTERN.match(topic_dir.name):
                    self._topics[(space_dir.name, topic_dir.name)] = SpaceTopic(
                        space_dir.name, topic_dir.name, topic_dir, capacity
                    )

    def all(self) -> list[SpaceTopic]:
        return list(self._topics.values())

    def in_space(self, space: str) -> list[SpaceTopic]:
        return [topic for (owner, _name), topic in sorted(self._topics.items()) if owner == space]

    def get(self, space: str, name: str) -> SpaceTopic | None:
        return self._topics.get((space, name))

    def ensure(self, space: str, name: str, content_type: str | None = None) -> SpaceTopic:
        check_name(name)
        topic = self._topics.get((space, name))
        if topic is None:
            topic = SpaceTopic(space, name, self.directory / space / name, self.capacity)
            self._topics[(space, name)] = topic
            logger.info("space %s: topic %s", space, name)
        topic.set_type(content_type)
        return topic

    def wanted(self, space: str, hub: str | None = None) -> list[str]:
        """The topics of ``space`` someone consumes; with ``hub``, someone other than that
        hub (what it should send: its own consumers have its records already)."""
        return [topic.name for topic in self.in_space(space) if topic.wanted_by_others(hub)]

    def _wanted_lot(self, space: str) -> trio.lowlevel.ParkingLot:
        return self._wanted_changed.setdefault(space, trio.lowlevel.ParkingLot())

    def _changed(self, topic: SpaceTopic) -> None:
        topic.trim()
        topic.save(now=True)
        self._wanted_lot(topic.space).unpark_all()

    def close(self) -> None:
        for topic in self._topics.values():
            topic.close()

    def forget_revoked(self, standing: dict[str, tuple[str, str | None]]) -> None:
        """Keep nothing more for hubs revoked or removed (given every hub's space and
        revocation reason): a hub that will not come back must not hold a topic's backlog."""
        for topic in self._topics.values():
            gone = [
                hub
                for hub in topic.consumers
                if standing.get(hub, (None, "removed"))[1] is not None or standing[hub][0] != topic.space
            ]
            for hub in gone:
                del topic.consumers[hub]
                logger.info(
                    "space %s: revoked hub %s consumes topic %s no more", topic.space, hub, topic.name
                )
            if gone:
                self._changed(topic)

    # -- the Space API -------------------------------------------------------------------------
    async def post(self, space: str, name: str, content_type: str | None, body: AsyncIterator[bytes]) -> int:
        """Write a request body into the topic, in whole records; the bytes written."""
        kind = check_content_type(content_type)
        topic = self.ensure(space, name, kind)
        kind = topic.content_type or DEFAULT_CONTENT_TYPE
        whole_lines = kind in NDJSON_TYPES or kind == "text/plain"
        pending = b""
        written = 0
        async for chunk in body:
            ready, pending = split_records(pending, chunk, whole_lines)
            for start in range(0, len(ready), MAX_ENTRY_BYTES):
                await topic.append(API_ORIGIN, 0, ready[start : start + MAX_ENTRY_BYTES])
            written += len(chunk)
        if pending:
            if kind in NDJSON_TYPES:
                pending += b"\n"
            await topic.append(API_ORIGIN, 0, pending)
        return written

    def read(
        self, space: str, name: str, content_type: str | None
    ) -> tuple[SpaceTopic, AsyncIterator[bytes], Callable[[], None]]:
        """A Space API reader from now on: the topic, its records, and what ends it."""
        topic = self.ensure(space, name, check_content_type(content_type))
        reader = _Reader(topic.log.end)
        topic.readers.add(reader)
        self._changed(topic)

        def close() -> None:
            if reader in topic.readers:
                topic.readers.discard(reader)
                self._changed(topic)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    found, position = topic.entries(reader.position)
                    if not found:
                        await topic.grown.park()
                        continue
                    data = b"".join(records for _end, _origin, records in found)
                    topic.bytes_out += len(data)
                    topic.rate_out.add(len(data))
                    yield data
                    reader.position = position
                    topic.trim()
            finally:
                close()

        return topic, chunks(), close

    # -- the hubs' streams ---------------------------------------------------------------------
    async def serve_hub_stream(self, hub: str, space: str, stream: InboundStream) -> None:
        """A stream a hub opened (:mod:`spacehub.protocol.topics`)."""
        path = stream.path.split("?", 1)[0]
        parts = [unquote(part) for part in path.strip("/").split("/")]
        try:
            if stream.method == "GET" and parts == ["space-topics"]:
                await self._serve_wanted(space, hub, stream)
            elif len(parts) == 3 and parts[0] == "space-topics" and parts[2] in ("push", "pull"):
                topic = self.ensure(space, parts[1])
                if stream.method == "POST" and parts[2] == "push":
                    await self._serve_push(hub, topic, stream)
                elif stream.method == "POST":
                    await self._serve_pull(hub, topic, stream)
                elif stream.method == "DELETE":
                    if topic.consumers.pop(hub, None) is not None:
                        logger.info("space %s: hub %s consumes topic %s no more", space, hub, topic.name)
                        self._changed(topic)
                    await stream.respond_whole(204, [], b"")
                else:
                    await _answer(stream, 405, "method not allowed")
            else:
                await _answer(stream, 404, f"no such link route: {stream.method} {path}")
        except ManagerError as exc:
            await _answer(stream, exc.status, exc.message)

    async def _serve_wanted(self, space: str, hub: str, stream: InboundStream) -> None:
        await stream.respond(200, [("content-type", "application/x-ndjson")])
        lot = self._wanted_lot(space)
        sent: list[str] | None = None
        while True:
            wanted = self.wanted(space, hub)
            if wanted != sent:
                await stream.send(json.dumps({"wanted": wanted}).encode() + b"\n")
                sent = wanted
            await lot.park()

    async def _serve_push(self, hub: str, topic: SpaceTopic, stream: InboundStream) -> None:
        offset = _offset(stream)
        if offset is None:
            raise BadRequest("x-offset is required")
        topic.set_type(check_content_type(_header(stream, "content-type")))
        stored = topic.producers.get(hub, 0)
        if offset > stored:
            # Only a manager that lost its files gets here: what the hub spooled before
            # ``offset`` it has already had acknowledged by us.
            stored = offset
        await stream.respond(200, [("content-type", "application/octet-stream")])
        frames = FrameReader(ENTRY)
        position = offset
        _count(topic.pushing, hub, +1)
        try:
            await stream.send(ack(stored))  # what it need not send again
            acked = stored
            async for chunk in stream.body():
                frames.feed(chunk)
                for (length,), records in frames.frames():
                    position += ENTRY.size + length
                    if position > stored:
                        await topic.append(hub, position, records)
                        stored = position
                # One ack for what came in together: while more is already buffered, the
                # next chunk's ack covers this one (an ack is a message each way to pay for).
                if stored != acked and (stream.buffered == 0 or stored - acked >= ACK_EVERY_BYTES):
                    await stream.send(ack(stored))
                    acked = stored
            await stream.end()
        except FrameError as exc:
            await stream.reset(str(exc))
        finally:
            _count(topic.pushing, hub, -1)

    async def _serve_pull(self, hub: str, topic: SpaceTopic, stream: InboundStream) -> None:
        offset = _offset(stream)
        known = topic.consumers.get(hub)
        position = offset if offset is not None else known if known is not None else topic.log.end
        if position < topic.log.start:
            logger.warning(
                "space %s topic %s: hub %s asks from %d, but the log starts at %d",
                topic.space,
                topic.name,
                hub,
                position,
                topic.log.start,
            )
        position = min(max(position, topic.log.start), topic.log.end)
        if known is None:
            logger.info("space %s: hub %s consumes topic %s", topic.space, hub, topic.name)
        topic.consumers[hub] = position
        self._changed(topic)
        await stream.respond(200, [("content-type", "application/octet-stream")])
        _count(topic.pulling, hub, +1)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._take_acks, hub, topic, stream)
                await self._deliver(hub, topic, stream, position)
        finally:
            _count(topic.pulling, hub, -1)

    async def _take_acks(self, hub: str, topic: SpaceTopic, stream: InboundStream) -> None:
        frames = FrameReader(ACK, sized=False)
        async for chunk in stream.body():
            frames.feed(chunk)
            latest = None
            for (value,), _payload in frames.frames():
                latest = value
            if latest is not None and hub in topic.consumers:
                topic.consumers[hub] = min(max(topic.consumers[hub], latest), topic.log.end)
                topic.trim()
                topic.save()

    async def _deliver(self, hub: str, topic: SpaceTopic, stream: InboundStream, position: int) -> None:
        sent = position
        while True:
            found, next_position = topic.entries(position)
            if not found:
                if sent != position:  # only other hubs' records since: say so, then wait
                    await stream.send(delivery(position, b""))
                    sent = position
                await topic.grown.park()
                continue
            data = b"".join(records for _end, origin, records in found if origin != hub)
            position = next_position
            if data:
                await stream.send(delivery(position, data))
                sent = position
                topic.bytes_out += len(data)
                topic.rate_out.add(len(data))


def topic_listing(topics: SpaceTopics, space: str, hub_items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each topic of the Space once: its content type, who produces and consumes it on
    each hub (as the hubs last reported), and what the manager has seen and keeps."""
    names: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        if name not in names:
            names[name] = {"name": name, "topic": name, "topicName": name, "hubs": {}}
        return names[name]

    for item in hub_items:
        name = item.get("topic") or item.get("name")
        if not isinstance(name, str):
            continue
        listed = entry(name)
        listed.setdefault("contentType", item.get("contentType"))
        listed["hubs"][str(item.get("hub"))] = {
            "providers": item.get("providers", []),
            "consumers": item.get("consumers", []),
            "spoolBacklog": item.get("spoolBacklog", 0),
        }
    for topic in topics.in_space(space):
        listed = entry(topic.name)
        info = topic.info()
        listed.update({k: v for k, v in info.items() if k != "contentType"})
        listed.setdefault("contentType", info["contentType"])
    for listed in names.values():
        hubs = listed["hubs"]
        listed["producers"] = sorted(
            {hub for hub, seen in hubs.items() if seen["providers"]} | set(listed.get("pushing", []))
        )
        listed["consumers"] = sorted(
            {hub for hub, seen in hubs.items() if seen["consumers"]} | set(listed.get("consumerBacklogs", {}))
        )
        listed["spoolBacklog"] = sum(int(seen.get("spoolBacklog") or 0) for seen in hubs.values())
    return [names[name] for name in sorted(names)]


def _count(table: dict[str, int], who: str, delta: int) -> None:
    table[who] = table.get(who, 0) + delta
    if table[who] <= 0:
        del table[who]


def _header(stream: InboundStream, name: str) -> str | None:
    for key, value in stream.headers:
        if key.lower() == name:
            return value
    return None


def _offset(stream: InboundStream) -> int | None:
    value = _header(stream, "x-offset")
    if value is None:
        return None
    if not value.isdigit() or len(value) > 19:
        raise BadRequest(f"x-offset must be a byte offset, not {value!r}")
    return int(value)


async def _answer(stream: InboundStream, status: int, message: str) -> None:
    with contextlib.suppress(LinkClosed, StreamAborted):
        body = json.dumps({"error": message}).encode()
        await stream.respond_whole(status, [("content-type", "application/json")], body)
