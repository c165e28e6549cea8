"""Files the daemons keep: written whole or not at all, private when they hold secrets.

One writer for every state file (keys, certificates, link state, sequence metadata,
ids): a temporary file in the same directory, created with its final mode (never
briefly readable by others), written and fsynced, renamed over the target, then the
directory fsynced so the rename survives a power cut. A crash leaves the old file or
the new one, never half of one, and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["PRIVATE", "fsync_dir", "write_atomic"]

#: The mode of files holding secrets: the owner's only.
PRIVATE = 0o600


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, temp_dir: Path | None = None) -> None:
    """Replace ``path`` with ``data`` atomically and durably, the file made with ``mode``.

    ``temp_dir`` (same filesystem as ``path``) holds the temporary file instead of
    ``path``'s own directory, for stores whose directory listing means something.
    """
    tmp = (temp_dir or path.parent) / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask did, this is the mode we mean
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable. Best effort: the renames have happened
    either way, and some filesystems refuse fsync on directories."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
