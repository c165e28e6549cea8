"""Supervisor on a fake runtime: starting and listing instances, forwarding events
between them, routing topics, and ending them all on shutdown, in virtual time."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agent.config import HubConfig
from agent.errors import BadRequest, InstanceExists, InstanceNotFound
from agent.instances.lifecycle import Status
from agent.instances.supervisor import WORK_DIRS, Supervisor
from agent.sequences.store import Sequence
from agent.topics import TopicRouter
from spacehub.protocol.runner import Code
from tests.fake_runtime import FakeRunner, FakeRuntime, Script, emits, make_config, make_sequence, writes

GRACE = 5.0


@dataclass
class Hub:
    supervisor: Supervisor
    runtime: FakeRuntime
    config: HubConfig
    sequence: Sequence
    topics: TopicRouter
    #: cancel it to shut the supervisor down (as the hub does)
    scope: trio.CancelScope
    #: set once the supervisor's run returned
    stopped: trio.Event

    async def shut_down(self) -> None:
        self.scope.cancel()
        with trio.fail_after(60):
            await self.stopped.wait()


@asynccontextmanager
async def running_hub(root: Path, **config: Any) -> AsyncIterator[Hub]:
    async with trio.open_nursery() as runners:  # the fake processes and the supervisor
        runtime = FakeRuntime(runners)
        hub_config = make_config(root, **config)
        topics = TopicRouter()
        supervisor = Supervisor(hub_config, runtime, topics)
        scope, stopped = trio.CancelScope(), trio.Event()

        async def run_supervisor(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await supervisor.run(task_status=task_status)
            stopped.set()

        await runners.start(run_supervisor)
        hub = Hub(supervisor, runtime, hub_config, make_sequence(root), topics, scope, stopped)
        yield hub
        await hub.shut_down()
        runners.cancel_scope.cancel()


async def test_start_list_get_and_refusals(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running_hub(tmp_path) as hub:
        with trio.fail_after(5):
            first = await hub.supervisor.start(hub.sequence, {"appConfig": {"a": 1}})
            second = await hub.supervisor.start(hub.sequence, {"instanceId": "my-instance-1", "args": [1]})
        assert second.id == "my-instance-1" and first.status is Status.RUNNING
        assert {i.id for i in hub.supervisor.list()} == {first.id, second.id}
        assert hub.sequence.instances == [first.id, second.id]
        assert hub.supervisor.get(second.id) is second
        spec = hub.runtime.specs[-1]
        assert spec.cwd == hub.config.sequences_root / WORK_DIRS / "my-instance-1" and spec.cwd.is_dir()
        assert spec.env["SPACEHUB_INSTANCE_ID"] == "my-instance-1"
        with pytest.raises(InstanceExists):
            await hub.supervisor.start(hub.sequence, {"instanceId": "my-instance-1"})
        with pytest.raises(BadRequest):
            await hub.supervisor.start(hub.sequence, {"instanceId": "../x"})
        with pytest.raises(InstanceNotFound):
            hub.supervisor.get("nope")


async def test_ended_instances_are_forgotten_after_their_lifetime(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_hub(tmp_path, instance_lifetime=30.0) as hub:
        hub.runtime.default = Script(body=writes(b"done\n"))
        instance = await hub.supervisor.start(hub.sequence, {})
        with trio.fail_after(1):
            await instance.wait_ended()
        work_dir = hub.runtime.specs[-1].cwd
        assert hub.supervisor.get(instance.id) is instance  # still listed, readable
        ended_at = trio.current_time()
        with trio.fail_after(60):
            await instance.wait_removed()
        assert trio.current_time() - ended_at == pytest.approx(30.0)
        assert hub.supervisor.list() == [] and hub.sequence.instances == []
        assert not work_dir.exists()


async def test_events_are_forwarded_to_the_other_instances(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_hub(tmp_path) as hub:
        listeners = [await hub.supervisor.start(hub.sequence, {"instanceId": f"l{n}"}) for n in range(2)]
        hub.runtime.scripts["talker"] = Script(body=emits(("hello", {"n": 1}), interval=1.0))
        await hub.supervisor.start(hub.sequence, {"instanceId": "talker"})
        await trio.sleep(2.0)
        for listener in listeners:
            events = [m for m in hub.runtime.processes[listener.id].runner.received if m.code is Code.EVENT]
            assert [m.data for m in events] == [
                {"eventName": "hello", "message": {"n": 1}, "source": "talker"}
            ]
        talker_events = [m for m in hub.runtime.processes["talker"].runner.received if m.code is Code.EVENT]
        assert talker_events == []  # not sent back to its source


async def test_shutdown_ends_every_instance(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running_hub(tmp_path) as hub:
        polite = await hub.supervisor.start(hub.sequence, {"instanceId": "polite"})
        hub.runtime.scripts["stubborn"] = Script(on_sigterm="ignore", on_kill="ignore")
        await hub.supervisor.start(hub.sequence, {"instanceId": "stubborn"})
        began = trio.current_time()
        await hub.shut_down()
        assert trio.current_time() - began == pytest.approx(GRACE)
        processes = hub.runtime.processes
        assert processes["polite"].signals_while_alive() == [(began, signal.SIGTERM)]
        assert processes["polite"].exited_at == began
        # SIGTERM, the grace, then the supervisor's nursery ends it with SIGKILL.
        assert processes["stubborn"].signals_while_alive() == [
            (began, signal.SIGTERM),
            (began + GRACE, signal.SIGKILL),
        ]
        assert polite.status is Status.COMPLETED and polite.reason == "Instance completed"
        assert all(not p.alive for p in processes.values())


async def test_shutdown_is_quick_when_every_instance_obeys(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_hub(tmp_path) as hub:
        instances = [await hub.supervisor.start(hub.sequence, {}) for _ in range(3)]
        began = trio.current_time()
        await hub.shut_down()
        assert trio.current_time() == pytest.approx(began)
        assert all(i.status is Status.COMPLETED for i in instances)
        assert all(
            p.signals_while_alive() == [(began, signal.SIGTERM)] for p in hub.runtime.processes.values()
        )


async def test_kill_and_wait(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running_hub(tmp_path) as hub:
        hub.runtime.default = Script(on_kill="ignore", on_sigterm="ignore")
        instances = [await hub.supervisor.start(hub.sequence, {}) for _ in range(2)]
        began = trio.current_time()
        with trio.fail_after(60):
            await hub.supervisor.kill_and_wait(instances)
        assert trio.current_time() - began == pytest.approx(GRACE)
        assert all(i.status is Status.COMPLETED and i.reason == "Instance killed" for i in instances)


async def test_topic_chains_a_producer_to_a_consumer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    payload = b"".join(b'{"n": %d}\n' % n for n in range(50_000))  # ~560 KiB: over every pipe
    consumed: list[bytes] = []

    async def consume(runner: FakeRunner) -> int:
        consumed.append(await runner.read_input())
        return 0

    async with running_hub(tmp_path) as hub:
        hub.runtime.scripts["consumer"] = Script(
            requires="numbers", content_type="application/x-ndjson", body=consume
        )
        hub.runtime.scripts["producer"] = Script(provides="numbers", body=writes(payload, then=None))
        consumer = await hub.supervisor.start(hub.sequence, {"instanceId": "consumer"})
        await trio.sleep(0.1)  # the consumer's PANG: it is attached before any byte is written
        topic = hub.topics.get("numbers")
        assert topic.consumers == {"consumer": 1}
        producer = await hub.supervisor.start(hub.sequence, {"instanceId": "producer"})
        await trio.sleep(0.1)
        assert producer.provides == consumer.requires == "numbers"
        assert topic.providers == {}  # its whole output was written: its turn is over
        # The producer's output ended: the topic stays open (instances do not end it).
        with trio.move_on_after(5):
            await consumer.wait_ended()
        assert consumer.is_live
        hub.topics.delete("numbers")  # what ends a topic now (its readers see the end)
        with trio.fail_after(5):
            await consumer.wait_ended()
    assert consumed == [b"Content-Type: application/x-ndjson\r\n\r\n" + payload]


def ends_with(code: int, after: float) -> Any:
    async def body(runner: FakeRunner) -> int:
        await trio.sleep(after)
        return code

    return body


async def test_restart_policies_and_their_backoff(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """never: ends for good; on-failure: again after a failure only; always: again
    whatever the end, 1 s then doubling; a run of a minute resets it; a kill ends it."""
    from agent.instances.supervisor import RESTART_BACKOFF_CAP, RESTART_BACKOFF_FIRST

    async with running_hub(tmp_path, instance_lifetime=600) as hub:
        starts: dict[str, list[float]] = {}
        original_spawn = hub.runtime.spawn

        async def spawn(spec: Any) -> Any:
            starts.setdefault(spec.instance_id, []).append(trio.current_time())
            return await original_spawn(spec)

        hub.runtime.spawn = spawn  # type: ignore[method-assign]
        hub.runtime.scripts["fails"] = Script(body=ends_with(3, 0.1))
        hub.runtime.scripts["clean"] = Script(body=ends_with(0, 0.1))
        hub.runtime.scripts["always"] = Script(body=ends_with(0, 0.1))
        hub.runtime.scripts["never"] = Script(body=ends_with(3, 0.1))
        hub.runtime.scripts["long"] = Script(body=ends_with(3, 120))
        with pytest.raises(BadRequest):
            await hub.supervisor.start(hub.sequence, {"instanceId": "x", "restart": "sometimes"})
        with trio.fail_after(5):
            await hub.supervisor.start(hub.sequence, {"instanceId": "fails", "restart": "on-failure"})
            await hub.supervisor.start(hub.sequence, {"instanceId": "clean", "restart": "on-failure"})
            await hub.supervisor.start(hub.sequence, {"instanceId": "always", "restart": "always"})
            await hub.supervisor.start(hub.sequence, {"instanceId": "never"})
            await hub.supervisor.start(hub.sequence, {"instanceId": "long", "restart": "always"})
        await trio.sleep(200)
        assert len(starts["never"]) == 1 and len(starts["clean"]) == 1
        assert hub.supervisor.get("never").status is Status.ERRORED
        gaps = [b - a for a, b in zip(starts["always"], starts["always"][1:], strict=False)]
        # each gap: the 0.1 s run plus the backoff, 1 s doubling up to the cap
        backoffs = [round(gap - 0.1, 1) for gap in gaps]
        expected = [min(RESTART_BACKOFF_CAP, RESTART_BACKOFF_FIRST * 2**n) for n in range(len(backoffs))]
        assert backoffs == expected, backoffs
        assert len(starts["fails"]) == len(starts["always"])
        long_gaps = [round(b - a - 120, 1) for a, b in zip(starts["long"], starts["long"][1:], strict=False)]
        assert long_gaps and set(long_gaps) == {RESTART_BACKOFF_FIRST}  # a run of a minute resets it
        info = hub.supervisor.get("always").info()
        assert info["restart"] == "always" and info["restarts"] == len(starts["always"]) - 1
        assert hub.supervisor.restarts_total >= info["restarts"]
        # A kill while it waits for its next start ends it for good.
        waiting = hub.supervisor.get("always")
        while waiting.is_live:
            await trio.sleep(0.01)
            waiting = hub.supervisor.get("always")
        await waiting.kill()
        count = len(starts["always"])
        await trio.sleep(300)
        assert len(starts["always"]) == count
