"""agent.topics.TopicRouter in-process, on the autojump clock: fan-out to every reader, whole
turns per writer, NDJSON records never glued, bounded back-pressure, and who is attached."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
from trio.testing import MockClock

from agent import limits
from agent.errors import UnsupportedMediaType
from agent.topics import TopicReader, TopicRouter


async def chunks(*parts: bytes, pause: float = 0.0) -> AsyncIterator[bytes]:
    for part in parts:
        if pause:
            await trio.sleep(pause)
        yield part


async def read_until_end(reader: TopicReader, into: bytearray) -> None:
    async for chunk in reader:
        into += chunk


async def test_every_reader_gets_every_byte(autojump_clock: MockClock) -> None:
    router = TopicRouter()
    topic = router.ensure("t", "text/plain")
    got = [bytearray(), bytearray()]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for into in got:
                nursery.start_soon(read_until_end, router.subscribe(topic, who="api"), into)
            await trio.testing.wait_all_tasks_blocked()
            assert topic.info()["consumers"] == ["api"]
            await router.write(topic, chunks(b"a\n", b"b\n"), who="api", end=True)
    assert got == [bytearray(b"a\nb\n")] * 2


async def test_two_writers_take_whole_turns_and_ndjson_records_stay_whole(autojump_clock: MockClock) -> None:
    router = TopicRouter()
    topic = router.ensure("t", "application/x-ndjson")
    got = bytearray()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_until_end, router.subscribe(topic, who="reader"), got)
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as writers:
                # The first writer's record ends without a newline: one is added before the next turn.
                writers.start_soon(lambda: router.write(topic, chunks(b'{"a":', b"1}", pause=1), who="w1"))
                await trio.sleep(0.5)
                writers.start_soon(lambda: router.write(topic, chunks(b'{"b":2}\n'), who="w2"))
            await router.write(topic, chunks(), who="w3", end=True)
    assert bytes(got) == b'{"a":1}\n{"b":2}\n'


async def test_a_slow_reader_holds_writers_back_at_the_bound(autojump_clock: MockClock) -> None:
    router = TopicRouter()
    topic = router.ensure("t", "application/octet-stream")
    reader = router.subscribe(topic, who="slow")
    block = b"x" * 65536
    total = limits.TOPIC_BUFFER_BYTES * 3
    written = 0

    async def produce() -> AsyncIterator[bytes]:
        nonlocal written
        while written < total:
            written += len(block)
            yield block

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: router.write(topic, produce(), who="fast", end=True))
            await trio.sleep(60)  # nobody reads: the writer stops at the bound, however long
            assert written <= limits.TOPIC_BUFFER_BYTES + 2 * len(block)
            received = 0
            async for chunk in reader:  # reading lets it go on, to the end
                received += len(chunk)
            assert received == total
    reader.close()
    assert topic.info()["consumers"] == []


def test_a_topic_keeps_its_content_type() -> None:
    router = TopicRouter()
    router.ensure("t", "text/plain")
    with pytest.raises(UnsupportedMediaType, match="carries text/plain"):
        router.ensure("t", "application/x-ndjson")
