"""A runtime for in-process tests of the hub's own behaviour: no processes, only memory streams.

:class:`FakeRuntime` hands the hub a :class:`FakeRunner` whose eight channels are trio memory
streams, and whose "runner" is a task speaking the real runner protocol
(``spacehub.protocol.runner``) as scripted by a :class:`Script`: well-behaved, deaf to STOP,
deaf to SIGTERM, crashing with a code, emitting events. Only the runtime is fake: the
``Instance``, its state table, pumps, timeouts and the supervisor are the real ones, so tests on
``autojump_clock`` check stop timeouts and kill graces in milliseconds.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.testing

from agent.config import HubConfig
from agent.runtimes.base import LaunchSpec
from agent.sequences.package import PackageInfo
from agent.sequences.store import Sequence
from spacehub.protocol import runner as proto


@dataclass
class Script:
    """How the fake runner behaves."""

    #: answers STOP by ending with code 0 (after SEQUENCE_STOPPED)
    obeys_stop: bool = True
    #: ends on SIGTERM (else only SIGKILL ends it)
    obeys_sigterm: bool = True
    #: exits by itself with this code right after the handshake, if not None
    exit_after_start: int | None = None
    #: events it emits right after the handshake: (name, message)
    events: list[tuple[str, Any]] = field(default_factory=list)
    #: handshakes at all (False: never sends PING)
    handshakes: bool = True
    #: sends every event it receives back to the hub, as a sequence with on()/emit() might
    echo_events: bool = False
    #: answers a STOP that allows it with ALIVE (keep-alive) and goes on running
    keeps_alive: bool = False


class FakeRunner:
    """The hub's side of one fake runner (the :class:`~agent.runtimes.base.RunnerProcess` interface)."""

    def __init__(self, script: Script, nursery: trio.Nursery) -> None:
        self.pid = 4242
        self.script = script
        pair = trio.testing.memory_stream_one_way_pair
        self.stdin, self._stdin = pair()
        self.control, self._control = pair()
        self.input, self._input = pair()
        self._stdout, self.stdout = pair()
        self._stderr, self.stderr = pair()
        self._monitoring, self.monitoring = pair()
        self._output, self.output = pair()
        self._log, self.log = pair()
        self._returncode: int | None = None
        self._exited = trio.Event()
        #: signals the hub sent, in order
        self.signals: list[signal.Signals] = []
        #: control messages the runner received, in order
        self.received: list[proto.Message] = []
        self._scope = trio.CancelScope()
        nursery.start_soon(self._run)

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def wait(self) -> int:
        await self._exited.wait()
        assert self._returncode is not None
        return self._returncode

    def signal_group(self, sig: signal.Signals) -> None:
        if self._returncode is not None:
            return
        self.signals.append(sig)
        if sig == signal.SIGKILL or (sig == signal.SIGTERM and self.script.obeys_sigterm):
            self._exit(-int(sig))

    async def aclose(self) -> None:
        for stream in (self.stdin, self.control, self.input):
            await trio.aclose_forcefully(stream)
        for stream in (self.stdout, self.stderr, self.monitoring, self.output, self.log):
            await trio.aclose_forcefully(stream)

    # -- the runner's side -------------------------------------------------------------------------

    def _exit(self, code: int) -> None:
        if self._returncode is None:
            self._returncode = code
            self._scope.cancel()
            self._exited.set()

    async def _send(self, code: proto.Code, data: dict[str, Any]) -> None:
        await self._monitoring.send_all(proto.encode(proto.Message(code, data)))

    async def _run(self) -> None:
        with self._scope:
            try:
                await self._script()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._exit(0)  # the hub closed its ends: a real runner ends too
        # The process is gone: its ends of the pipes close.
        for stream in (self._stdout, self._stderr, self._monitoring, self._output, self._log):
            await trio.aclose_forcefully(stream)

    async def _script(self) -> None:
        script = self.script
        if not script.handshakes:
            await trio.sleep_forever()
        await self._send(proto.Code.PING, {"id": "fake", "pid": self.pid, "created": 0})
        reader = proto.MessageReader(1 << 20)
        pong = await self._next(reader)
        assert pong.code is proto.Code.PONG, pong
        await self._send(proto.Code.PANG, {})
        for name, message in script.events:
            await self._send(proto.Code.EVENT, {"eventName": name, "message": message})
        if script.exit_after_start is not None:
            self._exit(script.exit_after_start)
            return
        while True:
            message = await self._next(reader)
            if (
                message.code is proto.Code.STOP
                and script.keeps_alive
                and message.data.get("canCallKeepalive")
            ):
                await self._send(proto.Code.ALIVE, {"keepAlive": 5000})
                continue
            if message.code is proto.Code.STOP and script.obeys_stop:
                await self._send(proto.Code.SEQUENCE_STOPPED, {})
                self._exit(0)
                return
            if message.code is proto.Code.KILL and script.obeys_sigterm:
                self._exit(0)
                return
            if message.code is proto.Code.EVENT and script.echo_events:
                await self._send(proto.Code.EVENT, message.data)

    async def _next(self, reader: proto.MessageReader) -> proto.Message:
        while True:
            for message in reader:
                self.received.append(message)
                return message
            chunk = await self._control.receive_some(65536)
            if not chunk:
                await trio.sleep_forever()  # the hub closed control: wait for a signal
            reader.receive_data(bytes(chunk))


class FakeRuntime:
    """Starts :class:`FakeRunner` objects in ``nursery`` (the test's), all with ``script``."""

    name = "fake"

    def __init__(self, nursery: trio.Nursery, script: Script | None = None) -> None:
        self._nursery = nursery
        self.script = script or Script()
        self.runners: list[FakeRunner] = []

    async def spawn(self, spec: LaunchSpec) -> FakeRunner:
        runner = FakeRunner(self.script, self._nursery)
        self.runners.append(runner)
        return runner


def hub_config(tmp_path: Path, **options: Any) -> HubConfig:
    """A hub config with the defaults a user gets, sequences under ``tmp_path``."""
    config = HubConfig()
    config.sequences_root = tmp_path / "sequences"
    for name, value in options.items():
        setattr(config, name, value)
    return config


def sequence(tmp_path: Path) -> Sequence:
    package = PackageInfo(name="fake", version="1.0.0", main="main.py", engines={}, language="py")
    return Sequence(id="seq-1", directory=tmp_path / "seq-1", package=package, created="", package_size=0)


def launch_spec(tmp_path: Path) -> Any:
    """The ``launch`` callable an Instance takes: a spec whose work dir does not exist (nothing to
    remove: no worker thread, which the autojump clock would not wait for)."""

    def launch(instance: Any) -> LaunchSpec:
        return LaunchSpec(instance.id, ["fake"], {}, tmp_path / "no-work-dir", tmp_path)

    return launch
