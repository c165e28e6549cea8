"""agent.instances.Supervisor on a fake runtime (tests/fake_runtime.py): listing, ids, event
forwarding between instances, and ending every instance at shutdown.

On the real clock with short timings: the supervisor gives every instance a scratch directory,
removed in a worker thread, and the autojump clock would jump deadlines while a thread runs.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.errors import BadRequest, InstanceExists, InstanceNotFound
from agent.instances.supervisor import Supervisor
from tests.fake_runtime import FakeRuntime, Script, hub_config, sequence


@asynccontextmanager
async def supervising(
    tmp_path: Path, script: Script | None = None, **config: Any
) -> AsyncIterator[tuple[Supervisor, FakeRuntime, trio.CancelScope]]:
    async with trio.open_nursery() as nursery:
        runtime = FakeRuntime(nursery, script)
        config.setdefault("kill_grace", 0.3)
        supervisor = Supervisor(hub_config(tmp_path, **config), runtime)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await supervisor.run(task_status=task_status)

        await nursery.start(run)
        yield supervisor, runtime, scope
        nursery.cancel_scope.cancel()


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.01)


async def test_instances_are_listed_and_forgotten_after_their_lifetime(
    tmp_path: Path,
) -> None:
    with trio.fail_after(10):
        async with supervising(tmp_path, Script(exit_after_start=0), instance_lifetime=0.2) as (sup, _, _):
            seq = sequence(tmp_path)
            instance = await sup.start(seq, {"instanceId": "one"})
            assert sup.get("one") is instance and seq.instances == ["one"]
            await instance.wait_ended()
            assert sup.list() == [instance]  # an ended instance stays listed for its lifetime
            await instance.wait_removed()
            assert sup.list() == [] and seq.instances == []
            with pytest.raises(InstanceNotFound):
                sup.get("one")


@pytest.mark.parametrize("bad", ["../x", "a" * 65, "-lead", "sp ace", 7])
async def test_an_unusable_instance_id_is_refused(tmp_path: Path, bad: Any) -> None:
    with trio.fail_after(10):
        async with supervising(tmp_path) as (sup, runtime, _):
            with pytest.raises(BadRequest, match="instanceId"):
                await sup.start(sequence(tmp_path), {"instanceId": bad})
            assert sup.list() == [] and runtime.runners == []


async def test_an_id_in_use_is_a_conflict(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with supervising(tmp_path) as (sup, _, _):
            await sup.start(sequence(tmp_path), {"instanceId": "same"})
            with pytest.raises(InstanceExists):
                await sup.start(sequence(tmp_path), {"instanceId": "same"})


async def test_an_event_reaches_every_other_instance(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with supervising(tmp_path) as (sup, runtime, _):
            first = await sup.start(sequence(tmp_path), {"instanceId": "a"})
            second = await sup.start(sequence(tmp_path), {"instanceId": "b"})
            runtime.script = Script(events=[("hello", {"n": 1})])
            sender = await sup.start(sequence(tmp_path), {"instanceId": "c"})
            await until(lambda: all(len(r.received) > 1 for r in runtime.runners[:2]))
            for runner in runtime.runners[:2]:
                event = runner.received[1]
                assert event.data == {"eventName": "hello", "message": {"n": 1}, "source": "c"}
            # the sender does not get its own event back
            assert [m.code.name for m in runtime.runners[2].received] == ["PONG"]
            assert first.is_live and second.is_live and sender.is_live


async def test_shutdown_ends_every_instance(tmp_path: Path) -> None:
    """Every runner is signalled and ends, the one deaf to SIGTERM included."""
    with trio.fail_after(10):
        async with supervising(tmp_path) as (sup, runtime, scope):
            await sup.start(sequence(tmp_path), {"instanceId": "polite"})
            runtime.script = Script(obeys_sigterm=False)
            await sup.start(sequence(tmp_path), {"instanceId": "deaf"})
            scope.cancel()
            await until(lambda: all(r.returncode is not None for r in runtime.runners))
            assert runtime.runners[0].returncode == -signal.SIGTERM
            # the deaf one ends by SIGKILL, or like a real runner once its hub's pipes close
            assert runtime.runners[1].signals[0] == signal.SIGTERM
