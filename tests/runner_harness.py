"""What the runner tests (Python and Node) share: the child's fd set-up, a reader of
the runner's output fds, and message parsing. The hub is not involved."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from spacehub.protocol.runner import Message, MessageReader

WAIT = 10.0

# Runs in the child before the runner: moves the pipe ends (inherited at fds >= 100, so
# nothing collides) onto fds 3-7, then becomes the runner.
DUP_AND_EXEC = (
    "import os, sys\n"
    "for pair in sys.argv[1].split(','):\n"
    "    source, target = map(int, pair.split(':'))\n"
    "    os.dup2(source, target)\n"
    "    os.close(source)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class Collector(threading.Thread):
    """Reads one of the runner's output fds to its end, keeping everything."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self._fd = fd
        self._data = bytearray()
        self._eof = False
        self._cond = threading.Condition()
        self.start()

    def run(self) -> None:
        try:
            while chunk := os.read(self._fd, 65536):
                with self._cond:
                    self._data += chunk
                    self._cond.notify_all()
        finally:
            os.close(self._fd)
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    @property
    def data(self) -> bytes:
        with self._cond:
            return bytes(self._data)

    def wait_for(self, predicate: Callable[[bytes], bool], what: str, timeout: float = WAIT) -> bytes:
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(bytes(self._data)) or self._eof, timeout)
            data = bytes(self._data)
        if not ok or not predicate(data):
            raise AssertionError(f"timed out or ended waiting for {what}; got {data[-2000:]!r}")
        return data

    def wait_eof(self, timeout: float = WAIT) -> bytes:
        with self._cond:
            if not self._cond.wait_for(lambda: self._eof, timeout):
                raise AssertionError(f"no end of stream; got {bytes(self._data)[-2000:]!r}")
            return bytes(self._data)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def messages(data: bytes) -> list[Message]:
    """The complete message lines in ``data``."""
    reader = MessageReader()
    reader.receive_data(data[: data.rfind(b"\n") + 1])
    return list(reader)
