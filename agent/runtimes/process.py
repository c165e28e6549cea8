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
from functools import partial

import trio

from .base import LaunchSpec, RunnerProcess
from .cgroups import MEMORY_LIMIT_REASON, CgroupLimiter, InstanceGroup, InstanceLimits, join_in_child
from .pipes import ChannelStreams, open_with_channels


class ProcessRunner(ChannelStreams):
    """A runner started by :class:`ProcessRuntime`."""

    def __init__(
        self, process: trio.Process, channels: ChannelStreams, group: InstanceGroup | None = None
    ) -> None:
        super().__init__(channels._streams)
        self._process = process
        self._group = group
        self.pid = process.pid

    @property
    def exit_reason(self) -> str | None:
        """Why the runner ended when its runtime knows better than its exit code."""
        if self._group is not None and self._group.oom_killed():
            return MEMORY_LIMIT_REASON
        return None

    async def aclose(self) -> None:
        await super().aclose()
        if self._group is not None:
            self._group.remove()

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
    """Bare child processes; a start's ``limits`` are enforced through ``limiter``."""

    name = "process"

    def __init__(self, limiter: CgroupLimiter | None = None) -> None:
        self.limiter = limiter or CgroupLimiter(0, {})

    async def spawn(self, spec: LaunchSpec) -> RunnerProcess:
        group = self.limiter.make(spec.instance_id, InstanceLimits.from_request(spec.limits))
        try:
            process, channels = await open_with_channels(
                spec.argv, env=spec.env, cwd=spec.cwd, child_setup=partial(join_in_child, group)
            )
        except BaseException:
            if group is not None:
                group.remove()
            raise
        return ProcessRunner(process, channels, group)
