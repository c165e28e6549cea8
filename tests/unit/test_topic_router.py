"""TopicRouter: bytes from producers to consumers, with back-pressure and never a
drop; writers take whole turns; a topic outlives its producers; content types. Virtual time.

A topic only ends when it is deleted; tests that need their readers to finish close the
topic's stream (what deleting does)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from functools import partial

import pytest
import trio
import trio.testing

from agent import limits
from agent.errors import BadRequest, Conflict, NotFound, UnsupportedMediaType
from agent.topics import Topic, TopicRouter

BOUND = limits.TOPIC_BUFFER_BYTES


async def body(chunks: Iterable[bytes], pause: float = 0.0) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await trio.sleep(pause)
        yield chunk


async def read_all(
    router: TopicRouter, topic: Topic, who: str, into: list[bytes], pause: float = 0.0
) -> None:
    with router.subscribe(topic, who=who) as reader:
        async for chunk in reader:
            into.append(chunk)
            await trio.sleep(pause)


async def test_producer_to_several_consumers(autojump_clock: trio.testing.MockClock) -> None:
    router = TopicRouter()
    topic = router.ensure("numbers", "application/octet-stream")
    chunks = [bytes([n]) * 1000 for n in range(256)]
    got: dict[str, list[bytes]] = {"fast": [], "slow": []}
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all, router, topic, "fast", got["fast"])
            nursery.start_soon(read_all, router, topic, "slow", got["slow"], 0.1)
            await trio.sleep(0.01)
            assert topic.info()["consumers"] == ["fast", "slow"]
            written = await router.write(topic, body(chunks), who="producer")
            await trio.sleep(60)
            topic.stream.close()
    assert written == 256_000
    assert b"".join(got["fast"]) == b"".join(got["slow"]) == b"".join(chunks)
    assert topic.consumers == {} and topic.providers == {}


async def test_no_reader_back_pressures_the_writer_and_keeps_every_byte(
    autojump_clock: trio.testing.MockClock,
) -> None:
    router = TopicRouter()
    topic = router.ensure("t", "application/octet-stream")
    chunk = b"x" * 64 * 1024
    sent = 0

    async def produce() -> None:
        nonlocal sent
        for _ in range(2 * BOUND // len(chunk)):
            await router.write(topic, body([chunk]), who="producer")
            sent += len(chunk)

    received: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        await trio.sleep(10)
        assert sent == BOUND and topic.stream.buffered == BOUND  # the writer waits at the bound
        assert topic.info()["providers"] == ["producer"]
        with trio.fail_after(60):
            nursery.start_soon(read_all, router, topic, "late", received)
            while sent < 2 * BOUND:
                await trio.sleep(0.1)
        await trio.sleep(10)
        topic.stream.close()
    assert b"".join(received) == chunk * (2 * BOUND // len(chunk))  # what was kept came first


async def test_slow_consumer_paces_the_producer(autojump_clock: trio.testing.MockClock) -> None:
    router = TopicRouter()
    topic = router.ensure("t", "application/octet-stream")
    chunk = b"y" * 256 * 1024
    received: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, router, topic, "slow", received, 1.0)  # a chunk a second
        await trio.sleep(0.01)
        began = trio.current_time()
        with trio.fail_after(600):
            await router.write(topic, body([chunk] * 40), who="producer")
        # 10 MiB through a 1 MiB buffer read at 256 KiB/s: the writer waited for the reader.
        assert trio.current_time() - began >= 40 - BOUND // len(chunk) - 1
        await trio.sleep(60)
        topic.stream.close()
    assert b"".join(received) == chunk * 40


async def test_writers_take_whole_turns_and_ndjson_records_stay_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    router = TopicRouter()
    topic = router.ensure("t", None)
    assert topic.content_type == "application/x-ndjson"
    received: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, router, topic, "reader", received)
        await trio.sleep(0.01)
        async with trio.open_nursery() as writers:
            writers.start_soon(
                partial(router.write, who="a"), topic, body([b'{"a":', b"1}\n", b'{"a":2}'], 1.0)
            )
            await trio.sleep(0.5)
            writers.start_soon(partial(router.write, who="b"), topic, body([b'{"b":1}\n'], 0.1))
        await trio.sleep(1)
        topic.stream.close()
    assert b"".join(received) == b'{"a":1}\n{"a":2}\n{"b":1}\n'


async def test_a_topic_outlives_its_producers(autojump_clock: trio.testing.MockClock) -> None:
    """What one producer posts before any reader is kept for the first one; a reader that stays
    gets one producer's data after another, in order (``si topic send`` of a.txt, b.txt, c.txt)."""
    router = TopicRouter()
    topic = router.ensure("names", "text/plain")
    with trio.fail_after(5):
        await router.write(topic, body([b"Alice\n"]), who="api")  # nobody reads yet
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, router, topic, "reader", got)
        await trio.sleep(0.01)
        for names in (b"Bob\n", b"Carol\nDave\n"):
            with trio.fail_after(5):
                await router.write(topic, body([names]), who="api")
            await trio.sleep(1)
        assert topic.info()["consumers"] == ["reader"]  # still attached: nothing ended it
        topic.stream.close()
    assert b"".join(got) == b"Alice\nBob\nCarol\nDave\n"


def test_an_instance_may_connect_to_a_topic_of_another_type() -> None:
    router = TopicRouter()
    topic = router.ensure("t", "text/plain")
    assert router.ensure_any("t", "application/x-ndjson") is topic
    assert router.ensure_any("new", "application/octet-stream").content_type == "application/octet-stream"


async def test_deleting_a_topic_ends_its_readers_and_refuses_writers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    router = TopicRouter()
    topic = router.ensure("t", "text/plain")
    received: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, router, topic, "reader", received)
        await trio.sleep(0.01)
        router.delete("t")
    with pytest.raises(trio.ClosedResourceError):
        await router.write(topic, body([b"late"]), who="api")
    assert topic.providers == {}
    with pytest.raises(NotFound):
        router.get("t")


def test_names_and_content_types() -> None:
    router = TopicRouter()
    topic = router.create("t", "text/plain; charset=utf-8")
    assert topic.content_type == "text/plain"
    assert router.ensure("t", None) is topic and router.ensure("t", "text/plain") is topic
    with pytest.raises(UnsupportedMediaType):
        router.ensure("t", "application/octet-stream")
    with pytest.raises(UnsupportedMediaType):
        router.ensure("u", "text/csv")
    with pytest.raises(Conflict):
        router.create("t", None)
    with pytest.raises(BadRequest):
        router.ensure("no/slash", None)
    assert router.ensure("v", None, default="text/plain").content_type == "text/plain"
    assert [t.name for t in router.list()] == ["t", "v"]
