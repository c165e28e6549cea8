"""agent.instances.Instance on a fake runtime (tests/fake_runtime.py) and the autojump clock.

The hub's own timing (stop timeout, kill grace, start timeout) and its reading of exits are
checked in milliseconds of real time: the Instance, its state table and its pumps are the
real ones; only the runner is a task on memory streams.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from agent.errors import InstanceNotRunning, SequenceStartFailed
from agent.instances.instance import Instance
from agent.instances.lifecycle import Status
from tests.fake_runtime import FakeRuntime, Script, hub_config, launch_spec, sequence


@asynccontextmanager
async def started(
    tmp_path: Path, script: Script | None = None, **config: Any
) -> AsyncIterator[tuple[Instance, FakeRuntime, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        runtime = FakeRuntime(nursery, script)
        instance = Instance(
            instance_id="inst-1",
            sequence=sequence(tmp_path),
            app_config={"a": 1},
            args=["x"],
            runtime=runtime,
            config=hub_config(tmp_path, **config),
            launch=launch_spec(tmp_path),
        )
        await nursery.start(instance.run)
        yield instance, runtime, nursery
        nursery.cancel_scope.cancel()


async def test_a_started_instance_runs_with_its_config(tmp_path: Path, autojump_clock: MockClock) -> None:
    with trio.fail_after(60):
        async with started(tmp_path) as (instance, runtime, _):
            assert instance.status is Status.RUNNING
            assert instance.info()["status"] == "running"
            await trio.testing.wait_all_tasks_blocked()
            pong = runtime.runners[0].received[0]
            assert pong.data == {"appConfig": {"a": 1}, "args": ["x"]}


async def test_stop_answered_completes_it_as_stopped(tmp_path: Path, autojump_clock: MockClock) -> None:
    with trio.fail_after(60):
        async with started(tmp_path) as (instance, runtime, _):
            began = trio.current_time()
            await instance.stop(timeout_ms=7000, can_keep_alive=False)
            assert trio.current_time() - began < 1
            assert instance.status is Status.COMPLETED
            assert instance.reason == "Instance stopped"
            assert runtime.runners[0].signals == []


async def test_a_stop_ignored_is_a_kill_at_the_timeout(tmp_path: Path, autojump_clock: MockClock) -> None:
    with trio.fail_after(60):
        async with started(tmp_path, Script(obeys_stop=False)) as (instance, runtime, _):
            began = trio.current_time()
            await instance.stop(timeout_ms=3000, can_keep_alive=False)
            assert 3 <= trio.current_time() - began < 3.5
            assert instance.reason == "Instance killed after the stop timeout"
            assert runtime.runners[0].signals == [signal.SIGTERM]
            assert not instance.is_live


async def test_keep_alive_holds_each_stop_window(tmp_path: Path, autojump_clock: MockClock) -> None:
    with trio.fail_after(60):
        async with started(tmp_path, Script(keeps_alive=True)) as (instance, runtime, _):
            for _ in range(3):
                began = trio.current_time()
                await instance.stop(timeout_ms=1000, can_keep_alive=True)
                assert 1 <= trio.current_time() - began < 1.5
                assert instance.status is Status.RUNNING
            await instance.stop(timeout_ms=1000, can_keep_alive=False)
            assert instance.reason == "Instance stopped"
            stops = [m.data for m in runtime.runners[0].received if m.code.name == "STOP"]
            assert [s["canCallKeepalive"] for s in stops] == [True, True, True, False]


async def test_sigterm_ignored_is_sigkill_after_the_grace(tmp_path: Path, autojump_clock: MockClock) -> None:
    script = Script(obeys_stop=False, obeys_sigterm=False)
    with trio.fail_after(60):
        async with started(tmp_path, script, kill_grace=2.0) as (instance, runtime, _):
            began = trio.current_time()
            await instance.kill()
            await instance.wait_ended()
            assert 2 <= trio.current_time() - began < 2.5
            assert runtime.runners[0].signals == [signal.SIGTERM, signal.SIGKILL]
            assert instance.status is Status.COMPLETED  # a kill asked for completes it
            assert instance.reason == "Instance killed"


async def test_a_second_kill_sends_sigkill_at_once(tmp_path: Path, autojump_clock: MockClock) -> None:
    script = Script(obeys_stop=False, obeys_sigterm=False)
    with trio.fail_after(60):
        async with started(tmp_path, script, kill_grace=30.0) as (instance, runtime, _):
            await instance.kill()
            await trio.testing.wait_all_tasks_blocked()
            began = trio.current_time()
            await instance.kill()
            await instance.wait_ended()
            assert trio.current_time() - began < 1
            assert runtime.runners[0].signals == [signal.SIGTERM, signal.SIGKILL]


@pytest.mark.parametrize(("code", "status", "reason"), [(0, Status.COMPLETED, "Instance completed")])
async def test_an_exit_by_itself_is_read_from_its_code(
    tmp_path: Path, autojump_clock: MockClock, code: int, status: Status, reason: str
) -> None:
    with trio.fail_after(60):
        async with started(tmp_path, Script(exit_after_start=code)) as (instance, _, _):
            await instance.wait_ended()
            assert (instance.status, instance.reason, instance.exitcode) == (status, reason, code)


async def test_a_crash_errors_it_with_its_exit_code(tmp_path: Path, autojump_clock: MockClock) -> None:
    with trio.fail_after(60):
        async with started(tmp_path, Script(exit_after_start=23)) as (instance, _, _):
            await instance.wait_ended()
            assert instance.status is Status.ERRORED
            assert instance.exitcode == 23
            assert instance.info()["terminated"]["exitcode"] == 23
            with pytest.raises(InstanceNotRunning):
                await instance.stop(timeout_ms=1000, can_keep_alive=False)


async def test_no_handshake_fails_the_start_at_the_start_timeout(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            runtime = FakeRuntime(nursery, Script(handshakes=False, obeys_sigterm=True))
            instance = Instance(
                instance_id="inst-1",
                sequence=sequence(tmp_path),
                app_config={},
                args=[],
                runtime=runtime,
                config=hub_config(tmp_path, start_timeout=10.0),
                launch=launch_spec(tmp_path),
            )
            began = trio.current_time()
            with pytest.raises(SequenceStartFailed, match="handshake within 10 s"):
                await nursery.start(instance.run)
            assert 10 <= trio.current_time() - began < 11
            assert runtime.runners[0].signals[0] == signal.SIGTERM


async def test_events_reach_every_reader(tmp_path: Path, autojump_clock: MockClock) -> None:
    with trio.fail_after(60):
        async with started(tmp_path, Script(echo_events=True)) as (instance, _, nursery):
            got: list[list[Any]] = [[], []]

            async def read(into: list[Any], task_status: trio.TaskStatus[None]) -> None:
                events = instance.event_stream("tick")
                task_status.started()
                async for message in events:
                    into.append(message)
                    if len(into) == 2:
                        return

            for into in got:
                await nursery.start(read, into)
            await trio.testing.wait_all_tasks_blocked()
            for n in (1, 2):
                await instance.send_event("tick", n)  # the fake echoes events back
            await wait_until(lambda: all(len(g) == 2 for g in got))
            assert got == [[1, 2], [1, 2]]
            assert await instance.last_event("tick") == 2


async def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.01)
