"""The seam between two hubs: stream spools, restored broadcasts, and the holder itself."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import trio

from agent.instances.spool import PartialLine, StreamSpool, write_json_atomic
from agent.runtimes.held import HolderGone, adopt, start_held
from agent.streams import Broadcast


def test_spool_keeps_its_bound_and_reads_any_kept_range(tmp_path: Path) -> None:
    spool = StreamSpool(tmp_path, "output", keep=100)
    data = bytes(range(256)) * 4  # 1024 bytes in chunks of 7
    for begin in range(0, len(data), 7):
        spool.append(data[begin : begin + 7])
    assert spool.end == len(data)
    kept = spool.end - spool.start
    assert 100 <= kept <= 100 + 25 + 7  # the bound, one segment, one chunk
    assert spool.read(spool.start, spool.end) == data[spool.start :]
    assert spool.read(spool.end - 10, spool.end - 3) == data[-10:-3]
    with pytest.raises(ValueError):
        spool.read(spool.start - 1, spool.end)
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir() if p.name.startswith("output."))
    assert on_disk == kept
    spool.close()


def test_spool_reloads_its_bytes_and_mark(tmp_path: Path) -> None:
    spool = StreamSpool(tmp_path, "stdout", keep=64)
    for n in range(50):
        spool.append(f"{n}\n".encode())
    spool.set_mark(100)
    end, start = spool.end, spool.start
    spool.close()
    again = StreamSpool(tmp_path, "stdout", keep=64)
    assert (again.start, again.end, again.mark) == (start, end, 100)
    again.append(b"more")
    assert again.read(end, again.end) == b"more"
    fresh = StreamSpool(tmp_path, "stdout", keep=64, fresh=True)
    assert (fresh.start, fresh.end, fresh.mark) == (0, 0, 0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("stdout.")]


def test_partial_line_and_atomic_json(tmp_path: Path) -> None:
    tail = PartialLine(tmp_path, "monitoring")
    tail.save(b'[3000, {"hea')
    tail.save(b"")
    tail.save(b"[40")
    tail.close()
    assert PartialLine(tmp_path, "monitoring").restore() == b"[40"
    assert PartialLine(None, "log").restore() == b""
    write_json_atomic(tmp_path / "state.json", {"a": 1})
    assert (tmp_path / "state.json").read_text() == '{"a":1}'
    assert not (tmp_path / "state.json.tmp").exists()


@pytest.mark.trio
async def test_broadcast_restored_and_read_from_an_offset() -> None:
    marks: list[int] = []
    stream = Broadcast(1000, marks.append)
    stream.restore(500, b"abcdef")
    assert (stream.start, stream.end) == (500, 506)
    with pytest.raises(ValueError):
        stream.subscribe(499)
    with pytest.raises(ValueError):
        stream.subscribe(507)
    with trio.fail_after(5):
        first = stream.subscribe()  # what nobody had taken: from the restored mark
        late = stream.subscribe(503)
        assert await late.__anext__() == b"def"
        assert await first.__anext__() == b"abcdef"
        assert marks[-1] == 506
        await stream.write(b"gh")
        late.close()
        assert await first.__anext__() == b"gh"
        assert marks[-1] == 508
        first.close()
        # a reader attached later starts where every reader before left off
        await stream.write(b"ij")
        again = stream.subscribe()
        assert await again.__anext__() == b"ij"
        stream.close()


async def _read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


SCRIPT = """
import os, sys, time
os.write(1, b"one\\n")
line = os.read(0, 100)
os.write(1, b"got " + line)
time.sleep(float(sys.argv[1]))
sys.exit(7)
"""


@pytest.mark.trio
async def test_a_holder_keeps_the_runner_through_a_hub_that_goes(tmp_path: Path) -> None:
    state = tmp_path / "state" / "inst"
    work = tmp_path / "work"
    work.mkdir()
    with trio.fail_after(20):
        runner = await start_held(
            state,
            argv=[sys.executable, "-c", SCRIPT, "0.5"],
            env={"PATH": os.defpath},
            cwd=work,
            cgroup_procs=[],
            rlimits=[],
        )
        pid = runner.pid
        assert await runner.stdout.receive_some(100) == b"one\n"
        # The hub goes (its copies closed): the runner notices nothing.
        await runner.detach()
        os.kill(pid, 0)
        second = await adopt(state)
        assert second.pid == pid and second.returncode is None
        await second.stdin.send_all(b"hello\n")
        assert await second.stdout.receive_some(100) == b"got hello\n"
        await second.detach()
        await trio.sleep(1.0)  # it ends while no hub holds it
        third = await adopt(state)
        assert third.returncode == 7
        assert await third.wait() == 7
        assert await _read_all(third.stdout) == b""
        await third.aclose()  # released: the holder goes
        with trio.fail_after(5):
            while True:
                try:
                    gone = await adopt(state)
                except HolderGone:
                    break
                await gone.detach()
                await trio.sleep(0.05)


@pytest.mark.trio
async def test_signals_go_through_the_holder(tmp_path: Path) -> None:
    with trio.fail_after(20):
        runner = await start_held(
            tmp_path / "state",
            argv=[sys.executable, "-c", SCRIPT, "60"],
            env={"PATH": os.defpath},
            cwd=tmp_path,
            cgroup_procs=[],
            rlimits=[],
        )
        assert await runner.stdout.receive_some(100) == b"one\n"
        runner.signal_group(signal.SIGTERM)
        assert await runner.wait() == -signal.SIGTERM
        await runner.aclose()
