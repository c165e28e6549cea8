"""The subprocess runtime: each runner is a bare child process in its own session.

The runner's channels are OS pipes placed on fixed descriptors (0-7, see
``spacehub.protocol.runner``), so every channel has its own kernel buffer and
back-pressure: a sequence flooding stdout fills only the stdout pipe. The child
is a session leader (``start_new_session``), so one ``killpg`` reaches everything
it started.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from collections.abc import Callable
from typing import Final

import trio

from spacehub.protocol import runner as proto

from .base import LaunchSpec, RunnerProcess

#: Pipe capacity asked for the bulk channels (Linux F_SETPIPE_SZ); larger pipes
#: mean fewer wake-ups per megabyte. Falls back silently to the default 64 KiB
#: where the system limit is lower.
BULK_PIPE_BYTES: Final = 1024 * 1024
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)

# (child fd, direction seen from the hub): "w" = hub writes, "r" = hub reads.
_CHANNELS: Final = (
    ("stdin", proto.FD_STDIN, "w"),
    ("stdout", proto.FD_STDOUT, "r"),
    ("stderr", proto.FD_STDERR, "r"),
    ("control", proto.FD_CONTROL, "w"),
    ("monitoring", proto.FD_MONITORING, "r"),
    ("input", proto.FD_INPUT, "w"),
    ("output", proto.FD_OUTPUT, "r"),
    ("log", proto.FD_LOG, "r"),
)
_BULK: Final = frozenset({"stdin", "stdout", "input", "output"})


def _grow_pipe(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, BULK_PIPE_BYTES)


def _child_fd_setup(child_fds: dict[int, int]) -> Callable[[], None]:
    """preexec_fn that moves the child's pipe ends onto their fixed numbers.

    Runs between fork and exec. Sources are first duplicated above every target
    so that no dup2 overwrites a source still needed.
    """
    targets = sorted(child_fds)

    def setup() -> None:
        high = [fcntl.fcntl(child_fds[t], fcntl.F_DUPFD, 64) for t in targets]
        for target, source in zip(targets, high, strict=True):
            os.dup2(source, target)  # dup2 leaves the target inheritable
            os.close(source)

    return setup


class ProcessRunner:
    """A runner started by :class:`ProcessRuntime`."""

    def __init__(self, process: trio.Process, streams: dict[str, trio.lowlevel.FdStream]) -> None:
        self._process = process
        self.pid = process.pid
        self._streams = streams
        self.stdin: trio.abc.SendStream = streams["stdin"]
        self.stdout: trio.abc.ReceiveStream = streams["stdout"]
        self.stderr: trio.abc.ReceiveStream = streams["stderr"]
        self.control: trio.abc.SendStream = streams["control"]
        self.monitoring: trio.abc.ReceiveStream = streams["monitoring"]
        self.input: trio.abc.SendStream = streams["input"]
        self.output: trio.abc.ReceiveStream = streams["output"]
        self.log: trio.abc.ReceiveStream = streams["log"]

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def wait(self) -> int:
        return await self._process.wait()

    def signal_group(self, sig: signal.Signals) -> None:
        # The group outlives its leader while children remain, and its id cannot be
        # reused as a pid while it exists, so signalling after the leader exited
        # still reaches only this instance's stragglers.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def aclose(self) -> None:
        for stream in self._streams.values():
            with contextlib.suppress(trio.ClosedResourceError, OSError):
                await stream.aclose()


class ProcessRuntime:
    name = "process"

    async def spawn(self, spec: LaunchSpec) -> RunnerProcess:
        hub_ends: dict[str, int] = {}
        child_ends: dict[int, int] = {}
        try:
            for name, child_fd, direction in _CHANNELS:
                read_end, write_end = os.pipe()
                hub_end, child_end = (write_end, read_end) if direction == "w" else (read_end, write_end)
                hub_ends[name] = hub_end
                child_ends[child_fd] = child_end
                if name in _BULK:
                    _grow_pipe(hub_end)
            process = await trio.lowlevel.open_process(
                spec.argv,
                env=spec.env,
                cwd=spec.cwd,
                start_new_session=True,
                close_fds=True,
                pass_fds=tuple(fd for fd in sorted(child_ends) if fd > 2),
                preexec_fn=_child_fd_setup(child_ends),
            )
        except BaseException:
            for fd in [*hub_ends.values(), *child_ends.values()]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        for fd in child_ends.values():
            os.close(fd)
        streams = {name: trio.lowlevel.FdStream(fd) for name, fd in hub_ends.items()}
        return ProcessRunner(process, streams)
