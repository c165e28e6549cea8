"""The runner's eight channels as OS pipes on fixed descriptors (0-7).

Shared by both runtimes: the holder (agent/runners/holder.py) makes the pipes and
puts them on the runner's fds 0-7; under Podman the runner is ``podman run -i
--preserve-fds=5``, which hands the same descriptors on into the container. Each
channel is its own pipe, so each has its own kernel buffer and back-pressure: a
sequence flooding stdout fills only the stdout pipe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Final

import trio

from spacehub.protocol import runner as proto

#: Pipe capacity asked for the bulk channels (Linux F_SETPIPE_SZ); larger pipes
#: mean fewer wake-ups per megabyte, and are what a runner may write while no hub
#: reads. Falls back silently to the default 64 KiB where the system limit is lower.
BULK_PIPE_BYTES: Final = 1024 * 1024
#: OOM score adjustment of every runner: above the hub's (which systemd lowers).
INSTANCE_OOM_SCORE_ADJ: Final = 200

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


class ChannelStreams:
    """The hub's ends of the eight channels, as the runtime interface names them."""

    def __init__(self, streams: Mapping[str, Any]) -> None:
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
