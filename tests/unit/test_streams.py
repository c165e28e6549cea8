"""Broadcast and RecordRing: bounds, back-pressure, fan-out, replay."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from agent.streams import Broadcast, RecordRing


async def collect(broadcast: Broadcast, into: list[bytes]) -> None:
    async with broadcast.subscribe() as chunks:
        async for chunk in chunks:
            into.append(chunk)


async def test_kept_for_the_first_reader_then_back_pressure(autojump_clock: trio.testing.MockClock) -> None:
    broadcast = Broadcast(bound=10)
    await broadcast.write(b"0123456789")
    assert broadcast.buffered == 10
    with trio.move_on_after(5) as scope:
        await broadcast.write(b"x")  # at the bound with nobody reading: waits
    assert scope.cancelled_caught
    received: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, broadcast, received)
        with trio.fail_after(5):
            await broadcast.write(b"abc")
        broadcast.close()
    assert b"".join(received) == b"0123456789abc"


async def test_every_reader_gets_every_byte_after_attaching() -> None:
    broadcast = Broadcast(bound=8)
    first: list[bytes] = []
    second: list[bytes] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, broadcast, first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(collect, broadcast, second)
            await trio.testing.wait_all_tasks_blocked()
            for n in range(100):
                await broadcast.write(b"%03d" % n)
            broadcast.close()
    expected = b"".join(b"%03d" % n for n in range(100))
    assert b"".join(first) == expected
    assert b"".join(second) == expected


async def test_slowest_reader_governs_and_memory_stays_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broadcast = Broadcast(bound=16)
    fast: list[bytes] = []
    slow_seen = bytearray()
    peak = 0

    async def slow() -> None:
        async with broadcast.subscribe() as chunks:
            async for chunk in chunks:
                slow_seen.extend(chunk)
                await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, broadcast, fast)
        nursery.start_soon(slow)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(50):
            await broadcast.write(b"abcd")
            peak = max(peak, broadcast.buffered)
        broadcast.close()
    assert peak <= 16 + 4
    assert bytes(slow_seen) == b"abcd" * 50 == b"".join(fast)


async def test_reader_leaving_keeps_the_rest_for_the_next() -> None:
    broadcast = Broadcast(bound=100)
    await broadcast.write(b"one")
    await broadcast.write(b"two")
    with trio.fail_after(5):
        async with broadcast.subscribe() as chunks:
            async for chunk in chunks:
                assert chunk == b"one"
                break
        received: list[bytes] = []
        broadcast.close()
        await collect(broadcast, received)
    assert b"".join(received) == b"two"


async def test_write_after_close_and_bad_bound() -> None:
    broadcast = Broadcast(bound=4)
    broadcast.close()
    with pytest.raises(trio.ClosedResourceError):
        await broadcast.write(b"x")
    with pytest.raises(ValueError):
        Broadcast(bound=0)


async def test_writer_waiting_at_the_bound_is_released_by_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broadcast = Broadcast(bound=2)
    await broadcast.write(b"ab")
    async with trio.open_nursery() as nursery:

        async def writer() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await broadcast.write(b"c")

        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        broadcast.close()


async def test_ring_replays_then_follows_and_counts_missed() -> None:
    ring = RecordRing[int](size=3)
    for n in range(5):
        ring.append(n)
    assert ring.snapshot() == [2, 3, 4]
    seen: list[tuple[int, int]] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                async for missed, record in ring.follow():
                    seen.append((missed, record))

            nursery.start_soon(follow)
            await trio.testing.wait_all_tasks_blocked()
            ring.append(5)
            await trio.testing.wait_all_tasks_blocked()
            ring.close()
    assert seen == [(0, 2), (0, 3), (0, 4), (0, 5)]


async def test_ring_reader_that_falls_behind_is_told() -> None:
    ring = RecordRing[int](size=2)
    ring.append(0)
    follower = ring.follow()
    assert await follower.__anext__() == (0, 0)
    for n in range(1, 6):
        ring.append(n)
    assert await follower.__anext__() == (3, 4)
    assert await follower.__anext__() == (0, 5)
    ring.close()
    with pytest.raises(StopAsyncIteration):
        await follower.__anext__()


async def test_ring_without_replay() -> None:
    ring = RecordRing[str](size=5)
    ring.append("old")
    follower = ring.follow(replay=False)
    ring.append("new")
    assert await follower.__anext__() == (0, "new")
    await follower.aclose()
