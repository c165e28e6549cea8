"""The subprocess runtime: each runner is a bare child process in its own session.

The runner's channels are OS pipes placed on fixed descriptors (0-7, see
``spacehub.protocol.runner`` and :mod:`.pipes`), so every channel has its own
kernel buffer and back-pressure. The child is a session leader
(``start_new_session``), so one ``killpg`` reaches everything it started.
"""

from __future__ import annotations

import contextlib
import os
import signal

import trio

from .base import LaunchSpec, RunnerProcess
from .pipes import ChannelStreams, open_with_channels


class ProcessRunner(ChannelStreams):
    """A runner started by :class:`ProcessRuntime`."""

    def __init__(self, process: trio.Process, channels: ChannelStreams) -> None:
        super().__init__(channels._streams)
        self._process = process
        self.pid = process.pid

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


class ProcessRuntime:
    name = "process"

    async def spawn(self, spec: LaunchSpec) -> RunnerProcess:
        process, channels = await open_with_channels(spec.argv, env=spec.env, cwd=spec.cwd)
        return ProcessRunner(process, channels)
