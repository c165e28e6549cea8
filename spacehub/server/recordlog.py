"""An append-only log on disk in segment files, trimmed from the front: the spools of
Space-wide topics (the hub's outbound spool, the manager's topic log).

Theory of operation
-------------------
Offsets are byte positions that never restart; the files are segments named by the
offset of their first byte (``00000000000000262144.seg``), so the log's extent is
known from the directory listing alone. :meth:`RecordLog.append` writes at the end
(a new segment every :attr:`segment_bytes`); :meth:`RecordLog.trim` deletes the
segments every reader has passed, whole. Writes go to the page cache and are not
synced: a daemon killed (``kill -9``, a crash, an upgrade) loses nothing; a power
loss may lose the last seconds, as it does every process's output.

A record is written with one ``pwrite``; a log whose last segment ends inside a
record (a disk that filled) is cut back to its last whole record by its owner with
:meth:`RecordLog.truncate`.

:class:`OffsetFile` keeps one offset (8 bytes, rewritten in place): how far a
reader has got.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Final

__all__ = ["OffsetFile", "RecordLog", "find_segments"]

#: Digits of a segment's offset in its name (sorted as text = sorted by offset).
_OFFSET_DIGITS: Final = 20
_SUFFIX: Final = ".seg"
_OFFSET: Final = struct.Struct("<Q")


def find_segments(directory: Path, offset_of: Callable[[str], int | None]) -> list[tuple[int, int]]:
    """``(offset, size)`` of the segment files in ``directory``, oldest first (``offset_of``
    reads a file's offset from its name, None for other files). Segments are contiguous;
    after a gap (a disk, not a crash, can make one) what came before it is deleted."""
    found: list[tuple[int, int, str]] = []
    with contextlib.suppress(FileNotFoundError):
        for item in os.scandir(directory):
            offset = offset_of(item.name)
            if offset is not None:
                found.append((offset, item.stat().st_size, item.name))
    found.sort()
    kept: list[tuple[int, int, str]] = []
    for offset, size, name in found:
        if kept and offset != kept[-1][0] + kept[-1][1]:
            for _offset, _size, old in kept:
                (directory / old).unlink(missing_ok=True)
            kept.clear()
        kept.append((offset, size, name))
    return [(offset, size) for offset, size, _name in kept]


def _offset_in_name(name: str) -> int | None:
    stem = name[: -len(_SUFFIX)]
    return int(stem) if name.endswith(_SUFFIX) and stem.isdigit() else None


class RecordLog:
    """Segments under ``directory``; see the module docstring."""

    def __init__(self, directory: Path, segment_bytes: int) -> None:
        if segment_bytes <= 0:
            raise ValueError("segment_bytes must be positive")
        self.directory = directory
        self.segment_bytes = segment_bytes
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        #: (offset, size) of every segment, oldest first; the last one is written
        self._segments: list[tuple[int, int]] = []
        self._fd = -1
        #: the segment read last, kept open for the next read (readers go forward)
        self._read_fd = -1
        self._read_segment = -1
        self.end = 0
        self._load()

    def _path(self, offset: int) -> Path:
        return self.directory / f"{offset:0{_OFFSET_DIGITS}d}{_SUFFIX}"

    def _load(self) -> None:
        self._segments = find_segments(self.directory, _offset_in_name)
        if self._segments:
            self.end = self._segments[-1][0] + self._segments[-1][1]

    @property
    def start(self) -> int:
        """The oldest offset still on disk."""
        return self._segments[0][0] if self._segments else self.end

    def begin_at(self, offset: int) -> None:
        """Make an empty log start at ``offset`` (a log whose files were lost goes on
        with the offsets its readers know)."""
        if self._segments:
            raise RuntimeError("only an empty log can be moved")
        self.end = offset

    def append(self, *parts: bytes | bytearray | memoryview) -> int:
        """Write ``parts`` one after the other at the end, in one system call (no copy to
        join them); the new end."""
        total = sum(len(part) for part in parts)
        if not total:
            return self.end
        if self._fd < 0 or self._segments[-1][1] >= self.segment_bytes:
            self._rotate()
        offset, size = self._segments[-1]
        written = os.pwritev(self._fd, parts, size)
        while written < total:  # a short write (a signal, a nearly full disk): the rest
            rest = b"".join(bytes(part) for part in parts)[written:]
            written += os.pwrite(self._fd, rest, size + written)
        self._segments[-1] = (offset, size + total)
        self.end += total
        return self.end

    def _rotate(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self._segments or self._segments[-1][1] >= self.segment_bytes:
            self._segments.append((self.end, 0))
        offset, _size = self._segments[-1]
        self._fd = os.open(self._path(offset), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def read(self, begin: int, limit: int) -> bytes:
        """Up to ``limit`` bytes from ``begin`` (fewer at a segment's end; ``b""`` at the
        log's end). ``begin`` must be on disk."""
        if begin < self.start or begin > self.end:
            raise ValueError(f"offset {begin} is not in the log (it holds {self.start}-{self.end})")
        for offset, size in self._segments:
            if offset <= begin < offset + size:
                if self._read_segment != offset:
                    self._close_reader()
                    self._read_fd = os.open(self._path(offset), os.O_RDONLY | os.O_CLOEXEC)
                    self._read_segment = offset
                return os.pread(self._read_fd, min(limit, offset + size - begin), begin - offset)
        return b""

    def _close_reader(self) -> None:
        if self._read_fd >= 0:
            os.close(self._read_fd)
        self._read_fd, self._read_segment = -1, -1

    def trim(self, upto: int) -> None:
        """Delete the segments that end at or before ``upto`` (never the one written)."""
        while len(self._segments) > 1 and self._segments[0][0] + self._segments[0][1] <= upto:
            old, _size = self._segments.pop(0)
            if old == self._read_segment:
                self._close_reader()
            self._path(old).unlink(missing_ok=True)
        if len(self._segments) == 1 and self.end <= upto and self._segments[0][1] >= self.segment_bytes:
            # The only segment is full and read: the next append starts a new one.
            old, _size = self._segments.pop(0)
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._close_reader()
            self._path(old).unlink(missing_ok=True)

    def truncate(self, end: int) -> None:
        """Cut the log back to ``end`` (within its last segment): a torn last record."""
        if not self._segments or not self._segments[-1][0] <= end <= self.end:
            raise ValueError(f"cannot cut the log back to {end}")
        offset, _size = self._segments[-1]
        os.truncate(self._path(offset), end - offset)
        self._segments[-1] = (offset, end - offset)
        self.end = end

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._close_reader()


class OffsetFile:
    """One offset on disk, rewritten in place (8 bytes, one ``pwrite``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self.value: int | None = None
        with contextlib.suppress(FileNotFoundError):
            data = path.read_bytes()
            if len(data) == _OFFSET.size:
                self.value = _OFFSET.unpack(data)[0]

    def set(self, value: int) -> None:
        if value == self.value:
            return
        if self._fd < 0:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.pwrite(self._fd, _OFFSET.pack(value), 0)
        self.value = value

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        self.value = None
