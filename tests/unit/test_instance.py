"""Instance on a fake runtime: lifecycle, stop window, kill grace, exit reasons,
events, health and streams, in virtual time (``autojump_clock``).

The runner is a trio task speaking the real control protocol over bounded
in-memory pipes (tests/fake_runtime.py); the Instance is the hub's own code.
Timings are the hub's defaults unless a test says: kill grace 5 s, start timeout
30 s, lifetime 180 s.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agent.errors import Gone, InstanceNotRunning, SequenceStartFailed
from agent.instances import instance as instance_module
from agent.instances.instance import Instance
from agent.instances.lifecycle import Status
from spacehub.protocol.runner import Code
from tests.fake_runtime import (
    FakeProcess,
    FakeRuntime,
    Script,
    emits,
    exits,
    make_config,
    make_instance,
    make_sequence,
    writes,
)

GRACE = 5.0  # HubConfig's default kill_grace


class Harness:
    def __init__(self, nursery: trio.Nursery, root: Path, **config: Any) -> None:
        self.nursery = nursery
        self.runtime = FakeRuntime(nursery)
        self.config = make_config(root, **config)
        self.sequence = make_sequence(root)

    async def start(
        self, script: Script | None = None, instance_id: str = "inst-1", **options: Any
    ) -> Instance:
        if script is not None:
            self.runtime.scripts[instance_id] = script
        instance = make_instance(self.runtime, self.config, self.sequence, instance_id, **options)
        with trio.fail_after(60):
            await self.nursery.start(instance.run)
        return instance

    def process(self, instance_id: str = "inst-1") -> FakeProcess:
        return self.runtime.processes[instance_id]


@asynccontextmanager
async def harness(root: Path, **config: Any) -> AsyncIterator[Harness]:
    async with trio.open_nursery() as nursery:
        yield Harness(nursery, root, **config)
        nursery.cancel_scope.cancel()


async def ended(instance: Instance, limit: float = 60) -> None:
    with trio.fail_after(limit):
        await instance.wait_ended()


# ------------------------------------------------------------------ start
async def test_start_handshakes_and_runs(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with harness(tmp_path) as hub:
        instance = await hub.start(app_config={"k": 1}, args=["a", 2])
        process = hub.process()
        assert instance.status is Status.RUNNING
        assert instance.pid == process.pid and instance.started is not None
        await trio.sleep(0.1)
        pong = process.runner.received[0]
        assert pong.code is Code.PONG and pong.data == {"appConfig": {"k": 1}, "args": ["a", 2]}
        health = await instance.health()
        assert health["healthy"] is True and health["status"] == "running"
        assert health["processId"] == process.pid
        assert instance.info()["status"] == "running" and "terminated" not in instance.info()


async def test_spawn_failure_fails_the_start(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    removed: list[Instance] = []
    async with harness(tmp_path) as hub:
        hub.runtime.spawn_error = FileNotFoundError("no such runner")
        with pytest.raises(SequenceStartFailed, match="cannot start the runner"):
            await hub.start(on_removed=removed.append)
    assert len(removed) == 1 and removed[0].status is Status.ERRORED


async def test_crash_before_handshake_fails_the_start_with_stderr(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(tmp_path) as hub:
        with pytest.raises(
            SequenceStartFailed, match="exited with code 22 before its handshake: SyntaxError: bad"
        ):
            await hub.start(Script(exit_before_handshake=22, stderr=b"SyntaxError: bad\n"))


async def test_no_handshake_fails_after_the_start_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(tmp_path, start_timeout=30.0) as hub:
        began = trio.current_time()
        with pytest.raises(SequenceStartFailed, match="did not complete its handshake within 30 s"):
            await hub.start(Script(handshake=False, on_sigterm="ignore"))
        process = hub.process()
        # timed out at 30 s, SIGTERM then, SIGKILL one grace later; the start fails then
        assert process.signals_while_alive() == [
            (began + 30.0, signal.SIGTERM),
            (began + 30.0 + GRACE, signal.SIGKILL),
        ]
        assert trio.current_time() - began == pytest.approx(30.0 + GRACE)


# ------------------------------------------------------------------ stop
async def test_stop_within_the_timeout_completes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(tmp_path) as hub:
        instance = await hub.start(Script(stop_delay=1.5))
        began = trio.current_time()
        await instance.stop(4000, False)
        assert trio.current_time() - began == pytest.approx(1.5)  # returns when the runner ended
        process = hub.process()
        assert process.runner.received[1].code is Code.STOP
        assert process.runner.received[1].data == {"timeout": 4000, "canCallKeepalive": False}
        assert instance.status is Status.COMPLETED
        assert instance.exitcode == 0 and instance.reason == "Instance stopped"
        assert process.signals_while_alive() == []


async def test_stop_ignored_is_killed_after_the_timeout_and_grace(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(tmp_path) as hub:
        instance = await hub.start(Script(on_stop="ignore", on_sigterm="ignore"))
        began = trio.current_time()
        await instance.stop(2000, False)
        process = hub.process()
        assert process.signals_while_alive() == [
            (began + 2.0, signal.SIGTERM),
            (began + 2.0 + GRACE, signal.SIGKILL),
        ]
        assert trio.current_time() - began == pytest.approx(2.0 + GRACE)
        assert instance.status is Status.COMPLETED
        assert instance.exitcode == 128 + signal.SIGKILL
        assert instance.reason == "Instance killed after the stop timeout"


async def test_stop_ignored_but_sigterm_obeyed_ends_at_the_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(tmp_path) as hub:
        instance = await hub.start(Script(on_stop="ignore", on_sigterm="die"))
        began = trio.current_time()
        await instance.stop(2000, False)
        assert trio.current_time() - began == pytest.approx(2.0)
        assert instance.status is Status.COMPLETED and instance.exitcode == 128 + signal.SIGTERM
        assert instance.reason == "Instance killed after the stop timeout"


async def test_keep_alive_during_stop(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with harness(tmp_path) as hub:
        instance = await hub.start(Script(on_stop="keep-alive"))
        for _ in range(2):
            await instance.stop(1000, True)
            assert instance.status is Status.RUNNING
            assert (await instance.health())["healthy"] is True
        assert hub.process().signals_while_alive() == []
        # Keeping alive when not allowed does not save it.
        began = trio.current_time()
        await instance.stop(1000, False)
        assert instance.status is Status.COMPLETED
        assert trio.current_time() - began == pytest.approx(1.0)  # SIGTERM at the timeout ends it
        assert hub.process().runner.stop_requests == 3


async def test_stop_refused_once_ended(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with harness(tmp_path) as hub:
        instance = await hub.start(Script(body=exits(0)))
        await ended(instance)
        with pytest.raises(InstanceNotRunning):
            await instance.stop(1000, False)


# ------------------------------------------------------------------ kill
async def test_kill_completes(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with harness(tmp_path) as hub:
        instance = await hub.start(Script(on_sigterm="ignore"))  # ends on the KILL message
        await instance.kill()
        assert instance.status is Status.KILLING
        await ended(instance, 1)
        assert hub.process().runner.received[-1].code is Code.KILL
        assert instance.status is Status.COMPLETED and instance.reason == "Instance killed"
        with pytest.raises(InstanceNotRunning):
            await instance.kill()


async def test_kill_ignoring_everything_gets_sigkill_after_the_grace(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(tmp_path) as hub:
        instance = await hub.start(Script(on_kill="ignore", on_sigterm="ignore"))
        began = trio.current_time()
        await instance.kill()
        await ended(instance)
        assert hub.process().signals_while_alive() == [
            (began, signal.SIGTERM),
            (began + GRACE, signal.SIGKILL),
        ]
        assert instance.status is Status.COMPLETED and instance.reason == "Instance killed"
        assert instance.exitcode == 128 + signal.SIGKILL


async def test_second_kill_sends_sigkill_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(tmp_path) as hub:
        instance = await hub.start(Script(on_kill="ignore", on_sigterm="ignore"))
        await instance.kill()
        await trio.sleep(1.0)
        assert instance.status is Status.KILLING
        began = trio.current_time()
        await instance.kill()
        await ended(instance, 0.5)
        assert trio.current_time() == pytest.approx(began)
        assert [sig for _, sig in hub.process().signals_while_alive()] == [signal.SIGTERM, signal.SIGKILL]


async def test_ended_instance_stays_listed_for_its_lifetime(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    removed: list[float] = []
    async with harness(tmp_path, instance_lifetime=30.0) as hub:
        instance = await hub.start(
            Script(body=exits(0)), on_removed=lambda _: removed.append(trio.current_time())
        )
        await ended(instance)
        end = trio.current_time()
        with trio.fail_after(60):
            await instance.wait_removed()
        assert removed == [pytest.approx(end + 30.0)]
        # A kill with removeImmediately forgets another one at once.
        other = await hub.start(instance_id="inst-2")
        await other.kill(remove_immediately=True)
        with trio.fail_after(1):
            await other.wait_removed()


# ------------------------------------------------------------------ exit reasons
@pytest.mark.parametrize(
    ("body", "status", "exitcode", "reason"),
    [
        (exits(0, after=3), Status.COMPLETED, 0, "Instance completed"),
        (exits(23, error="TestException: boom"), Status.ERRORED, 23, "TestException: boom"),
        (exits(23), Status.ERRORED, 23, "Sequence failed during execution"),
        (exits(3, after=1), Status.ERRORED, 3, "Runner failed with exit code 3"),
        (exits(-signal.SIGSEGV), Status.ERRORED, 128 + signal.SIGSEGV, "Runner killed by signal SIGSEGV"),
    ],
)
async def test_exit_reasons(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    body: Any,
    status: Status,
    exitcode: int,
    reason: str,
) -> None:
    async with harness(tmp_path) as hub:
        instance = await hub.start(Script(body=body))
        await ended(instance)
        assert (instance.status, instance.exitcode, instance.reason) == (status, exitcode, reason)
        assert instance.info()["terminated"] == {"exitcode": exitcode, "reason": reason}
        health = await instance.health()
        assert health["healthy"] is False and health["status"] == status.value


# ------------------------------------------------------------------ events
async def test_events_fan_out_to_every_reader(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    events = [("a", 1), ("b", 2), ("a", 3)]
    async with harness(tmp_path) as hub:
        instance = await hub.start(Script(body=emits(*events, interval=1.0)))
        got: dict[str, list[Any]] = {"all": [], "a": [], "b": [], "next-a": [], "next-any": []}

        async def follow(key: str, name: str | None) -> None:
            async for message in instance.event_stream(name):
                got[key].append(message)

        async def next_one(key: str, name: str | None) -> None:
            got[key].append(await instance.next_event(name))

        with trio.fail_after(30):
            async with trio.open_nursery() as readers:
                readers.start_soon(follow, "all", None)
                readers.start_soon(follow, "a", "a")
                readers.start_soon(follow, "b", "b")
                readers.start_soon(next_one, "next-a", "a")
                readers.start_soon(next_one, "next-any", None)
                await trio.sleep(5.0)  # every event was sent
                assert await instance.last_event("a") == 3
                assert await instance.last_event(None) == 3
                assert await instance.last_event("b") == 2
                await instance.kill()  # the streams end with the instance
        assert got == {"all": [1, 2, 3], "a": [1, 3], "b": [2], "next-a": [1], "next-any": [1]}
        with pytest.raises(Gone):
            instance.event_stream(None)
        with pytest.raises(Gone):
            await instance.next_event("a")


async def test_next_event_ends_with_the_instance(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(tmp_path) as hub:
        instance = await hub.start(Script(body=exits(0, after=2.0)))
        with pytest.raises(Gone), trio.fail_after(10):
            await instance.next_event("never")


async def test_send_event_reaches_the_runner(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with harness(tmp_path) as hub:
        instance = await hub.start(Script(replies={"ping": "pong"}))
        async with trio.open_nursery() as nursery:
            answer: list[Any] = []

            async def wait_pong() -> None:
                answer.append(await instance.next_event("pong"))

            nursery.start_soon(wait_pong)
            await trio.sleep(0.1)
            with trio.fail_after(1):
                await instance.send_event("ping", {"n": 7})
        assert answer == [{"n": 7}]
        sent = hub.process().runner.received[-1]
        assert sent.code is Code.EVENT
        assert sent.data == {"eventName": "ping", "message": {"n": 7}, "source": "api"}


async def test_stuck_control_channel_gives_up_after_its_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(tmp_path) as hub:
        instance = await hub.start(Script(reads_control=False))
        big = "x" * 100_000  # one event fills the 64 KiB pipe the runner never reads
        began = trio.current_time()
        with pytest.raises(Gone), trio.fail_after(60):
            await instance.send_event("big", big)
        assert trio.current_time() - began == pytest.approx(instance_module.CONTROL_WRITE_TIMEOUT)


# ------------------------------------------------------------------ health
async def test_health_of_a_runner_that_never_reports(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(tmp_path) as hub:
        instance = await hub.start(Script(health_interval=None))
        began = trio.current_time()
        health = await instance.health()
        assert trio.current_time() - began == pytest.approx(instance_module.FIRST_HEALTH_WAIT)
        assert health["healthy"] is False and health["status"] == "running"


async def test_health_follows_the_runners_reports(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(tmp_path) as hub:
        script = Script(healthy=False)
        instance = await hub.start(script)
        assert (await instance.health())["healthy"] is False
        script.healthy = True
        await trio.sleep(1.5)  # the next report
        assert (await instance.health())["healthy"] is True


# ------------------------------------------------------------------ streams
async def test_output_and_stdout_reach_readers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    payload = bytes(range(256)) * 2048  # 512 KiB: more than a pipe and a broadcast hold
    async with harness(tmp_path) as hub:
        instance = await hub.start(Script(body=writes(payload, b"hello\n")))
        received = bytearray()
        with trio.fail_after(10):
            async with instance.output.subscribe() as chunks:
                async for chunk in chunks:
                    received += chunk
            async with instance.stdout.subscribe() as chunks:
                stdout = b"".join([chunk async for chunk in chunks])
        assert bytes(received) == payload and stdout == b"hello\n"
        await ended(instance)
        assert instance.status is Status.COMPLETED


async def test_input_reaches_the_runner(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with harness(tmp_path) as hub:
        read: list[bytes] = []

        async def body(runner: Any) -> int:
            read.append(await runner.read_input())
            return 0

        instance = await hub.start(Script(body=body))

        async def chunks() -> AsyncIterator[bytes]:
            yield b"a,b\n"
            yield b"c,d\n"

        with trio.fail_after(5):
            await instance.write_input(chunks(), "text/csv", end=True)
        await ended(instance)
        assert read == [b"Content-Type: text/csv\r\n\r\na,b\nc,d\n"]
