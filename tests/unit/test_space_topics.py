"""Space-wide topics in parts: the stream framing, the on-disk log, the manager's topic log
(dedup by offset, recovery after a kill, trimming, back-pressure) and the hub's cursor."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import trio
import trio.testing

from agent.spacetopics import InCursor, OutSpool
from cpm.topics import SpaceTopic, SpaceTopics, UnsupportedMediaType
from spacehub.protocol.topics import (
    ACK,
    DELIVERY,
    ENTRY,
    MAX_ENTRY_BYTES,
    FrameError,
    FrameReader,
    ack,
    delivery,
    entry,
    split_records,
)
from spacehub.server.recordlog import OffsetFile, RecordLog

# ------------------------------------------------------------------ framing


def test_frames_come_out_whole_however_the_bytes_are_cut() -> None:
    stream = entry(b"a\n") + entry(b"") + entry(b"bb\ncc\n") + delivery(7, b"x\n") + ack(9)
    for cut in range(1, 8):
        reader = FrameReader(ENTRY)
        got = []
        data = entry(b"a\n") + entry(b"") + entry(b"bb\ncc\n")
        for start in range(0, len(data), cut):
            reader.feed(data[start : start + cut])
            got += [payload for _fields, payload in reader.frames()]
        assert got == [b"a\n", b"", b"bb\ncc\n"]
        assert reader.pending == 0
    reader = FrameReader(DELIVERY)
    reader.feed(delivery(7, b"x\n") + delivery(9, b""))
    assert [(fields[0], payload) for fields, payload in reader.frames()] == [(7, b"x\n"), (9, b"")]
    acks = FrameReader(ACK, sized=False)
    acks.feed(ack(9) + ack(12)[:3])
    assert [fields[0] for fields, _payload in acks.frames()] == [9]
    assert stream  # every builder made bytes


def test_a_frame_over_the_bound_is_refused() -> None:
    reader = FrameReader(ENTRY)
    reader.feed(ENTRY.pack(MAX_ENTRY_BYTES + 1))
    with pytest.raises(FrameError):
        list(reader.frames())


def test_records_split_at_line_ends_only() -> None:
    assert split_records(b"", b"a\nb", True) == (b"a\n", b"b")
    assert split_records(b"b", b"c\nd\n", True) == (b"bc\nd\n", b"")
    assert split_records(b"", b"no end", True) == (b"", b"no end")
    assert split_records(b"", b"raw bytes", False) == (b"raw bytes", b"")
    huge = b"x" * (MAX_ENTRY_BYTES + 1)
    assert split_records(b"", huge, True) == (huge, b"")  # a line over the bound goes as it is


# ------------------------------------------------------------------ the log on disk


def test_record_log_appends_reads_trims_and_reopens(tmp_path: Path) -> None:
    log = RecordLog(tmp_path / "log", segment_bytes=10)
    for n in range(10):
        log.append(f"{n:04d}\n".encode())  # 5 bytes each: two per segment
    assert (log.start, log.end) == (0, 50)
    assert log.read(5, 100) == b"0001\n"  # up to its segment's end
    log.trim(23)
    assert log.start == 20  # whole segments only
    with pytest.raises(ValueError):
        log.read(10, 5)
    log.close()
    again = RecordLog(tmp_path / "log", segment_bytes=10)
    assert (again.start, again.end) == (20, 50)
    assert again.read(45, 5) == b"0009\n"
    again.append(b"0010\n")
    again.truncate(52)
    assert again.end == 52


def test_offset_file_keeps_its_value(tmp_path: Path) -> None:
    offset = OffsetFile(tmp_path / "x" / "offset")
    assert offset.value is None
    offset.set(12345)
    offset.close()
    assert OffsetFile(tmp_path / "x" / "offset").value == 12345


# ------------------------------------------------------------------ the manager's topic log


async def _entries(topic: SpaceTopic, position: int = 0) -> list[tuple[str, bytes]]:
    found, _next = topic.entries(position)
    return [(origin, records) for _end, origin, records in found]


async def test_the_manager_stores_each_hub_entry_once_and_recovers_after_a_kill(tmp_path: Path) -> None:
    topics = SpaceTopics(tmp_path)
    topic = topics.ensure("demo", "t", "application/x-ndjson")
    topic.consumers["hub-b"] = 0  # someone consumes it: records are kept
    await topic.append("hub-a", 10, b"one\n")
    await topic.append("hub-a", 20, b"two\n")
    await topic.append("", 0, b"api\n")
    assert topic.producers == {"hub-a": 20}
    assert await _entries(topic) == [("hub-a", b"one\n"), ("hub-a", b"two\n"), ("", b"api\n")]
    end = topic.log.end
    # A kill -9: state.json was written before the last appends; the log has them all.
    (tmp_path / "demo" / "t" / "state.json").write_text(
        json.dumps(
            {"contentType": "application/x-ndjson", "producers": {}, "consumers": {"hub-b": 0}, "logEnd": 0}
        )
    )
    topic.log.close()
    again = SpaceTopics(tmp_path).ensure("demo", "t")
    assert again.producers == {"hub-a": 20}  # read back from the entries
    assert again.log.end == end and again.consumers == {"hub-b": 0}
    # A torn last entry (a full disk) is cut off.
    again.log.append(b"\x05\x00\x00\x00garbage")
    again.log.close()
    third = SpaceTopics(tmp_path).ensure("demo", "t")
    assert third.log.end == end


async def test_records_nobody_else_consumes_are_not_kept(tmp_path: Path) -> None:
    topic = SpaceTopics(tmp_path).ensure("demo", "t")
    await topic.append("hub-a", 10, b"one\n")
    assert topic.log.end == 0 and topic.producers == {"hub-a": 10}
    topic.consumers["hub-a"] = 0  # only its own hub consumes it
    await topic.append("hub-a", 20, b"two\n")
    assert topic.log.end == 0


async def test_a_full_log_holds_producers_back_until_consumers_take_it(tmp_path: Path) -> None:
    topics = SpaceTopics(tmp_path, capacity=64)
    topic = topics.ensure("demo", "t")
    topic.consumers["hub-b"] = 0
    await topic.append("hub-a", 1, b"x" * 100)
    done = trio.Event()

    async def produce() -> None:
        await topic.append("hub-a", 2, b"y\n")
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()  # waiting: hub-b has not taken the 100 bytes
        topic.consumers["hub-b"] = topic.log.end  # hub-b acknowledged them
        topic.trim()
        with trio.fail_after(5):
            await done.wait()
    assert topic.unread == topic.log.end - topic.low_mark > 0


def test_a_space_topic_refuses_an_unknown_content_type(tmp_path: Path) -> None:
    topics = SpaceTopics(tmp_path)
    with pytest.raises(UnsupportedMediaType):
        topics.read("demo", "t", "image/png")


async def test_space_api_readers_get_every_origin_and_keep_the_topic_wanted(tmp_path: Path) -> None:
    topics = SpaceTopics(tmp_path)
    topic, chunks, close = topics.read("demo", "t", None)
    assert topics.wanted("demo") == ["t"] and topics.wanted("other") == []
    await topic.append("hub-a", 5, b"a\n")
    await topics.post("demo", "t", "application/x-ndjson", _body([b"p", b"1\np2"]))
    got = b""
    with trio.fail_after(5):
        async for chunk in chunks:
            got += chunk
            if got.count(b"\n") == 3:
                break
    assert got == b"a\np1\np2\n"  # the post's partial last line was ended
    close()
    assert topics.wanted("demo") == []


async def _body(parts: list[bytes]):  # type: ignore[no-untyped-def]
    for part in parts:
        yield part


# ------------------------------------------------------------------ the hub's side


def test_the_hub_cursor_moves_only_as_local_readers_take_records(tmp_path: Path) -> None:
    cursor = InCursor("t", OffsetFile(tmp_path / "in" / "t"))
    cursor.handed(100, 500)  # local bytes up to 100 carry the Space's log up to 500
    cursor.handed(-1, 600)  # then only other hubs' records: nothing local
    cursor.handed(180, 700)
    assert cursor.offset is None
    cursor.mark_moved(99)
    assert cursor.offset is None
    cursor.mark_moved(100)
    assert cursor.offset == 600  # the skip after it counts too
    cursor.mark_moved(200)
    assert cursor.offset == 700
    cursor.file.close()
    assert OffsetFile(tmp_path / "in" / "t").value == 700
    empty = InCursor("u", OffsetFile(tmp_path / "in" / "u"))
    empty.handed(-1, 50)  # nothing pending: taken at once
    assert empty.offset == 50


def test_the_out_spool_trims_what_the_manager_acknowledged(tmp_path: Path) -> None:
    spool = OutSpool("t", tmp_path / "t")
    for _ in range(3):
        spool.log.append(ENTRY.pack(3) + b"ab\n")
    assert spool.backlog == 21
    spool.take_ack(14)
    assert spool.backlog == 7 and spool.acked == 14
    spool.take_ack(7)  # an older ack changes nothing
    assert spool.acked == 14
    spool.log.close()
    spool.acked_file.close()
    again = OutSpool("t", tmp_path / "t")
    assert (again.acked, again.backlog) == (14, 7)
    assert struct.unpack("<I", again.log.read(14, 4))[0] == 3


# ------------------------------------------------------------------ the bounds' settings


def test_spool_and_log_sizes_read_from_toml_and_flags(tmp_path: Path) -> None:
    from agent.config import ConfigError as HubConfigError
    from agent.config import load_config as load_hub_config
    from cpm.config import ConfigError as ManagerConfigError
    from cpm.config import load_config as load_manager_config
    from spacehub.server.config import parse_size

    assert [parse_size(t) for t in ("1024", "256M", "1G", "2GiB", "64k")] == [
        1024,
        256 << 20,
        1 << 30,
        2 << 30,
        64 << 10,
    ]
    with pytest.raises(ValueError):
        parse_size("lots")
    hub_file = tmp_path / "sth.toml"
    hub_file.write_text('[hub]\ntopic_spool_bytes = "64M"\ntopic_spool_total_bytes = 134217728\n')
    hub = load_hub_config(hub_file, {})
    assert (hub.topic_spool_bytes, hub.topic_spool_total_bytes) == (64 << 20, 128 << 20)
    hub_file.write_text('[hub]\ntopic_spool_bytes = "12"\n')
    with pytest.raises(HubConfigError, match="at least 1 MiB"):
        load_hub_config(hub_file, {})
    manager_file = tmp_path / "cpm.toml"
    manager_file.write_text('[manager]\ntopic_log_bytes = "1G"\n')
    assert load_manager_config(manager_file, {}).topic_log_bytes == 1 << 30
    manager_file.write_text('[manager]\ntopic_log_bytes = "big"\n')
    with pytest.raises(ManagerConfigError, match="topic_log_bytes"):
        load_manager_config(manager_file, {})


async def test_readers_at_the_end_are_served_from_memory_and_an_idle_topic_keeps_none(tmp_path: Path) -> None:
    topic = SpaceTopics(tmp_path).ensure("demo", "t")
    topic.consumers["hub-b"] = 0
    for n in range(5):
        await topic.append("hub-a", n + 1, f"{n}\n".encode())
    from_memory = topic.entries(0)
    topic.log.close()
    topic.log._segments.clear()  # the files out of reach: what is read now came from memory
    assert topic.entries(0) == from_memory
    assert [records for _end, _origin, records in from_memory[0]] == [b"0\n", b"1\n", b"2\n", b"3\n", b"4\n"]
    topic.consumers["hub-b"] = from_memory[1]  # hub-b took it all
    topic.trim()
    assert topic._recent == [] and topic._recent_bytes == 0


async def test_a_revoked_hub_holds_no_backlog(tmp_path: Path) -> None:
    topics = SpaceTopics(tmp_path)
    topic = topics.ensure("demo", "t")
    topic.consumers.update({"hub-b": 0, "hub-c": 0, "hub-d": 0})
    await topic.append("hub-a", 1, b"x\n")
    topics.forget_revoked({"hub-b": ("demo", None), "hub-c": ("demo", "stolen")})  # hub-d: removed
    assert set(topic.consumers) == {"hub-b"}
    assert json.loads((tmp_path / "demo" / "t" / "state.json").read_text())["consumers"] == {"hub-b": 0}
