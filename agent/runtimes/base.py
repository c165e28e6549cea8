"""What a runtime gives the hub: a runner process and its eight byte channels.

A runtime (bare subprocess now, Podman later) starts the runner for one Instance
and hands back :class:`RunnerProcess`: the channel streams of
``spacehub.protocol.runner`` (each with its own back-pressure), a way to wait for
the end and a way to signal the whole process group. Everything above this
interface is the same whatever the runtime.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything a runtime needs to start one runner."""

    instance_id: str
    #: the runner program and its arguments, e.g. [python, runner.py]
    argv: list[str]
    #: the environment of the runner (nothing else is inherited)
    env: dict[str, str]
    #: working directory of the runner (the instance's own scratch directory)
    cwd: Path
    #: the unpacked package, read-only for the instance where the runtime can enforce it
    package_dir: Path
    #: the instance's state directory: its holder's launch and exit, its spools
    state_dir: Path
    #: per-instance limits from the start request (memory in MB, ...); runtimes
    #: that cannot enforce one say so in the hub log
    limits: dict[str, object] = field(default_factory=dict)


class RunnerProcess(Protocol):
    """A started runner and its channels (hub side of each pipe)."""

    pid: int
    stdin: trio.abc.SendStream
    control: trio.abc.SendStream
    input: trio.abc.SendStream
    stdout: trio.abc.ReceiveStream
    stderr: trio.abc.ReceiveStream
    monitoring: trio.abc.ReceiveStream
    output: trio.abc.ReceiveStream
    log: trio.abc.ReceiveStream

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int:
        """Wait for the runner to exit; the exit code, negative for a signal."""
        ...

    def signal_group(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the runner's whole process group (no error if gone)."""
        ...

    async def aclose(self) -> None:
        """The runner has ended or is given up: close the hub's ends of every
        channel and let go of everything kept for it."""
        ...

    async def detach(self) -> None:
        """The hub stops, the runner goes on: close the hub's ends only."""
        ...


class Runtime(Protocol):
    name: str

    async def spawn(self, spec: LaunchSpec) -> RunnerProcess: ...

    async def adopt(self, instance_id: str, state_dir: Path, limits: dict[str, object]) -> RunnerProcess:
        """Take back a runner a hub before left running (``HolderGone`` if it is gone)."""
        ...
