"""The runner's eight channels as OS pipes on fixed descriptors (0-7).

Shared by every runtime that starts a local program: the bare subprocess runtime
execs the runner itself, the Podman runtime execs ``podman run -i
--preserve-fds=5``, which hands the same descriptors on into the container. Each
channel is its own pipe, so each has its own kernel buffer and back-pressure: a
sequence flooding stdout fills only the stdout pipe.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

import trio

from spacehub.protocol import runner as proto

#: Pipe capacity asked for the bulk channels (Linux F_SETPIPE_SZ); larger pipes
#: mean fewer wake-ups per megabyte. Falls back silently to the default 64 KiB
#: where the system limit is lower.
BULK_PIPE_BYTES: Final = 1024 * 1024
#: OOM score adjustment of every runner: above the hub's (which systemd lowers).
INSTANCE_OOM_SCORE_ADJ: Final = 200
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)

#: (channel, child fd, direction seen from the hub): "w" = hub writes, "r" = hub reads.
CHANNELS: Final = (
    ("stdin", proto.FD_STDIN, "w"),
    ("stdout", proto.FD_STDOUT, "r"),
    ("stderr", proto.FD_STDERR, "r"),
    ("control", proto.FD_CONTROL, "w"),
    ("monitoring", proto.FD_MONITORING, "r"),
    ("input", proto.FD_INPUT, "w"),
    ("output", proto.FD_OUTPUT, "r"),
    ("log", proto.FD_LOG, "r"),
)
#: How many descriptors above stderr the child gets (3..7): podman's --preserve-fds.
EXTRA_FDS: Final = len(CHANNELS) - 3
_BULK: Final = frozenset({"stdin", "stdout", "input", "output"})


def _grow_pipe(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, BULK_PIPE_BYTES)


def _child_fd_setup(child_fds: dict[int, int], also: Callable[[], None] | None = None) -> Callable[[], None]:
    """preexec_fn that moves the child's pipe ends onto their fixed numbers.

    Runs between fork and exec. Sources are first duplicated above every target
    so that no dup2 overwrites a source still needed.
    """
    targets = sorted(child_fds)

    def setup() -> None:
        # The hub runs with a protective OOM score (systemd's OOMScoreAdjust); an
        # instance must be the one the kernel picks first, not share that shield.
        # Raising the score needs no privilege.
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as score:
            score.write(str(INSTANCE_OOM_SCORE_ADJ))
        if also is not None:
            also()  # e.g. join the instance's cgroups before anything runs
        high = [fcntl.fcntl(child_fds[t], fcntl.F_DUPFD, 64) for t in targets]
        for target, source in zip(targets, high, strict=True):
            os.dup2(source, target)  # dup2 leaves the target inheritable
            os.close(source)

    return setup


class ChannelStreams:
    """The hub's ends of the eight channels, as the runtime interface names them."""

    def __init__(self, streams: dict[str, trio.lowlevel.FdStream]) -> None:
        self._streams = streams
        self.stdin: trio.abc.SendStream = streams["stdin"]
        self.stdout: trio.abc.ReceiveStream = streams["stdout"]
        self.stderr: trio.abc.ReceiveStream = streams["stderr"]
        self.control: trio.abc.SendStream = streams["control"]
        self.monitoring: trio.abc.ReceiveStream = streams["monitoring"]
        self.input: trio.abc.SendStream = streams["input"]
        self.output: trio.abc.ReceiveStream = streams["output"]
        self.log: trio.abc.ReceiveStream = streams["log"]

    async def aclose(self) -> None:
        for stream in self._streams.values():
            with contextlib.suppress(trio.ClosedResourceError, OSError):
                await stream.aclose()


async def open_with_channels(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | str,
    child_setup: Callable[[], None] | None = None,
) -> tuple[trio.Process, ChannelStreams]:
    """Start ``argv`` in its own session with the eight channel pipes on fds 0-7."""
    hub_ends: dict[str, int] = {}
    child_ends: dict[int, int] = {}
    try:
        for name, child_fd, direction in CHANNELS:
            read_end, write_end = os.pipe()
            hub_end, child_end = (write_end, read_end) if direction == "w" else (read_end, write_end)
            hub_ends[name] = hub_end
            child_ends[child_fd] = child_end
            if name in _BULK:
                _grow_pipe(hub_end)
        process = await trio.lowlevel.open_process(
            list(argv),
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            pass_fds=tuple(fd for fd in sorted(child_ends) if fd > 2),
            preexec_fn=_child_fd_setup(child_ends, child_setup),
        )
    except BaseException:
        for fd in [*hub_ends.values(), *child_ends.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    for fd in child_ends.values():
        os.close(fd)
    return process, ChannelStreams({name: trio.lowlevel.FdStream(fd) for name, fd in hub_ends.items()})
