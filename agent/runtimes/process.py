"""The subprocess runtime: each runner is a bare process, kept by a holder.

The runner's channels are OS pipes placed on fixed descriptors (0-7, see
``spacehub.protocol.runner`` and :mod:`.pipes`), so every channel has its own
kernel buffer and back-pressure. The runner is the child of its holder
(:mod:`agent.runners.holder`), not of the hub, and leads a session of its own, so
one ``killpg`` reaches everything it started and the hub may end and come back
while it runs (:mod:`.held`).
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

from .base import LaunchSpec, RunnerProcess
from .cgroups import MEMORY_LIMIT_REASON, CgroupLimiter, InstanceGroup, InstanceLimits
from .held import HeldRunner, adopt, start_held
from .pipes import ChannelStreams


class ProcessRunner(ChannelStreams):
    """A runner started (or taken back) by :class:`ProcessRuntime`; its channels are
    its holder's."""

    def __init__(self, held: HeldRunner, group: InstanceGroup | None = None) -> None:
        super().__init__(held._streams)
        self._held = held
        self._group = group
        self.pid = held.pid

    @property
    def exit_reason(self) -> str | None:
        """Why the runner ended when its runtime knows better than its exit code."""
        if self._group is not None and self._group.oom_killed():
            return MEMORY_LIMIT_REASON
        return None

    @property
    def ended_at(self) -> str | None:
        return self._held.ended_at

    @property
    def returncode(self) -> int | None:
        return self._held.returncode

    async def wait(self) -> int:
        return await self._held.wait()

    def signal_group(self, sig: signal.Signals) -> None:
        self._held.signal_group(sig)

    async def detach(self) -> None:
        await self._held.detach()

    async def aclose(self) -> None:
        await self._held.aclose()
        if self._group is not None:
            self._group.remove()


class ProcessRuntime:
    """Bare processes; a start's ``limits`` are enforced through ``limiter``."""

    name = "process"
    #: its runners outlive the hub (held by agent/runners/holder.py)
    keeps_instances = True

    def __init__(self, limiter: CgroupLimiter | None = None, python: str | None = None) -> None:
        self.limiter = limiter or CgroupLimiter(0, {})
        self._python = python

    async def spawn(self, spec: LaunchSpec) -> RunnerProcess:
        group = self.limiter.make(spec.instance_id, InstanceLimits.from_request(spec.limits))
        try:
            held = await start_held(
                spec.state_dir,
                argv=spec.argv,
                env=spec.env,
                cwd=spec.cwd,
                cgroup_procs=group.procs_files() if group is not None else [],
                rlimits=list(group.rlimits) if group is not None else [],
            )
        except BaseException:
            if group is not None:
                group.remove()
            raise
        return ProcessRunner(held, group)

    async def adopt(self, instance_id: str, state_dir: Path, limits: dict[str, object]) -> RunnerProcess:
        """Take back the runner a hub before left (:class:`~.held.HolderGone` if none)."""
        group: InstanceGroup | None = None
        with contextlib.suppress(OSError):
            group = self.limiter.make(instance_id, InstanceLimits.from_request(limits))
        return ProcessRunner(await adopt(state_dir), group)
