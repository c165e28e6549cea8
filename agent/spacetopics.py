"""The hub's side of Space-wide topics: push what it produces, pull what it consumes.

Theory of operation
-------------------
A hub linked to a Space carries its topics to the manager and back
(docs/data-spaces.md; the streams are in :mod:`spacehub.protocol.topics`):

- **Wanted names.** The manager tells which topics of the Space have consumers
  (``GET /space-topics``); the hub keeps the latest list in ``wanted.json`` so that
  it goes on spooling them across a restart while the link is down.
- **Producing.** Every whole record a local producer writes to a wanted topic is
  appended to that topic's *outbound spool* (``<data dir>/topics/out/<name>/``)
  before local readers get it. A pusher sends the spool from the last offset the
  manager acknowledged and trims what it acknowledged. A spool holds at most
  ``--topic-spool-bytes``, and all spools together ``--topic-spool-total-bytes``;
  past that the producer waits (back-pressure, never a drop). The spool survives
  the hub: what was produced while the link (or the hub) was down goes out after.
- **Consuming.** For each topic with local consumers a puller asks the manager for
  the Space's records from the offset it last handed on (``topics/in/<name>``) and
  writes them into the local topic, where they reach its readers as local records
  do (never sent back out). The offset moves, on disk, as the local readers take
  the records (the topic's mark), and goes to the manager as the acknowledgement;
  so after a cut link or a restart the next pull starts exactly there. A topic
  without local consumers for :data:`UNSUBSCRIBE_AFTER` seconds is given up
  (``DELETE .../pull``): the Space keeps nothing more for this hub.

Each pusher and puller is a link stream of its own: a slow topic holds back its
own producers, never the link's heartbeats, calls or other topics.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import trio

from spacehub.protocol.topics import ACK, DELIVERY, ENTRY, NAME_PATTERN, FrameError, FrameReader, ack
from spacehub.server.files import write_atomic
from spacehub.server.link.session import LinkClosed, LinkSession, OutboundStream, StreamAborted
from spacehub.server.recordlog import OffsetFile, RecordLog

from . import limits
from .topics import Topic, TopicRouter

__all__ = ["UNSUBSCRIBE_AFTER", "SpaceTopicBridge"]

logger = logging.getLogger("agent.spacetopics")

#: Seconds a topic may have no local consumer before the hub stops consuming it in the
#: Space (an instance restarting, a reader reconnecting, keep their place).
UNSUBSCRIBE_AFTER: Final = 10.0
#: Seconds before a pusher or puller whose stream failed tries again.
RETRY_SECONDS: Final = 1.0
#: Seconds between a puller's acknowledgements while records keep coming.
ACK_INTERVAL: Final = 0.05
#: Bytes of spool sent per read.
PUSH_READ_BYTES: Final = 256 * 1024
#: The largest delivery a puller takes (a delivery header and its records).
MAX_DELIVERY_BYTES: Final = 1024 * 1024


@dataclass(eq=False)
class OutSpool:
    """One topic's outbound spool: records produced here, kept until the manager has them."""

    name: str
    directory: Path
    log: RecordLog = field(init=False)
    acked_file: OffsetFile = field(init=False)
    acked: int = 0
    grown: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    def __post_init__(self) -> None:
        self.log = RecordLog(self.directory, limits.TOPIC_SPOOL_SEGMENT_BYTES)
        self.acked_file = OffsetFile(self.directory / "acked")
        saved = self.acked_file.value or 0
        self.acked = min(max(saved, self.log.start), self.log.end)

    @property
    def backlog(self) -> int:
        """Bytes produced that the manager has not acknowledged."""
        return self.log.end - self.acked

    def take_ack(self, offset: int) -> None:
        if offset <= self.acked:
            return
        self.acked = min(offset, self.log.end)
        self.acked_file.set(self.acked)
        self.log.trim(self.acked)


@dataclass(eq=False)
class InCursor:
    """Where this hub is in the Space's log of one topic, handed on and taken locally."""

    name: str
    file: OffsetFile
    #: (local stream position, Space log offset): once local readers pass the first,
    #: the records up to the second have been taken
    pending: deque[tuple[int, int]] = field(default_factory=deque)
    moved: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    @property
    def offset(self) -> int | None:
        return self.file.value

    def handed(self, local_end: int, space_offset: int) -> None:
        """Records up to ``space_offset`` were written into the local topic up to
        ``local_end`` (-1: none were, they were all this hub's own)."""
        if local_end >= 0:
            self.pending.append((local_end, space_offset))
        elif self.pending:  # taken with the records before it (one entry: a bound)
            self.pending[-1] = (self.pending[-1][0], space_offset)
        else:
            self._taken(space_offset)

    def mark_moved(self, position: int) -> None:
        taken = None
        while self.pending and self.pending[0][0] <= position:
            taken = self.pending.popleft()[1]
        if taken is not None:
            self._taken(taken)

    def _taken(self, offset: int) -> None:
        self.file.set(offset)
        self.moved.unpark_all()


class SpaceTopicBridge:
    """See the module docstring."""

    def __init__(
        self,
        directory: Path,
        router: TopicRouter,
        *,
        spool_bytes: int = limits.TOPIC_SPOOL_BYTES,
        spool_total_bytes: int = limits.TOPIC_SPOOL_TOTAL_BYTES,
        unsubscribe_after: float = UNSUBSCRIBE_AFTER,
    ) -> None:
        self.directory = directory
        self.router = router
        self.spool_bytes = spool_bytes
        self.spool_total_bytes = spool_total_bytes
        self.unsubscribe_after = unsubscribe_after
        (directory / "out").mkdir(parents=True, exist_ok=True, mode=0o700)
        (directory / "in").mkdir(parents=True, exist_ok=True, mode=0o700)
        self.wanted: set[str] = set()
        with contextlib.suppress(FileNotFoundError, ValueError):
            saved = json.loads((directory / "wanted.json").read_text())
            if isinstance(saved, list):
                self.wanted = {name for name in saved if isinstance(name, str) and NAME_PATTERN.match(name)}
        self.spools: dict[str, OutSpool] = {}
        for item in sorted((directory / "out").iterdir()):
            if item.is_dir() and NAME_PATTERN.match(item.name):
                self.spools[item.name] = OutSpool(item.name, item)
        self.cursors: dict[str, InCursor] = {}
        for item in sorted((directory / "in").iterdir()):
            if NAME_PATTERN.match(item.name):
                self.cursors[item.name] = InCursor(item.name, OffsetFile(item))
        #: unparked when a spool has room again (any topic: the total bound is shared)
        self._room = trio.lowlevel.ParkingLot()
        #: set when something the arranger looks at changed
        self._poke = trio.Event()
        self._session: LinkSession | None = None
        self._session_changed = trio.Event()
        #: trio time each subscribed topic was last seen without local consumers
        self._idle_since: dict[str, float] = {}
        #: records produced and delivered through the Space (metrics)
        self.bytes_pushed = 0
        self.bytes_pulled = 0

    # -- what the router and the link call ----------------------------------------------------
    def set_session(self, session: LinkSession | None) -> None:
        self._session = session
        self._session_changed.set()
        self._session_changed = trio.Event()

    def consumers_changed(self, topic: Topic) -> None:
        self._poke.set()

    async def produced(self, topic: Topic, records: bytes | memoryview) -> bool:
        if topic.name not in self.wanted:
            return False
        spool = self._spool(topic.name)
        while spool.backlog >= self.spool_bytes or self.backlog() >= self.spool_total_bytes:
            await self._room.park()
        spool.log.append(ENTRY.pack(len(records)), records)
        spool.grown.unpark_all()
        return True

    def _spool(self, name: str) -> OutSpool:
        spool = self.spools.get(name)
        if spool is None:
            spool = self.spools[name] = OutSpool(name, self.directory / "out" / name)
            self._poke.set()
        return spool

    def backlog(self, name: str | None = None) -> int:
        """Bytes produced here that the manager has not acknowledged (one topic, or all)."""
        if name is not None:
            spool = self.spools.get(name)
            return 0 if spool is None else spool.backlog
        return sum(spool.backlog for spool in self.spools.values())

    def status(self) -> dict[str, Any]:
        """What ``/status`` shows under ``spaceTopics``."""
        return {
            "wanted": sorted(self.wanted),
            "spoolBacklogBytes": self.backlog(),
            "spools": {name: spool.backlog for name, spool in sorted(self.spools.items())},
            "consuming": {name: cursor.offset for name, cursor in sorted(self.cursors.items())},
        }

    def close(self) -> None:
        for spool in self.spools.values():
            spool.log.close()
            spool.acked_file.close()
        for cursor in self.cursors.values():
            cursor.file.close()

    # -- the service ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                session = self._session
                if session is None or session.closed:
                    await self._session_changed.wait()
                    continue
                changed = self._session_changed
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._arrange, session, nursery)
                    nursery.start_soon(_cancel_when, changed, nursery.cancel_scope)
        finally:
            self.close()

    async def _arrange(self, session: LinkSession, nursery: trio.Nursery) -> None:
        """Keep one pusher per spool and one puller per consumed topic on this session."""
        running: dict[tuple[str, str], trio.CancelScope] = {}

        async def keep(kind: str, name: str, scope: trio.CancelScope) -> None:
            with scope:
                while not session.closed:
                    try:
                        if kind == "push":
                            await self._push(session, name)
                        elif kind == "pull":
                            await self._pull(session, name)
                        else:
                            await self._watch_wanted(session)
                    except BaseException as exc:  # sorted below; cancellation is re-raised
                        closed, failed, rest = _sort_failure(exc)
                        if rest is not None and not _only_errors(rest):
                            raise
                        if rest is not None:  # a bug or a disk error: the hub goes on, this is retried
                            logger.error(
                                "space topic %s (%s) failed; again in %g s",
                                name,
                                kind,
                                RETRY_SECONDS,
                                exc_info=rest,
                            )
                        elif closed:
                            return
                        else:
                            logger.warning(
                                "space topic %s (%s): %s; again in %g s", name, kind, failed, RETRY_SECONDS
                            )
                    await trio.sleep(RETRY_SECONDS)
            running.pop((kind, name), None)

        def start(kind: str, name: str) -> None:
            if (kind, name) not in running:
                scope = running[(kind, name)] = trio.CancelScope()
                nursery.start_soon(keep, kind, name, scope)

        start("wanted", "")
        while True:
            self._poke = trio.Event()
            now = trio.current_time()
            for name in list(self.spools):
                start("push", name)
            for topic in self.router.list():
                if topic.consumers:
                    self._idle_since.pop(topic.name, None)
                    start("pull", topic.name)
            for name in list(self.cursors):
                topic_now = self.router.find(name)
                if topic_now is not None and topic_now.consumers:
                    continue
                since = self._idle_since.setdefault(name, now)
                if now - since >= self.unsubscribe_after:
                    scope = running.pop(("pull", name), None)
                    if scope is not None:
                        scope.cancel()
                    try:
                        await self._unsubscribe(session, name)
                    except BaseException as exc:  # cancellation is re-raised
                        closed, failed, rest = _sort_failure(exc)
                        if rest is not None and not _only_errors(rest):
                            raise
                        if closed:
                            return
                        logger.warning("space topic %s: not given up yet: %s", name, failed or rest)
            with trio.move_on_after(1.0):
                await self._poke.wait()

    async def _watch_wanted(self, session: LinkSession) -> None:
        stream = await session.open_stream("GET", "/space-topics", [], end=True)
        await _expect_ok(stream)
        lines = b""
        async for chunk in stream.body():
            lines += chunk
            while b"\n" in lines:
                line, lines = lines.split(b"\n", 1)
                message = json.loads(line)
                names = message.get("wanted") if isinstance(message, dict) else None
                if isinstance(names, list):
                    self._set_wanted({n for n in names if isinstance(n, str) and NAME_PATTERN.match(n)})
            if len(lines) > limits.MAX_CONTROL_LINE_BYTES:
                raise ValueError("the manager's wanted list is too long")
        raise StreamAborted("the manager ended the wanted list")

    def _set_wanted(self, names: set[str]) -> None:
        if names == self.wanted:
            return
        logger.info("the Space wants topics: %s", ", ".join(sorted(names)) or "none")
        self.wanted = names
        write_atomic(self.directory / "wanted.json", json.dumps(sorted(names)).encode(), 0o600)
        self._poke.set()

    async def _push(self, session: LinkSession, name: str) -> None:
        spool = self.spools[name]
        topic = self.router.find(name)
        headers = [("x-offset", str(spool.acked))]
        if topic is not None:
            headers.append(("content-type", topic.content_type))
        stream = await session.open_stream("POST", f"/space-topics/{quote(name)}/push", headers)

        async def body() -> AsyncIterator[bytes]:
            position = spool.acked
            while True:
                if position < spool.log.start:  # acknowledged meanwhile: trimmed
                    position = spool.log.start
                if position < spool.log.end:
                    data = spool.log.read(position, PUSH_READ_BYTES)
                    position += len(data)
                    self.bytes_pushed += len(data)
                    yield data
                else:
                    await spool.grown.park()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_body, body())
            await _expect_ok(stream)
            frames = FrameReader(ACK, sized=False)
            async for chunk in stream.body():
                frames.feed(chunk)
                for (offset,), _payload in frames.frames():
                    spool.take_ack(offset)
                self._room.unpark_all()
            nursery.cancel_scope.cancel()
        raise StreamAborted("the manager ended a push")

    async def _pull(self, session: LinkSession, name: str) -> None:
        cursor = self.cursors.get(name)
        if cursor is None:
            cursor = self.cursors[name] = InCursor(name, OffsetFile(self.directory / "in" / name))
        topic = self.router.find(name)
        if topic is None:
            return
        cursor.pending.clear()
        headers = [] if cursor.offset is None else [("x-offset", str(cursor.offset))]
        stream = await session.open_stream("POST", f"/space-topics/{quote(name)}/pull", headers)
        topic.mark_listeners.append(cursor.mark_moved)

        async def acks() -> AsyncIterator[bytes]:
            sent = None
            while True:
                if cursor.offset is not None and cursor.offset != sent:
                    sent = cursor.offset
                    yield ack(sent)
                    # At most one ack per interval: it only lets the manager trim its log
                    # (where to start again is on disk here), and each is a message to pay for.
                    await trio.sleep(ACK_INTERVAL)
                    continue  # it may have moved meanwhile
                await cursor.moved.park()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_body, acks())
                await _expect_ok(stream)
                frames = FrameReader(DELIVERY, max_payload=MAX_DELIVERY_BYTES)
                async for chunk in stream.body():
                    frames.feed(chunk)
                    for (end, _length), records in frames.frames():
                        if records:
                            await self.router.write_remote(topic, records)
                            self.bytes_pulled += len(records)
                            cursor.handed(topic.stream.end, end)
                        else:
                            cursor.handed(-1, end)
                nursery.cancel_scope.cancel()
        finally:
            with contextlib.suppress(ValueError):
                topic.mark_listeners.remove(cursor.mark_moved)
        raise StreamAborted("the manager ended a pull")

    async def _unsubscribe(self, session: LinkSession, name: str) -> None:
        stream = await session.open_stream("DELETE", f"/space-topics/{quote(name)}/pull", [], end=True)
        await _expect_ok(stream)
        cursor = self.cursors.pop(name, None)
        if cursor is not None:
            cursor.file.remove()
        self._idle_since.pop(name, None)
        logger.info("topic %s: no local consumers; no longer consumed from the Space", name)


#: What a pusher's or puller's stream may fail with and be tried again.
_RETRIED: Final = (StreamAborted, FrameError, ValueError, trio.ClosedResourceError)


def _sort_failure(exc: BaseException) -> tuple[bool, BaseException | None, BaseException | None]:
    """``(link closed, a failure to retry, anything else)`` in what a stream task raised
    (its nurseries wrap errors in groups)."""
    if isinstance(exc, LinkClosed):
        return True, None, None
    if isinstance(exc, _RETRIED):
        return False, exc, None
    if isinstance(exc, BaseExceptionGroup):
        closed, rest = exc.split(LinkClosed)
        failed, rest = rest.split(_RETRIED) if rest is not None else (None, None)
        return closed is not None, failed, rest
    return False, None, exc


def _only_errors(exc: BaseException) -> bool:
    """Whether ``exc`` (or every exception of a group) is an ordinary error, not a cancellation."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(Exception)[1] is None
    return isinstance(exc, Exception)


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _expect_ok(stream: OutboundStream) -> None:
    status, _headers = await stream.response()
    if status >= 300:
        detail = await stream.whole_body(4096)
        raise StreamAborted(
            f"the manager answered {status}: {(detail or b'').decode(errors='replace')[:200]}"
        )
