"""What an instance's outbound streams carried lately, on disk, so a hub that ends
mid-stream loses nothing.

Theory of operation
-------------------
The runner's pipes outlive the hub (see :mod:`agent.runners.holder`), so every byte
the hub has not read yet waits in the kernel for the next hub. The bytes at risk are
those the hub *had* read: in its memory on their way to readers. So every chunk read
from ``stdout``, ``stderr`` or ``output`` is appended here before anyone sees it,
and the point up to which every reader has taken the stream (the *mark*) is written
as it moves. A hub that starts again reads back ``[mark, end)`` (what nobody had
taken yet) into the stream, and serves a reader that names an older offset
(``?offset=``) from the older bytes still here.

The files are segments named by the offset of their first byte
(``stdout.000000000000262144``); the oldest is deleted once the newer ones hold
:data:`~agent.limits.INSTANCE_SPOOL_KEEP_BYTES`, so a stream takes at most that
plus one segment and one chunk on disk. Offsets count from the instance's first
byte on that stream and never restart. Writes go to the page cache (no fsync): a
hub killed loses nothing, and a power loss ends the runner too.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Final

from spacehub.server.recordlog import find_segments

from .. import limits

#: Digits of a segment's offset in its name (sorted as text = sorted by offset).
_OFFSET_DIGITS: Final = 20
_MARK: Final = struct.Struct("<Q")
_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class StreamSpool:
    """The latest bytes of one stream, in segment files under ``directory``."""

    def __init__(
        self, directory: Path, name: str, keep: int = limits.INSTANCE_SPOOL_KEEP_BYTES, *, fresh: bool = False
    ) -> None:
        self._directory = directory
        self._name = name
        self._keep = keep
        self._segment_bytes = max(1, keep // limits.INSTANCE_SPOOL_SEGMENTS)
        #: (offset, size) of every segment, oldest first; the last one is written
        self._segments: list[tuple[int, int]] = []
        self._fd = -1
        self._mark_fd = -1
        self.end = 0
        self.mark = 0
        self._finished = False
        if fresh:  # a new run of the instance: its streams begin again at 0
            self._load()
            for offset, _size in self._segments:
                self._path(offset).unlink(missing_ok=True)
            (directory / f"{name}.mark").unlink(missing_ok=True)
            self._segments.clear()
            self.end = self.mark = 0
        else:
            self._load()

    # ------------------------------------------------------------------ files
    def _path(self, offset: int) -> Path:
        return self._directory / f"{self._name}.{offset:0{_OFFSET_DIGITS}d}"

    def _load(self) -> None:
        prefix = f"{self._name}."

        def offset_of(name: str) -> int | None:
            tail = name[len(prefix) :]
            return int(tail) if name.startswith(prefix) and tail.isdigit() else None

        self._segments = find_segments(self._directory, offset_of)
        if self._segments:
            self.end = self._segments[-1][0] + self._segments[-1][1]
        mark_path = self._directory / f"{self._name}.mark"
        with contextlib.suppress(FileNotFoundError):
            data = mark_path.read_bytes()
            if len(data) == _MARK.size:
                self.mark = _MARK.unpack(data)[0]
        self.mark = min(max(self.mark, self.start), self.end)

    @property
    def start(self) -> int:
        """The oldest offset still kept."""
        return self._segments[0][0] if self._segments else self.end

    def read(self, begin: int, end: int) -> bytes:
        """The bytes ``[begin, end)``; ``begin`` must be at least :attr:`start`."""
        if begin < self.start or end > self.end:
            raise ValueError(f"bytes {begin}-{end} are not kept (kept: {self.start}-{self.end})")
        pieces: list[bytes] = []
        for offset, size in self._segments:
            if offset + size <= begin or offset >= end:
                continue
            with open(self._path(offset), "rb") as file:
                file.seek(max(begin - offset, 0))
                pieces.append(file.read(min(end, offset + size) - max(begin, offset)))
        return b"".join(pieces)

    # ------------------------------------------------------------------ writing
    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes the hub has in hand (runtimes whose channels are not pipes)."""
        if not data:
            return
        if self._fd < 0 or self._segments[-1][1] >= self._segment_bytes:
            self._rotate()
        view = memoryview(data)
        offset, size = self._segments[-1]
        written = 0
        while written < len(view):
            written += os.pwrite(self._fd, view[written:], size + written)
        self._segments[-1] = (offset, size + len(data))
        self.end += len(data)

    def splice_from(self, pipe: int, limit: int) -> bytes:
        """Move up to ``limit`` bytes from the pipe ``pipe`` into the spool and return
        them; ``b""`` at the pipe's end; :class:`BlockingIOError` while it is empty.

        ``splice`` takes from the pipe exactly what it wrote to the file, in one
        system call: a hub killed at any instant finds each byte either in the spool
        or still in the pipe, never lost in between (a read() then write() would
        lose what a ``kill -9`` caught in the hub's memory)."""
        if self._fd < 0 or self._segments[-1][1] >= self._segment_bytes:
            self._rotate()
        offset, size = self._segments[-1]
        room = max(1, min(limit, self._segment_bytes - size))
        moved = os.splice(pipe, self._fd, room, offset_dst=size, flags=_SPLICE_FLAGS)
        if not moved:
            return b""
        self._segments[-1] = (offset, size + moved)
        self.end += moved
        return os.pread(self._fd, moved, size)

    def _rotate(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        # Not O_APPEND: splice refuses to write to such a file; writes give their offset.
        self._fd = os.open(self._path(self.end), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not self._segments or self._segments[-1][0] != self.end:
            self._segments.append((self.end, 0))
        # The oldest goes once the others hold what must be kept.
        while len(self._segments) > 1 and self.end - self._segments[1][0] >= self._keep:
            old, _size = self._segments.pop(0)
            self._path(old).unlink(missing_ok=True)

    def set_mark(self, position: int) -> None:
        """Every reader has taken the stream up to ``position``."""
        if position == self.mark or self._finished:
            return
        self.mark = position
        if self._mark_fd < 0:
            self._mark_fd = os.open(
                self._directory / f"{self._name}.mark", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        os.pwrite(self._mark_fd, _MARK.pack(position), 0)

    def close(self) -> None:
        for fd in (self._fd, self._mark_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._mark_fd = -1

    def finish(self) -> None:
        """The stream has ended: nothing more is written, and no hub will take it back
        (an ended instance is not resumed), so the mark no longer matters. Frees the
        descriptors; :meth:`read` still serves ``?offset=``."""
        self._finished = True
        self.close()


class PartialLine:
    """The partial line a line-reading pump holds (monitoring, log), kept on disk so
    the next hub goes on from the middle of the line. Written only when it changes;
    nothing at all without a state directory."""

    def __init__(self, directory: Path | None, name: str) -> None:
        self._path = directory / f"{name}.partial" if directory is not None else None
        self._fd = -1
        self._saved = b""

    def restore(self) -> bytes:
        if self._path is None:
            return b""
        with contextlib.suppress(FileNotFoundError):
            self._saved = self._path.read_bytes()
        return self._saved

    def save(self, pending: bytes | bytearray) -> None:
        if self._path is None or pending == self._saved:
            return
        if self._fd < 0:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        data = bytes(pending)
        os.ftruncate(self._fd, 0)
        if data:
            os.pwrite(self._fd, data, 0)
        self._saved = data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def clear(self) -> None:
        if self._path is not None:
            self._path.unlink(missing_ok=True)


def write_json_atomic(path: Path, value: object) -> None:
    """Replace ``path`` with ``value`` as JSON: whole or not at all, even across a
    power loss (synced before the rename)."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as file:
        json.dump(value, file, separators=(",", ":"))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
