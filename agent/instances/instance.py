"""One Instance: a runner process, its streams, events, health and lifecycle.

Theory of operation
-------------------
:meth:`Instance.run` is the Instance's whole life and runs in the supervisor's
nursery. It spawns the runner through the runtime, starts one pump task per
runner-to-hub channel, waits for the handshake (reporting ``started`` to the
start request only then), and waits for the process to end. The pumps copy each
channel into its own bounded buffer (:class:`~agent.streams.Broadcast`), so a
flooded stdout back-pressures only stdout while monitoring, events and log keep
flowing. After the process ends the Instance stays listed for the configured
lifetime, so its final status, output and logs can still be read; then its tasks
are cancelled and the supervisor forgets it.

Status changes go through :func:`~agent.instances.lifecycle.next_status` only.
Requests that cannot apply in the current state are refused before they touch
the table (400/409/410), so a refusal of the table itself is a bug.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import shutil
import signal
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import trio

from spacehub.models import InstanceInfo
from spacehub.protocol import runner as proto

from .. import limits
from ..errors import (
    Conflict,
    Gone,
    HubError,
    InstanceNotRunning,
    MethodNotAllowed,
    RangeNotSatisfiable,
    SequenceStartFailed,
)
from ..hublog import LogRecordDict
from ..streams import Broadcast, RecordRing, Subscription
from .lifecycle import FINAL, LIVE, Status, Trigger, next_status
from .spool import PartialLine, StreamSpool, write_json_atomic

if TYPE_CHECKING:
    from ..config import HubConfig
    from ..runtimes.base import LaunchSpec, RunnerProcess, Runtime
    from ..sequences.store import Sequence
    from ..topics import Topic, TopicReader, TopicRouter

#: Seconds a control message may wait for room in the control pipe.
CONTROL_WRITE_TIMEOUT: Final = 5.0
#: After the runner exits, how long its last monitoring messages (SEQUENCE_STOPPED, ERROR)
#: are waited for before the exit is judged: the exit and the pipe's end race.
MONITORING_DRAIN_WAIT: Final = 1.0
#: Seconds /health waits for the first health report of a new instance.
FIRST_HEALTH_WAIT: Final = 2.0
#: Bytes of stderr kept to explain a runner that fails before its handshake.
STDERR_TAIL_BYTES: Final = 4096

#: Exit codes of our runners (agent/runners) and what they mean.
EXIT_REASONS: Final = {
    20: "Runner environment is invalid (probably a bug in the hub)",
    21: "Sequence entrypoint path is invalid",
    22: "Sequence failed on start",
    23: "Sequence failed during execution",
}

#: The file in an instance's state directory a hub after this one reads.
STATE_FILE: Final = "state.json"
#: The streams kept on disk for the seam between two hubs (agent/instances/spool.py).
SPOOLED_STREAMS: Final = ("stdout", "stderr", "output")
#: Restart policies a start may ask for.
RESTART_POLICIES: Final = ("never", "on-failure", "always")

#: Content type of a topic first named by an instance that declared none: what
#: the runners write by default.
INSTANCE_TOPIC_TYPE: Final = "text/plain"

EventCallback = Callable[["Instance", str, Any], None]


def iso_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _EventWaiter:
    __slots__ = ("done", "message", "name")

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.done = trio.Event()
        self.message: Any = None


class Instance:
    def __init__(
        self,
        *,
        instance_id: str,
        sequence: Sequence,
        app_config: dict[str, Any],
        args: list[Any],
        runtime: Runtime,
        config: HubConfig,
        launch: Callable[[Instance], LaunchSpec],
        input_topic: str | None = None,
        output_topic: str | None = None,
        limits_request: dict[str, Any] | None = None,
        on_event: EventCallback | None = None,
        on_removed: Callable[[Instance], None] | None = None,
        on_ended: Callable[[Instance], None] | None = None,
        topics: TopicRouter | None = None,
        state_dir: Path | None = None,
        restart: str = "never",
        restarts: int = 0,
        adopted: RunnerProcess | None = None,
        restored: dict[str, Any] | None = None,
    ) -> None:
        self.id = instance_id
        self.sequence = sequence
        self.app_config = app_config
        self.args = args
        self.input_topic = input_topic
        self.output_topic = output_topic
        self.limits_request = limits_request or {}
        self._runtime = runtime
        self._config = config
        self._launch = launch
        self._on_event = on_event
        self._on_removed = on_removed
        self._on_ended = on_ended
        self._topics = topics
        #: where the instance's state, its holder's files and its spools live
        self.state_dir = state_dir
        #: restart policy (RESTART_POLICIES) and how many times it restarted
        self.restart = restart
        self.restarts = restarts
        #: the runner a hub before left running, taken back; or None to start one
        self._adopted = adopted
        #: what a hub before saved (state.json), when taking it back or listing its end
        self._restored = restored or {}
        #: the hub stops and leaves the runner running (see detach)
        self._detaching = False
        #: a stop or kill was asked for: a restart policy does not apply to this end
        self.stop_requested = bool(self._restored.get("desired") == "stopped")
        self._spools: dict[str, StreamSpool] = {}
        self._input_content_type: str | None = None
        #: the content type the runner declared for its output topic (kept for the next hub)
        self._output_content_type: str | None = None
        #: set by the supervisor while a restart waits for its backoff (a stop cancels it)
        self.restart_scope: trio.CancelScope | None = None
        self._started_at: float | None = None
        self._replaced = False
        self._ended_at: float | None = None
        self._nursery: trio.Nursery | None = None
        # The full id goes with every record (the JSON log's "instance"); the text log shows
        # the logger's short name.
        self._logger = logging.LoggerAdapter(
            logging.getLogger(f"agent.instance.{instance_id[:8]}"), {"instance": instance_id}
        )

        self.status = Status.INITIALIZING
        self.created = iso_now()
        self.started: str | None = None
        self.ended: str | None = None
        self.exitcode: int | None = None
        self.reason: str | None = None
        self.provides: str | None = None
        self.requires: str | None = None
        self.pid: int | None = None

        self.output = Broadcast(limits.INSTANCE_STREAM_BUFFER_BYTES, self._marker("output"))
        self.stdout = Broadcast(limits.INSTANCE_STREAM_BUFFER_BYTES, self._marker("stdout"))
        self.stderr = Broadcast(limits.INSTANCE_STREAM_BUFFER_BYTES, self._marker("stderr"))
        self.log = RecordRing[LogRecordDict](limits.INSTANCE_LOG_RING_RECORDS)

        self._process: RunnerProcess | None = None
        self._control_lock = trio.Lock()
        self._input_lock = trio.Lock()
        self._stdin_lock = trio.Lock()
        self._input_preamble_sent = False
        self._input_ended = False
        self._stdin_ended = False
        self._stderr_tail: deque[bytes] = deque()
        self._stderr_tail_size = 0

        self._state_changed = trio.lowlevel.ParkingLot()
        self._handshake = trio.Event()
        self._exited = trio.Event()
        #: the monitoring pipe is read to its end (every message the runner sent is handled)
        self._monitoring_done = trio.Event()
        self._removed = trio.Event()
        self._kill_requested = trio.Event()
        #: a kill with removeImmediately: forget the instance as soon as it ended
        self._remove_now = trio.Event()
        self._first_health = trio.Event()
        self._health: dict[str, Any] = {}
        self._keep_alive_seen = False
        self._stopped_by_runner = False
        self._runner_error: dict[str, Any] | None = None

        self._last_events: dict[str, Any] = {}
        self._has_last_any = False
        self._last_any: Any = None
        self._event_waiters: list[_EventWaiter] = []
        self._event_streams: set[trio.MemorySendChannel[tuple[str, Any]]] = set()

    # ------------------------------------------------------------------ info
    @property
    def is_live(self) -> bool:
        return self.status in LIVE

    def info(self) -> InstanceInfo:
        info: dict[str, Any] = {
            "id": self.id,
            "sequence": {
                "id": self.sequence.id,
                "name": self.sequence.package.name or None,
                "config": self.sequence.config(),
                "location": self.sequence.info().get("location"),
            },
            "appConfig": self.app_config,
            "args": self.args,
            "created": self.created,
            "started": self.started,
            "ended": self.ended,
            "status": self.status.value,
        }
        if self.provides:
            info["provides"] = self.provides
        if self.requires:
            info["requires"] = self.requires
        if self.exitcode is not None or self.reason is not None:
            info["terminated"] = {"exitcode": self.exitcode, "reason": self.reason}
        info["restart"] = self.restart
        info["restarts"] = self.restarts
        return cast(InstanceInfo, {k: v for k, v in info.items() if v is not None})

    # ------------------------------------------------------------------ state on disk
    def _marker(self, name: str) -> Callable[[int], None]:
        def mark(position: int) -> None:
            spool = self._spools.get(name)
            if spool is not None:
                spool.set_mark(position)

        return mark

    def saved_state(self) -> dict[str, Any]:
        """What a hub after this one needs to take the instance back or start it again."""
        return {
            "id": self.id,
            "sequence": self.sequence.id,
            "appConfig": self.app_config,
            "args": self.args,
            "inputTopic": self.input_topic,
            "outputTopic": self.output_topic,
            "limits": self.limits_request,
            "created": self.created,
            "started": self.started,
            "status": self.status.value,
            "provides": self.provides,
            "requires": self.requires,
            "inputContentType": self._input_content_type,
            "outputContentType": self._output_content_type,
            "inputPreambleSent": self._input_preamble_sent,
            "inputEnded": self._input_ended,
            "stdinEnded": self._stdin_ended,
            "restart": self.restart,
            "restarts": self.restarts,
            "desired": "stopped" if self.stop_requested else "running",
            "pid": self.pid,
            "ended": self.ended,
            "exitcode": self.exitcode,
            "reason": self.reason,
        }

    def save_state(self) -> None:
        """Write state.json (atomically, synced: it outlives power losses)."""
        if self.state_dir is None or self._detaching:
            return
        write_json_atomic(self.state_dir / STATE_FILE, self.saved_state())

    def _open_spools(self, *, fresh: bool = False) -> None:
        if self.state_dir is None:
            return
        for name in SPOOLED_STREAMS:
            self._spools[name] = StreamSpool(self.state_dir, name, fresh=fresh)
        if fresh:
            for name in ("monitoring", "log", "topic"):
                PartialLine(self.state_dir, name).clear()

    def _restore_streams(self) -> None:
        """Put back into each stream what the hub before had read and no reader taken."""
        for name, spool in self._spools.items():
            broadcast: Broadcast = getattr(self, name)
            broadcast.restore(spool.mark, spool.read(spool.mark, spool.end))

    def _restore_fields(self) -> None:
        saved = self._restored
        self.created = saved.get("created") or self.created
        self.started = saved.get("started")
        self._input_preamble_sent = bool(saved.get("inputPreambleSent"))
        self._input_ended = bool(saved.get("inputEnded"))
        self._stdin_ended = bool(saved.get("stdinEnded"))
        self._input_content_type = saved.get("inputContentType")
        self._output_content_type = saved.get("outputContentType")

    def ran_seconds(self) -> float | None:
        """How long the runner ran under this hub (None if it never ran here)."""
        if self._started_at is None:
            return None
        return (self._ended_at or trio.current_time()) - self._started_at

    def forget_now(self) -> None:
        """Stop listing this ended instance: its restart replaces it (and takes over
        its scratch directory)."""
        self._replaced = True
        self._remove_now.set()

    @property
    def removed(self) -> bool:
        return self._removed.is_set()

    def detach(self) -> None:
        """The hub stops and this instance stays: its runner goes on, taken back by
        the next hub. Cancel the instance's task after this."""
        self._detaching = True

    def _set_status(self, trigger: Trigger) -> None:
        new = next_status(self.status, trigger)
        if new is not self.status:
            self._hub_log("debug", f"status {self.status.value} -> {new.value} ({trigger.name})")
        self.status = new
        self._state_changed.unpark_all()

    def _hub_log(self, level: str, message: str) -> None:
        """A line in the hub log and in this instance's own /log."""
        number = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING}.get(
            level, logging.ERROR
        )
        self._logger.log(number, message)
        self.log.append({"ts": _ms_now(), "level": level.upper(), "from": "Hub", "msg": message})

    # ------------------------------------------------------------------ life
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The whole life of the Instance; ``started`` once the runner handshook.

        Raises :class:`SequenceStartFailed` (before ``started``) when the runner
        ends or times out before its handshake.
        """
        if self._adopted is not None:
            await self._run_adopted(self._adopted, task_status)
            return
        spec = self._launch(self)
        self._open_spools(fresh=True)  # a restart's streams begin again at 0
        try:
            process = await self._runtime.spawn(spec)
        except OSError as exc:
            await _remove_work_dir(spec.cwd)
            self._finish_without_process(f"cannot start the runner: {exc}")
            raise SequenceStartFailed(f"cannot start the runner: {exc}") from None
        self._process = process
        self.pid = process.pid
        self._set_status(Trigger.SPAWNED)
        start_failure: str | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._start_pumps(nursery, process)

                with trio.move_on_after(self._config.start_timeout):
                    await self._wait_for(lambda: self._handshake.is_set() or self._exited.is_set())
                if not self._handshake.is_set():
                    start_failure = self._start_failure_reason()
                    self._kill_requested.set()
                    with trio.move_on_after(self._config.kill_grace + 1):
                        await self._exited.wait()
                    nursery.cancel_scope.cancel()
                else:
                    await self._send_control(
                        proto.Message(proto.Code.PONG, {"appConfig": self.app_config, "args": self.args})
                    )
                    self._hub_log("info", f"Instance started (pid {process.pid})")
                    self.save_state()
                    task_status.started()
                    await self._live_then_listed()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._let_go(process, spec.cwd)
        if start_failure is not None:
            raise SequenceStartFailed(start_failure)

    def _start_pumps(self, nursery: trio.Nursery, process: RunnerProcess) -> None:
        """One task per runner-to-hub channel, the exit watch and the kill enforcer."""
        self._nursery = nursery
        nursery.start_soon(self._pump_bytes, process.stdout, self.stdout, False)
        nursery.start_soon(self._pump_bytes, process.stderr, self.stderr, True)
        nursery.start_soon(self._pump_bytes, process.output, self.output, False)
        nursery.start_soon(self._pump_log, process.log)
        nursery.start_soon(self._pump_monitoring, process.monitoring)
        nursery.start_soon(self._watch_exit, process)
        nursery.start_soon(self._enforce_kill, process)

    async def _live_then_listed(self) -> None:
        """Wait for the end, then stay listed for the instance lifetime."""
        self._started_at = self._started_at or trio.current_time()
        await self._exited.wait()
        self._ended_at = trio.current_time()
        self.save_state()
        if self._on_ended is not None:
            self._on_ended(self)
        with trio.move_on_after(self._config.instance_lifetime):
            await self._remove_now.wait()

    async def _let_go(self, process: RunnerProcess, work_dir: Path | None) -> None:
        """The instance's task ends: keep the runner for the next hub (detaching) or
        let it go for good (it ended, or its start failed)."""
        if self._detaching and self._handshake.is_set() and not self._exited.is_set():
            await process.detach()
        else:
            process.signal_group(signal.SIGKILL)
            await process.aclose()
            if work_dir is not None and not self._replaced:
                await _remove_work_dir(work_dir)
        for spool in self._spools.values():
            spool.close()
        self._close_streams()
        self._removed.set()
        if self._on_removed is not None and not self._detaching:
            self._on_removed(self)

    async def _run_adopted(self, process: RunnerProcess, task_status: trio.TaskStatus[None]) -> None:
        """The life of an instance taken back from a hub before: no spawn, no handshake."""
        self._restore_fields()
        self._open_spools()
        self._restore_streams()
        self._process = process
        self.pid = process.pid
        self._handshake.set()
        self._set_status(Trigger.ADOPTED)
        work_dir = self._config.sequences_root / ".instances" / self.id
        try:
            async with trio.open_nursery() as nursery:
                self._start_pumps(nursery, process)
                # Its topics, bound again as the runner named them to the hub before.
                if self._restored.get("provides"):
                    self.provides = str(self._restored["provides"])
                    self._bind_output(self.provides, self._output_content_type)
                if self._restored.get("requires"):
                    self.requires = str(self._restored["requires"])
                    self._bind_input(self.requires, self._input_content_type)
                self._hub_log("info", f"Instance taken back from the hub before (pid {process.pid})")
                if self.stop_requested and process.returncode is None:
                    # The hub before was ending it when it went: finish the job.
                    self._set_status(Trigger.KILL)
                    self._kill_requested.set()
                task_status.started()
                await self._live_then_listed()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._let_go(process, work_dir)

    async def run_ended(
        self,
        *,
        exitcode: int | None,
        ended: str | None,
        reason: str,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """List an instance that ended while no hub ran (its holder gone too), with
        what its streams last carried, for the instance lifetime."""
        self._restore_fields()
        self._open_spools()
        self._restore_streams()
        self._handshake.set()
        self._set_status(Trigger.ADOPTED)
        self.exitcode = exitcode
        self.ended = ended or iso_now()
        self.reason = reason
        clean = exitcode == 0 or self._restored.get("status") == Status.COMPLETED.value
        self._set_status(Trigger.EXITED_CLEAN if clean else Trigger.EXITED_FAILED)
        self._hub_log("info", f"Instance ended while no hub ran: {reason}")
        self._exited.set()
        self._monitoring_done.set()
        for stream in (self.output, self.stdout, self.stderr):
            stream.close()
        self.log.close()
        task_status.started()
        try:
            await self._live_then_listed()
        finally:
            with trio.CancelScope(shield=True):
                for spool in self._spools.values():
                    spool.close()
                self._close_streams()
                self._removed.set()
                if self._on_removed is not None and not self._detaching:
                    self._on_removed(self)

    def _finish_without_process(self, reason: str) -> None:
        self.reason = reason
        self.ended = iso_now()
        self._set_status(Trigger.EXITED_FAILED)
        self._exited.set()
        self._close_streams()
        if self._on_removed is not None:
            self._on_removed(self)

    def _close_streams(self) -> None:
        for stream in (self.output, self.stdout, self.stderr):
            stream.close()
        self.log.close()
        for channel in list(self._event_streams):
            channel.close()
        self._event_streams.clear()
        for waiter in self._event_waiters:
            waiter.done.set()
        self._event_waiters.clear()

    async def _wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._state_changed.park()

    def _start_failure_reason(self) -> str:
        if self._runner_error is not None:
            return str(self._runner_error.get("message") or "the runner failed before its handshake")
        if not self._exited.is_set():
            return f"the runner did not complete its handshake within {self._config.start_timeout:g} s"
        tail = b"".join(self._stderr_tail).decode("utf-8", "replace").strip()
        text = f"the runner exited with code {self.exitcode} before its handshake"
        return f"{text}: {tail[-500:]}" if tail else text

    async def _watch_exit(self, process: RunnerProcess) -> None:
        code = await process.wait()
        # What the runner said last (stopped by its handler, its error) decides the reason.
        with trio.move_on_after(MONITORING_DRAIN_WAIT):
            await self._monitoring_done.wait()
        self.exitcode = code if code >= 0 else 128 - code
        # A runner that ended while no hub ran: its holder noted when.
        self.ended = getattr(process, "ended_at", None) or iso_now()
        self.reason = self._exit_reason(code)
        # The table decides what an exit means in each state (a SIGKILL asked for
        # by a kill request still completes the instance).
        self._set_status(Trigger.EXITED_CLEAN if code == 0 else Trigger.EXITED_FAILED)
        self._hub_log(
            "info", f"Instance ended: {self.status.value}, {self.reason} (exit code {self.exitcode})"
        )
        self._exited.set()
        self._state_changed.unpark_all()
        # Nobody reads an ended instance's input or events any more.
        for waiter in self._event_waiters:
            waiter.done.set()
        self._event_waiters.clear()
        for channel in list(self._event_streams):
            channel.close()
        self._event_streams.clear()
        # The hub's writing ends are of no use to a process that is gone; the
        # reading ends close as their pumps drain (an ended instance stays listed
        # for its lifetime without holding pipes).
        for stream in (process.stdin, process.control, process.input):
            await trio.aclose_forcefully(stream)

    def _exit_reason(self, code: int) -> str:
        if self.status is Status.KILLING:
            return "Instance killed"
        if self.status is Status.STOPPING:
            return "Instance stopped" if self._stopped_by_runner else "Instance killed after the stop timeout"
        runtime_reason = getattr(self._process, "exit_reason", None)  # e.g. Podman: memory limit exceeded
        if runtime_reason:
            return str(runtime_reason)
        if self._runner_error is not None and self._runner_error.get("message"):
            return str(self._runner_error["message"])
        if code == 0:
            return "Instance completed" if self._handshake.is_set() else "Runner exited before its handshake"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            return f"Runner killed by signal {name}"
        return EXIT_REASONS.get(code, f"Runner failed with exit code {code}")

    async def _enforce_kill(self, process: RunnerProcess) -> None:
        """SIGTERM to the group once a kill is asked for, SIGKILL after the grace."""
        await self._kill_requested.wait()
        process.signal_group(signal.SIGTERM)
        with trio.move_on_after(self._config.kill_grace):
            await self._exited.wait()
        if not self._exited.is_set():
            self._hub_log(
                "warn", f"Instance ignored SIGTERM for {self._config.kill_grace:g} s; sending SIGKILL"
            )
            process.signal_group(signal.SIGKILL)

    # ------------------------------------------------------------------ pumps
    async def _next_chunk(self, stream: trio.abc.ReceiveStream, spool: StreamSpool | None) -> bytes:
        """The next chunk of an outbound channel; on disk (the spool) before anyone sees it."""
        fileno = getattr(stream, "fileno", None)
        if spool is None:
            return bytes(await stream.receive_some(limits.STREAM_CHUNK_BYTES))
        if fileno is None:  # not a pipe (tests' memory streams): read, then keep
            chunk = bytes(await stream.receive_some(limits.STREAM_CHUNK_BYTES))
            spool.append(chunk)
            return chunk
        pipe = fileno()
        while True:
            try:
                return spool.splice_from(pipe, limits.STREAM_CHUNK_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(pipe)
            except OSError as exc:  # closed under us (the hub is going)
                raise trio.ClosedResourceError(str(exc)) from None

    async def _pump_bytes(self, stream: trio.abc.ReceiveStream, target: Broadcast, keep_tail: bool) -> None:
        spool = next((self._spools[n] for n in self._spools if getattr(self, n) is target), None)
        try:
            while chunk := await self._next_chunk(stream, spool):
                if keep_tail and not self._handshake.is_set():
                    self._stderr_tail.append(bytes(chunk))
                    self._stderr_tail_size += len(chunk)
                    while self._stderr_tail_size > STDERR_TAIL_BYTES and len(self._stderr_tail) > 1:
                        self._stderr_tail_size -= len(self._stderr_tail.popleft())
                await target.write(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            target.close()
            if spool is not None and not self._detaching:
                spool.finish()  # its files stay readable for ?offset=
            # Drained: the pipe is not needed while the instance stays listed.
            await trio.aclose_forcefully(stream)

    async def _pump_log(self, stream: trio.abc.ReceiveStream) -> None:
        tail = PartialLine(self.state_dir, "log")
        buffer = bytearray(tail.restore() if self._restored else b"")
        try:
            while chunk := await stream.receive_some(limits.STREAM_CHUNK_BYTES):
                buffer += chunk
                while (newline := buffer.find(b"\n")) >= 0 or len(buffer) > limits.MAX_CONTROL_LINE_BYTES:
                    cut = newline if newline >= 0 else limits.MAX_CONTROL_LINE_BYTES
                    line = bytes(buffer[:cut])
                    del buffer[: cut + (1 if newline >= 0 else 0)]
                    self._append_runner_log(line)
                tail.save(buffer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            tail.close()
        if buffer:
            self._append_runner_log(bytes(buffer))
        await trio.aclose_forcefully(stream)
        # /log readers see the end once the runner's log is drained and the hub
        # has written its own last line about the exit.
        await self._exited.wait()
        self.log.close()

    def _append_runner_log(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            record = {
                "ts": _ms_now(),
                "level": "INFO",
                "from": "Sequence",
                "msg": line.decode("utf-8", "replace"),
            }
        self.log.append(record)

    async def _pump_monitoring(self, stream: trio.abc.ReceiveStream) -> None:
        reader = proto.MessageReader(limits.MAX_CONTROL_LINE_BYTES)
        tail = PartialLine(self.state_dir, "monitoring")
        # Taken back from a hub before: its partial line first. A hub killed between
        # reading a chunk and noting its partial line leaves the next line cut: that
        # one line is skipped, not held against the runner.
        forgive = bool(self._restored)
        if forgive and (partial := tail.restore()):
            reader.receive_data(partial)
        try:
            while True:
                chunk = await stream.receive_some(limits.STREAM_CHUNK_BYTES)
                reader.receive_data(bytes(chunk))
                while True:
                    try:
                        message = reader.next_message()
                    except proto.ProtocolError as exc:
                        if not forgive:
                            raise
                        forgive = False
                        self._hub_log("warn", f"skipped a line cut when the hub before ended: {exc}")
                        continue
                    if message is None:
                        break
                    forgive = False
                    self._handle_runner_message(message)
                tail.save(reader.pending)
                if not chunk:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except proto.ProtocolError as exc:
            self._hub_log("error", f"runner protocol error, killing the instance: {exc}")
            if self.is_live and self.status is not Status.KILLING:
                self._set_status(Trigger.KILL)
            self._kill_requested.set()
            # Keep draining so the runner never blocks on a full monitoring pipe.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while await stream.receive_some(limits.STREAM_CHUNK_BYTES):
                    pass
        finally:
            tail.close()
            self._monitoring_done.set()
            await trio.aclose_forcefully(stream)

    def _handle_runner_message(self, message: proto.Message) -> None:
        code, data = message.code, message.data
        if code is proto.Code.PING:
            if not self._handshake.is_set() and self.status is Status.STARTING:
                self.started = iso_now()
                self._set_status(Trigger.HANDSHAKE)
                self._handshake.set()
        elif code is proto.Code.MONITORING:
            self._health = data
            self._first_health.set()
        elif code is proto.Code.EVENT:
            name = data.get("eventName")
            if isinstance(name, str) and name:
                self._record_event(name, data.get("message"))
                if self._on_event is not None:
                    self._on_event(self, name, data.get("message"))
        elif code is proto.Code.PANG:
            self._route_topics(data)
        elif code is proto.Code.ALIVE:
            self._keep_alive_seen = True
            if self.status in (Status.RUNNING, Status.STOPPING):
                self._set_status(Trigger.KEEP_ALIVE)
        elif code is proto.Code.SEQUENCE_STOPPED:
            self._stopped_by_runner = True
        elif code is proto.Code.ERROR:
            self._runner_error = data
        elif code is proto.Code.SEQUENCE_COMPLETED:
            pass  # the exit that follows says all
        else:
            self._hub_log("warn", f"unexpected message from the runner: {code.name}")

    # ------------------------------------------------------------------ topics
    def _route_topics(self, pang: dict[str, Any]) -> None:
        """Bind the instance to the topics it provides and requires (once each).

        A PANG names one direction with its content type (our runners send one
        PANG per direction); the start request's outputTopic/inputTopic win over
        the names the sequence declared.
        """
        content_type = pang.get("contentType") or None
        if pang.get("provides") and self.provides is None:
            self.provides = str(self.output_topic or pang["provides"])
            self._output_content_type = content_type
            self._bind_output(self.provides, content_type)
            self.save_state()
        if pang.get("requires") and self.requires is None:
            self.requires = str(self.input_topic or pang["requires"])
            self._input_content_type = content_type
            self._bind_input(self.requires, content_type)
            self.save_state()

    def _topic_for(self, name: str, content_type: str | None) -> Topic | None:
        """Topic ``name`` for this instance: made with its declared type if new; an existing
        one of another type is connected all the same, bytes passed through as they are (as
        on the original), with a warning in the instance's log."""
        assert self._topics is not None
        try:
            topic = self._topics.ensure_any(name, content_type, default=INSTANCE_TOPIC_TYPE)
        except HubError as exc:  # an invalid name or type: nothing to connect
            self._hub_log("error", f"topic {name} not connected: {exc.message}")
            return None
        declared = content_type.split(";", 1)[0].strip().lower() if content_type else None
        if declared is not None and declared != topic.content_type:
            self._hub_log(
                "warn",
                f"topic {name} carries {topic.content_type}, this sequence declared {declared}:"
                " connected anyway, the bytes pass through unchanged",
            )
        return topic

    def _bind_output(self, name: str, content_type: str | None) -> None:
        if self._topics is None or self._nursery is None:
            return
        topic = self._topic_for(name, content_type)
        if topic is None:
            return
        # Subscribed now, before any output, so the topic gets all of it.
        subscription = self.output.subscribe()
        self._hub_log("info", f"output feeds topic {name} ({topic.content_type})")
        self._nursery.start_soon(self._feed_topic, topic, subscription)

    async def _feed_topic(self, topic: Topic, subscription: Subscription) -> None:
        assert self._topics is not None
        try:
            # The partial line the topic holds back is kept on disk: the output's mark has
            # passed it, so the next hub goes on from it instead of losing it.
            with subscription:
                await self._topics.write(
                    topic, subscription, who=self.id, partial=PartialLine(self.state_dir, "topic")
                )
        except trio.ClosedResourceError:
            self._hub_log("warn", f"topic {topic.name} was deleted while this instance fed it")

    def _bind_input(self, name: str, content_type: str | None) -> None:
        if self._topics is None or self._nursery is None:
            return
        topic = self._topic_for(name, content_type)
        if topic is None:
            return
        # Attached now: from here on, every byte written to the topic reaches us.
        reader = self._topics.subscribe(topic, who=self.id)
        self._hub_log("info", f"input comes from topic {name} ({topic.content_type})")
        self._nursery.start_soon(self._consume_topic, topic, reader)

    async def _consume_topic(self, topic: Topic, reader: TopicReader) -> None:
        assert self._process is not None
        stream = self._process.input
        async with self._input_lock, trio.open_nursery() as nursery:
            # An ended instance lets go of the topic at once, so that the next
            # consumer gets what follows (nothing is read for a dead process).
            async def release_on_exit() -> None:
                await self._exited.wait()
                reader.close()
                nursery.cancel_scope.cancel()

            nursery.start_soon(release_on_exit)
            try:
                with reader:
                    if not self._input_preamble_sent:  # a hub before may have sent it
                        await stream.send_all(proto.encode_preamble(topic.content_type))
                        self._input_preamble_sent = True
                        self.save_state()
                    async for chunk in reader:
                        await stream.send_all(chunk)
                self._input_ended = True
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the instance stopped reading: it ended; the reader is closed
            nursery.cancel_scope.cancel()

    # ------------------------------------------------------------------ control
    async def _send_control(self, message: proto.Message) -> bool:
        """Send one control message; False if the runner is gone or stuck."""
        if self._process is None:
            return False
        data = proto.encode(message)
        with trio.move_on_after(CONTROL_WRITE_TIMEOUT):
            async with self._control_lock:
                try:
                    await self._process.control.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return False
                return True
        self._hub_log("warn", f"control channel stuck; {message.code.name} not delivered")
        return False

    async def stop(self, timeout_ms: int, can_keep_alive: bool) -> None:
        """Ask the sequence to stop; returns when it ended, or when the window
        closed (the instance kept alive, or killed if it did not answer)."""
        if self._cancel_restart():
            return
        if self.status not in (Status.RUNNING, Status.STOPPING):
            raise InstanceNotRunning(f"Instance {self.id} is not running (status {self.status.value})")
        self._set_status(Trigger.STOP)
        self.stop_requested = True
        self.save_state()
        self._keep_alive_seen = False
        await self._send_control(
            proto.Message(proto.Code.STOP, {"timeout": timeout_ms, "canCallKeepalive": can_keep_alive})
        )
        with trio.move_on_after(timeout_ms / 1000):
            await self._exited.wait()
        if self._exited.is_set():
            return
        if can_keep_alive and self._keep_alive_seen:
            return
        if self.status is Status.RUNNING:  # kept alive without being allowed to
            self._set_status(Trigger.STOP)
        self._kill_requested.set()
        with trio.move_on_after(self._config.kill_grace + 1):
            await self._exited.wait()

    async def kill(self, *, remove_immediately: bool = False) -> None:
        """End the instance: KILL message, SIGTERM to the group, SIGKILL after the
        grace. A second kill while killing sends SIGKILL at once. With
        ``remove_immediately`` the instance is not kept listed once it ended."""
        if self._cancel_restart() and not remove_immediately:
            return
        if remove_immediately:
            self._remove_now.set()
            if not self.is_live:
                return  # ended already: it is forgotten now, which is all that was asked
        if not self.is_live:
            raise InstanceNotRunning(f"Instance {self.id} is not running (status {self.status.value})")
        if self.status is Status.KILLING:
            if self._process is not None:
                self._hub_log("info", "second kill: sending SIGKILL")
                self._process.signal_group(signal.SIGKILL)
            return
        self._set_status(Trigger.KILL)
        self.stop_requested = True
        self.save_state()
        self._kill_requested.set()
        await self._send_control(proto.Message(proto.Code.KILL, {}))

    def _cancel_restart(self) -> bool:
        """A stop or kill of an ended instance waiting to restart: it stays ended."""
        if self.is_live or self.restart_scope is None:
            return False
        self.restart_scope.cancel()
        self.stop_requested = True
        self.save_state()
        self._hub_log("info", "restart cancelled: the instance was stopped")
        return True

    def terminate(self) -> None:
        """SIGTERM to the runner's process group, through its runtime (hub shutdown)."""
        if self._process is not None and self.is_live:
            self._process.signal_group(signal.SIGTERM)

    async def wait_ended(self) -> None:
        await self._exited.wait()

    async def wait_removed(self) -> None:
        await self._removed.wait()

    async def health(self) -> dict[str, Any]:
        if self.status in (Status.RUNNING, Status.STOPPING):
            with trio.move_on_after(FIRST_HEALTH_WAIT):
                await self._first_health.wait()
        healthy = bool(self._health.get("healthy", False)) and self.status in (
            Status.RUNNING,
            Status.STOPPING,
        )
        report: dict[str, Any] = {**self._health, "healthy": healthy, "status": self.status.value}
        if self.pid is not None:
            report["processId"] = self.pid
        stats = getattr(self._process, "stats", None)  # the Podman runtime: container memory and CPU
        if stats is not None and self.status in (Status.RUNNING, Status.STOPPING):
            report["container"] = await stats()
        return report

    # ------------------------------------------------------------------ events
    def _record_event(self, name: str, message: Any) -> None:
        self._last_events[name] = message
        self._has_last_any, self._last_any = True, message
        remaining = []
        for waiter in self._event_waiters:
            if waiter.name is None or waiter.name == name:
                waiter.message = message
                waiter.done.set()
            else:
                remaining.append(waiter)
        self._event_waiters = remaining
        for channel in list(self._event_streams):
            try:
                channel.send_nowait((name, message))
            except trio.WouldBlock:
                # A reader this far behind is cut off rather than slowing the hub.
                channel.close()
                self._event_streams.discard(channel)

    async def send_event(self, name: str, message: Any, source: str = "api") -> None:
        if not self.is_live or self.status is Status.STARTING:
            raise InstanceNotRunning(f"Instance {self.id} is not running (status {self.status.value})")
        payload = {"eventName": name, "message": message, "source": source}
        if not await self._send_control(proto.Message(proto.Code.EVENT, payload)):
            raise Gone(f"Instance {self.id} did not take the event: its runner is gone or stuck")

    async def next_event(self, name: str | None) -> Any:
        """The message of the next event called ``name`` (any name if None)."""
        if not self.is_live:
            raise Gone(f"Instance {self.id} has ended (status {self.status.value}); no more events")
        waiter = _EventWaiter(name)
        self._event_waiters.append(waiter)
        try:
            await waiter.done.wait()
        finally:
            with contextlib.suppress(ValueError):
                self._event_waiters.remove(waiter)
        if not waiter.done.is_set() or (waiter.message is None and not self.is_live):
            raise Gone(f"Instance {self.id} ended before the event arrived")
        return waiter.message

    async def last_event(self, name: str | None) -> Any:
        """The message of the last event called ``name``, or the next one."""
        if name is None:
            if self._has_last_any:
                return self._last_any
        elif name in self._last_events:
            return self._last_events[name]
        return await self.next_event(name)

    def event_stream(self, name: str | None) -> AsyncGenerator[Any, None]:
        """Every event called ``name`` (any if None) from now until the end.
        Refuses at once (not at the first read) when the instance has ended."""
        if not self.is_live:
            raise Gone(f"Instance {self.id} has ended (status {self.status.value}); no more events")
        send, receive = trio.open_memory_channel[tuple[str, Any]](limits.EVENT_STREAM_QUEUE)
        self._event_streams.add(send)
        return self._follow_events(name, send, receive)

    async def _follow_events(
        self,
        name: str | None,
        send: trio.MemorySendChannel[tuple[str, Any]],
        receive: trio.MemoryReceiveChannel[tuple[str, Any]],
    ) -> AsyncGenerator[Any, None]:
        try:
            async with receive:
                async for event_name, message in receive:
                    if name is None or event_name == name:
                        yield message
        finally:
            self._event_streams.discard(send)
            send.close()

    # ------------------------------------------------------------------ output streams
    def read_stream(self, name: str, offset: int | None = None) -> AsyncGenerator[bytes, None]:
        """A reader of ``output``, ``stdout`` or ``stderr``: from where the readers
        before left off, or from byte ``offset`` of the stream (counted from the
        instance's start, across hub restarts) while it is kept. Refuses at once:
        :class:`Gone` for bytes no longer kept, :class:`RangeNotSatisfiable` past the end."""
        broadcast: Broadcast = getattr(self, name)
        if offset is not None and offset > broadcast.end:
            raise RangeNotSatisfiable(
                f"offset {offset} is past the end of {name} ({broadcast.end} bytes so far)"
            )
        spool = self._spools.get(name)
        if offset is not None and offset < broadcast.start and (spool is None or offset < spool.start):
            kept = spool.start if spool is not None else broadcast.start
            raise Gone(f"bytes of {name} before offset {kept} are no longer kept (asked from {offset})")
        return self._read_from(broadcast, spool, offset)

    async def _read_from(
        self, broadcast: Broadcast, spool: StreamSpool | None, offset: int | None
    ) -> AsyncGenerator[bytes, None]:
        # Attached at the first read (a reader never read holds nothing back).
        first = b""
        if offset is None or offset >= broadcast.start:
            subscription = broadcast.subscribe(offset)
        else:
            start = broadcast.start
            subscription = broadcast.subscribe(start)  # holds the stream from here on
            if spool is not None and offset >= spool.start:
                first = spool.read(offset, start)
            else:  # dropped from the disk since the request was checked (a slow start)
                subscription.close()
                return
        with subscription:
            for begin in range(0, len(first), limits.STREAM_CHUNK_BYTES):
                yield first[begin : begin + limits.STREAM_CHUNK_BYTES]
            async for chunk in subscription:
                yield chunk

    # ------------------------------------------------------------------ input
    async def write_input(self, body: AsyncIterable[bytes], content_type: str | None, end: bool) -> None:
        if self.requires or self.input_topic:
            raise MethodNotAllowed("Input provided in other way")
        self._check_takes_data("input")
        async with self._input_lock:
            if self._input_ended:
                raise Conflict(f"Instance {self.id}'s input has already ended")
            assert self._process is not None
            stream = self._process.input
            try:
                if not self._input_preamble_sent:
                    await stream.send_all(proto.encode_preamble(content_type or "application/octet-stream"))
                    self._input_preamble_sent = True
                    self.save_state()
                async for chunk in body:
                    await stream.send_all(chunk)
                if end:
                    self._input_ended = True
                    self.save_state()
                    await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise Gone(f"Instance {self.id} stopped reading its input") from None

    async def write_stdin(self, body: AsyncIterable[bytes], end: bool) -> None:
        self._check_takes_data("stdin")
        async with self._stdin_lock:
            if self._stdin_ended:
                raise Conflict(f"Instance {self.id}'s stdin has already ended")
            assert self._process is not None
            stream = self._process.stdin
            try:
                async for chunk in body:
                    await stream.send_all(chunk)
                if end:
                    self._stdin_ended = True
                    self.save_state()
                    await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise Gone(f"Instance {self.id} stopped reading its stdin") from None

    def _check_takes_data(self, what: str) -> None:
        if self.status in FINAL or self._process is None:
            raise Gone(f"Instance {self.id} has ended (status {self.status.value}); it takes no more {what}")
        if self.status is not Status.RUNNING and self.status is not Status.STOPPING:
            raise InstanceNotRunning(f"Instance {self.id} is {self.status.value}; it takes no {what} now")


def _ms_now() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp() * 1000)


async def _remove_work_dir(path: Path) -> None:
    """Remove an instance's scratch directory: an empty or missing one (the usual
    case) at once, one with files in a worker thread."""
    try:
        path.rmdir()
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    await trio.to_thread.run_sync(partial(shutil.rmtree, path, ignore_errors=True))
