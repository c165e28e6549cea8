"""A fake runtime for in-process tests of Instance and Supervisor.

:class:`FakeRuntime` implements the runtime interface (``agent.runtimes.base``):
``spawn`` hands back a :class:`FakeProcess` whose eight channels are bounded
in-memory pipes (:class:`Pipe`, 64 KiB like an OS pipe, with the same end-of-file
and broken-pipe behaviour), and whose "runner" is a trio task speaking the real
runner control protocol (``spacehub.protocol.runner``) over them. Nothing of the
hub is faked: only the process. With ``autojump_clock`` every timeout of the hub
(stop window, kill grace, start timeout, lifetime) passes in no real time.

What the runner does is a :class:`Script`: by default it behaves as the real
runners do (PING, waits for PONG, PANG, health every second, STOP runs the stop
handler then exits 0, KILL and SIGTERM exit 0, SIGKILL ends it at once); fields
make it ignore STOP, KILL or SIGTERM, keep alive, crash before or after its
handshake, never read its control channel, and ``body`` runs sequence code
(:func:`exits`, :func:`emits`, :func:`writes`, or any coroutine function).

Fake pids are above Linux's largest pid, so a stray ``os.kill`` of one reaches nothing.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

from agent.config import HubConfig
from agent.instances.instance import Instance
from agent.runtimes.base import LaunchSpec
from agent.sequences.package import PackageInfo
from agent.sequences.store import Sequence
from spacehub.protocol import runner as proto

PIPE_BYTES = 64 * 1024
#: Above /proc/sys/kernel/pid_max's highest possible value (2**22).
_PIDS = itertools.count(10_000_000)

Body = Callable[["FakeRunner"], Awaitable[int | None]]


# ------------------------------------------------------------------ pipes
class _PipeState:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer = bytearray()
        self.write_closed = False
        self.read_closed = False
        self.changed = trio.lowlevel.ParkingLot()


class PipeSendStream(trio.abc.SendStream):
    def __init__(self, state: _PipeState) -> None:
        self._state = state
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        view = memoryview(bytes(data))
        state = self._state
        while True:
            if self._closed:
                raise trio.ClosedResourceError("pipe closed")
            if state.read_closed:
                raise trio.BrokenResourceError("reader closed the pipe")
            if not view:
                return
            room = state.capacity - len(state.buffer)
            if room > 0:
                state.buffer += view[:room]
                view = view[room:]
                state.changed.unpark_all()
            else:
                await state.changed.park()

    async def wait_send_all_might_not_block(self) -> None:
        while len(self._state.buffer) >= self._state.capacity and not self._state.read_closed:
            await self._state.changed.park()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        self._closed = True
        self._state.write_closed = True
        self._state.changed.unpark_all()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


class PipeReceiveStream(trio.abc.ReceiveStream):
    def __init__(self, state: _PipeState) -> None:
        self._state = state
        self._closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        state = self._state
        while True:
            if self._closed:
                raise trio.ClosedResourceError("pipe closed")
            if state.buffer:
                size = len(state.buffer) if max_bytes is None else max_bytes
                chunk = bytes(state.buffer[:size])
                del state.buffer[:size]
                state.changed.unpark_all()
                return chunk
            if state.write_closed:
                return b""
            await state.changed.park()

    def close(self) -> None:
        self._closed = True
        self._state.read_closed = True
        self._state.buffer.clear()
        self._state.changed.unpark_all()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


class Pipe:
    """A one-way bounded byte pipe: ``send`` end and ``receive`` end."""

    def __init__(self, capacity: int = PIPE_BYTES) -> None:
        state = _PipeState(capacity)
        self.send = PipeSendStream(state)
        self.receive = PipeReceiveStream(state)


# ------------------------------------------------------------------ scripts
@dataclass
class Script:
    """What one fake runner does. The defaults behave as the real runners do."""

    #: send PING at all (False: never handshakes)
    handshake: bool = True
    handshake_delay: float = 0.0
    #: exit with this code before the handshake (after writing ``stderr``)
    exit_before_handshake: int | None = None
    #: written to stderr as soon as the runner starts
    stderr: bytes = b""
    #: PANG declarations
    provides: str | None = None
    requires: str | None = None
    content_type: str | None = None
    #: seconds between health reports (None: never reports)
    health_interval: float | None = 1.0
    healthy: bool = True
    #: on STOP: run the stop handler (``stop_delay`` s) and exit 0, ignore it, or keep alive
    on_stop: Literal["exit", "ignore", "keep-alive"] = "exit"
    stop_delay: float = 0.0
    #: on KILL (the message): exit 0, or ignore it
    on_kill: Literal["exit", "ignore"] = "exit"
    #: on SIGTERM: exit 0 (the runners' handler), die of it (-15), or ignore it
    on_sigterm: Literal["exit", "die", "ignore"] = "exit"
    #: False: never reads its control channel (a stuck runner)
    reads_control: bool = True
    #: events answered: name -> name of the reply, sent with the same message
    replies: dict[str, str] = field(default_factory=dict)
    #: the sequence, run after PONG; a returned code ends the runner with it
    body: Body | None = None


def exits(code: int, *, after: float = 0.0, error: str | None = None, stderr: bytes = b"") -> Body:
    """A sequence that ends after ``after`` s with ``code`` (a negative code: killed
    by that signal); ``error``: the ERROR message the runner sends first."""

    async def body(runner: FakeRunner) -> int:
        await trio.sleep(after)
        if stderr:
            await runner.stderr.send_all(stderr)
        if error is not None:
            await runner.send(proto.Code.ERROR, {"message": error, "exitcode": code})
        return code

    return body


def emits(*events: tuple[str, Any], interval: float = 0.0, then: int | None = None) -> Body:
    """A sequence that emits ``events`` (name, message), ``interval`` s apart."""

    async def body(runner: FakeRunner) -> int | None:
        for name, message in events:
            await trio.sleep(interval)
            await runner.emit(name, message)
        return then

    return body


def writes(output: bytes = b"", stdout: bytes = b"", *, then: int | None = 0) -> Body:
    """A sequence that writes ``output`` and ``stdout``, ends its output, then exits."""

    async def body(runner: FakeRunner) -> int | None:
        await runner.stdout.send_all(stdout)
        await runner.output.send_all(output)
        await runner.output.aclose()
        return then

    return body


# ------------------------------------------------------------------ the runner
class FakeRunner:
    """The runner side: its ends of the eight channels and the protocol."""

    def __init__(self, process: FakeProcess, spec: LaunchSpec, script: Script) -> None:
        self.process = process
        self.spec = spec
        self.script = script
        self.stdin = process.pipes["stdin"].receive
        self.control = process.pipes["control"].receive
        self.input = process.pipes["input"].receive
        self.stdout = process.pipes["stdout"].send
        self.stderr = process.pipes["stderr"].send
        self.monitoring = process.pipes["monitoring"].send
        self.output = process.pipes["output"].send
        self.log = process.pipes["log"].send
        #: every control message received, in order
        self.received: list[proto.Message] = []
        self.stop_requests = 0
        self._reader = proto.MessageReader()

    async def send(self, code: proto.Code, data: dict[str, Any] | None = None) -> None:
        await self.monitoring.send_all(proto.encode(proto.Message(code, data or {})))

    async def emit(self, name: str, message: Any) -> None:
        await self.send(proto.Code.EVENT, {"eventName": name, "message": message})

    async def next_control(self) -> proto.Message | None:
        """The next control message; None once the hub closed the channel."""
        while True:
            message = self._reader.next_message()
            if message is not None:
                self.received.append(message)
                return message
            if self._reader.eof:
                return None
            self._reader.receive_data(await self.control.receive_some(PIPE_BYTES))

    async def read_input(self) -> bytes:
        """The whole input channel (preamble included) until the hub ends it."""
        data = bytearray()
        while chunk := await self.input.receive_some(PIPE_BYTES):
            data += chunk
        return bytes(data)

    def exit(self, code: int) -> None:
        self.process._exit(code)

    async def main(self) -> None:
        script = self.script
        if script.stderr:
            await self.stderr.send_all(script.stderr)
        if script.exit_before_handshake is not None:
            self.exit(script.exit_before_handshake)
            return
        if not script.handshake:
            await trio.sleep_forever()
        await trio.sleep(script.handshake_delay)
        await self.send(proto.Code.PING, {"id": self.spec.instance_id, "pid": self.process.pid, "created": 0})
        if not await self._wait_pong():
            return
        async with trio.open_nursery() as nursery:
            if script.health_interval is not None:
                nursery.start_soon(self._report_health, script.health_interval)
            if script.reads_control:
                nursery.start_soon(self._control_loop, nursery)
            if script.provides is not None or script.requires is not None:
                pang: dict[str, Any] = {}
                if script.provides is not None:
                    pang["provides"] = script.provides
                if script.requires is not None:
                    pang["requires"] = script.requires
                if script.content_type is not None:
                    pang["contentType"] = script.content_type
                await self.send(proto.Code.PANG, pang)
            if script.body is not None:
                code = await script.body(self)
                if code is not None:
                    if code == 0:
                        await self.send(proto.Code.SEQUENCE_COMPLETED)
                    self.exit(code)

    async def _wait_pong(self) -> bool:
        """Before PONG the real runners obey KILL and STOP at once."""
        while (message := await self.next_control()) is not None:
            if message.code is proto.Code.PONG:
                return True
            if message.code is proto.Code.KILL:
                break
            if message.code is proto.Code.STOP:
                await self.send(proto.Code.SEQUENCE_STOPPED)
                break
        self.exit(0)
        return False

    async def _report_health(self, interval: float) -> None:
        while True:
            await self.send(proto.Code.MONITORING, {"healthy": self.script.healthy})
            await trio.sleep(interval)

    async def _control_loop(self, nursery: trio.Nursery) -> None:
        script = self.script
        while (message := await self.next_control()) is not None:
            if message.code is proto.Code.EVENT:
                name = message.data.get("eventName")
                if name in script.replies:
                    await self.emit(script.replies[name], message.data.get("message"))
            elif message.code is proto.Code.STOP:
                self.stop_requests += 1
                if script.on_stop == "exit":
                    nursery.start_soon(self._stop_handler)
                elif script.on_stop == "keep-alive" and message.data.get("canCallKeepalive"):
                    await self.send(proto.Code.ALIVE, {"keepAlive": 5000})
            elif message.code is proto.Code.KILL and script.on_kill == "exit":
                self.exit(0)
        self.exit(0)  # the hub went away

    async def _stop_handler(self) -> None:
        await trio.sleep(self.script.stop_delay)
        await self.send(proto.Code.SEQUENCE_STOPPED)
        self.exit(0)


# ------------------------------------------------------------------ the process
class FakeProcess:
    """What ``spawn`` returns: the hub's ends of the channels, wait and signals."""

    def __init__(self, spec: LaunchSpec, script: Script) -> None:
        self.pid = next(_PIDS)
        self.pipes = {name: Pipe() for name in _CHANNELS}
        self.stdin: trio.abc.SendStream = self.pipes["stdin"].send
        self.control: trio.abc.SendStream = self.pipes["control"].send
        self.input: trio.abc.SendStream = self.pipes["input"].send
        self.stdout: trio.abc.ReceiveStream = self.pipes["stdout"].receive
        self.stderr: trio.abc.ReceiveStream = self.pipes["stderr"].receive
        self.monitoring: trio.abc.ReceiveStream = self.pipes["monitoring"].receive
        self.output: trio.abc.ReceiveStream = self.pipes["output"].receive
        self.log: trio.abc.ReceiveStream = self.pipes["log"].receive
        self.runner = FakeRunner(self, spec, script)
        #: (time, signal, alive then) of every signal_group call
        self.signals: list[tuple[float, signal.Signals, bool]] = []
        self.exited_at: float | None = None
        self._returncode: int | None = None
        self._exited = trio.Event()
        self._scope = trio.CancelScope()

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def alive(self) -> bool:
        return self._returncode is None

    def signals_while_alive(self) -> list[tuple[float, signal.Signals]]:
        return [(at, sig) for at, sig, alive in self.signals if alive]

    async def wait(self) -> int:
        await self._exited.wait()
        assert self._returncode is not None
        return self._returncode

    def signal_group(self, sig: signal.Signals) -> None:
        self.signals.append((trio.current_time(), sig, self.alive))
        if not self.alive:
            return
        if sig is signal.SIGKILL:
            self._exit(-signal.SIGKILL)
        elif sig is signal.SIGTERM:
            action = self.runner.script.on_sigterm
            if action == "exit":
                self._exit(0)
            elif action == "die":
                self._exit(-signal.SIGTERM)

    async def detach(self) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for stream in (self.stdin, self.control, self.input):
            await trio.aclose_forcefully(stream)
        for receive in (self.stdout, self.stderr, self.monitoring, self.output, self.log):
            await trio.aclose_forcefully(receive)

    async def _live(self) -> None:
        broken = False
        with self._scope:
            try:
                await self.runner.main()
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                # Our own ends closed as we exited, or the hub closed its end.
                broken = True
            if broken and self.alive:
                await trio.sleep_forever()  # a runner on a broken pipe: the hub kills it

    def _exit(self, code: int) -> None:
        """The process ends: the kernel closes the runner's ends of every pipe."""
        if not self.alive:
            return
        self._returncode = code
        self.exited_at = trio.current_time()
        runner = self.runner
        for end in (runner.stdin, runner.control, runner.input):
            end.close()
        for send_end in (runner.stdout, runner.stderr, runner.monitoring, runner.output, runner.log):
            send_end.close()
        self._scope.cancel()
        self._exited.set()


_CHANNELS = ("stdin", "stdout", "stderr", "control", "monitoring", "input", "output", "log")


class FakeRuntime:
    """Runs each fake runner as a task in ``nursery``; ``scripts`` by instance id,
    else ``default``. ``spawn_error``: make the next spawn fail with it."""

    name = "fake"

    def __init__(self, nursery: trio.Nursery, default: Script | None = None) -> None:
        self._nursery = nursery
        self.default = default or Script()
        self.scripts: dict[str, Script] = {}
        self.processes: dict[str, FakeProcess] = {}
        self.spawn_error: OSError | None = None
        self.specs: list[LaunchSpec] = []

    async def spawn(self, spec: LaunchSpec) -> FakeProcess:
        await trio.lowlevel.checkpoint()
        self.specs.append(spec)
        if self.spawn_error is not None:
            error, self.spawn_error = self.spawn_error, None
            raise error
        process = FakeProcess(spec, self.scripts.get(spec.instance_id, self.default))
        self.processes[spec.instance_id] = process
        self._nursery.start_soon(process._live)
        return process

    async def adopt(self, instance_id: str, state_dir: Path, limits: dict[str, object]) -> FakeProcess:
        raise OSError("fake runners end with their test")


# ------------------------------------------------------------------ hub-side helpers
def make_config(root: Path, **options: Any) -> HubConfig:
    """A hub config under ``root`` with the default timings unless ``options`` say."""
    return HubConfig(data_dir=root, sequences_root=root / "sequences", **options)


def make_sequence(root: Path, sequence_id: str = "fake-seq") -> Sequence:
    package = PackageInfo(name="fake", version="1.0.0", main="main.py", engines={}, language="py")
    return Sequence(
        id=sequence_id, directory=root, package=package, created="2024-01-01T00:00:00.000Z", package_size=0
    )


def make_instance(
    runtime: FakeRuntime, config: HubConfig, sequence: Sequence, instance_id: str = "inst-1", **options: Any
) -> Instance:
    """An Instance launched the way the supervisor launches one, minus the argv."""

    def launch(instance: Instance) -> LaunchSpec:
        return LaunchSpec(
            instance_id=instance.id,
            argv=["fake-runner"],
            env={},
            cwd=config.sequences_root / ".instances" / instance.id,  # never created: nothing to remove
            package_dir=sequence.directory,
            state_dir=config.sequences_root / ".state" / instance.id,  # no state dir given: unused
        )

    return Instance(
        instance_id=instance_id,
        sequence=sequence,
        app_config=options.pop("app_config", {}),
        args=options.pop("args", []),
        runtime=runtime,
        config=config,
        launch=launch,
        **options,
    )
