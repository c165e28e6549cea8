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
import stat
from pathlib import Path

from .errors import ServerError

__all__ = ["PRIVATE", "UnsafeFile", "fsync_dir", "read_private", "write_atomic"]

#: The mode of files holding secrets: the owner's only.
PRIVATE = 0o600


class UnsafeFile(ServerError):
    """A file holding a secret that group or others may access."""


def read_private(path: Path, limit: int, what: str = "") -> bytes:
    """Up to ``limit`` + 1 bytes of the secret file ``path``, refused (:class:`UnsafeFile`)
    when group or others may access it. ``what`` names the file in the message.

    The mode is checked on the descriptor that is read (``fstat``), not on the name, so a
    swap between the check and the read cannot fool it. ``OSError`` when it cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
        if mode & 0o077:
            raise UnsafeFile(
                f"refusing to use {what or 'the file'} {path}: its mode is {mode:04o}, so group or"
                f" others can access it; run `chmod 600 {path}` (and consider it leaked if others read it)"
            )
        return file.read(limit + 1)


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
