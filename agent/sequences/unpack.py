"""Safe, streaming extraction of an uploaded sequence package (a ``.tar.gz``).

Synchronous on purpose: the store runs :func:`unpack_package` in a worker thread.

The archive comes from the network, so nothing in it is trusted:

* it is read once, front to back (tar's stream mode), never with random access,
  never through a shell and never with ``TarFile.extractall``;
* only regular files and directories are created, each checked against the
  destination; links, devices, FIFOs and sparse files are refused;
* every size is bounded (:class:`UnpackLimits`), both as declared in the headers
  and as actually produced while writing, so a decompression bomb is stopped
  early rather than noticed afterwards;
* on any failure the destination directory is removed whole.

The gzip layer is decoded here (``zlib``) rather than by ``tarfile``'s ``r|gz``
mode: ``tarfile`` reads a pax or GNU long-name header's payload into memory in one
piece, whatever size the header declares, so a few kilobytes of compressed zeros
could make it allocate gigabytes before any of our checks ran. Decoding the gzip
stream ourselves puts every decompressed byte under the limits, lets us bound the
bytes ``tarfile`` may read for one member's headers, and also verifies the gzip
CRC, which ``tarfile``'s stream mode never does.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Final, NoReturn, Self

from agent import limits as _limits
from agent.errors import ArchiveInvalid, ArchiveTooLarge

__all__ = ["DEFAULT_UNPACK_LIMITS", "UnpackLimits", "UnpackStats", "unpack_package"]

#: Most decompressed bytes ``tarfile`` may read while parsing one member's headers
#: (its ustar block plus any pax / GNU long-name extension blocks, plus tarfile's
#: read-ahead of one 10 KiB record). Real headers are well under 4 KiB even with a
#: 1 KiB path; the bound only exists so that a header cannot declare a huge payload
#: that tarfile would then buffer whole.
MAX_MEMBER_HEADER_BYTES: Final = 256 * _limits.KiB

#: After tar's end-of-archive marker the rest of the gzip stream is read so its
#: CRC can be checked; tar pads archives to a 10 KiB record (more with a large
#: blocking factor), so this much is drained at most. Past it the check is skipped
#: rather than failed: the archive's content is complete at that point.
MAX_TRAILER_BYTES: Final = 1 * _limits.MiB

_GZIP_MAGIC: Final = b"\x1f\x8b"
#: zlib's window-bits value meaning "a gzip wrapper with a 32 KiB window": zlib then
#: parses the gzip header and checks the CRC-32 and length in the trailer itself.
_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS
# tarfile's HeaderError subclasses are real but undocumented, so typeshed omits
# them; _CheckedTarInfo needs to tell them apart.
_EOFHeaderError: Final[type[tarfile.HeaderError]] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_EmptyHeaderError: Final[type[tarfile.HeaderError]] = tarfile.EmptyHeaderError  # type: ignore[attr-defined]
_BadHeaderErrors: Final[tuple[type[tarfile.HeaderError], ...]] = (
    tarfile.TruncatedHeaderError,  # type: ignore[attr-defined]
    tarfile.InvalidHeaderError,  # type: ignore[attr-defined]
)
#: Longest member name quoted in an error message.
_MAX_QUOTED_NAME: Final = 200


@dataclass(frozen=True, slots=True)
class UnpackLimits:
    """Bounds applied to one package; the defaults come from :mod:`agent.limits`."""

    max_compressed_bytes: int = _limits.MAX_PACKAGE_COMPRESSED_BYTES
    max_uncompressed_bytes: int = _limits.MAX_PACKAGE_UNCOMPRESSED_BYTES
    max_members: int = _limits.MAX_PACKAGE_MEMBERS
    max_ratio: int = _limits.MAX_PACKAGE_COMPRESSION_RATIO
    ratio_floor_bytes: int = _limits.RATIO_CHECK_FLOOR_BYTES
    max_path_length: int = _limits.MAX_MEMBER_PATH_LENGTH
    max_name_length: int = _limits.MAX_MEMBER_NAME_LENGTH


#: ``UnpackLimits()``, shared as the default argument (a module constant rather than
#: a call in the signature, which ruff's B008 rightly dislikes).
DEFAULT_UNPACK_LIMITS: Final = UnpackLimits()


@dataclass(frozen=True, slots=True)
class UnpackStats:
    """What one extraction produced."""

    members: int  # archive members seen (files, directories and the "./" entry)
    uncompressed_bytes: int  # bytes written to regular files
    compressed_bytes: int  # bytes of the archive file consumed


def unpack_package(
    archive: os.PathLike[str] | str,
    dest: os.PathLike[str] | str,
    limits: UnpackLimits = DEFAULT_UNPACK_LIMITS,
    *,
    check_cancelled: Callable[[], object] | None = None,
) -> UnpackStats:
    """Extract the gzip-compressed tar ``archive`` into the new directory ``dest``.

    ``dest`` must not exist (``FileExistsError`` otherwise, and it is left alone);
    it is created with mode 0o755. On any failure, including an exception raised by
    ``check_cancelled`` (called between members and between written chunks, e.g.
    ``trio.from_thread.check_cancelled``), ``dest`` is removed before the exception
    propagates, so nothing partial is ever left behind.

    Raises :class:`ArchiveInvalid` (400) for anything that is not a well-formed,
    safe tar.gz and :class:`ArchiveTooLarge` (413) when a limit is exceeded.
    Whether ``dest/package.json`` exists is for the caller to check.
    """
    size = os.stat(archive).st_size
    if size > limits.max_compressed_bytes:
        raise ArchiveTooLarge(
            f"package is {size} bytes; the largest accepted is {limits.max_compressed_bytes} bytes"
        )
    # mkdir fails if dest exists, which is what keeps the cleanup below from ever
    # deleting a directory this call did not create.
    os.mkdir(dest, 0o755)
    try:
        # mkdir's mode is filtered by the umask; the package's modes must not be.
        os.chmod(dest, 0o755)
        with open(archive, "rb") as raw:
            return _Extractor(raw, os.fspath(dest), limits, check_cancelled).run()
    except BaseException:
        # Cleanup must not replace the error being reported, hence ignore_errors;
        # anything rmtree cannot remove here could not have been created by us.
        shutil.rmtree(dest, ignore_errors=True)
        raise


class _GzipReader:
    """A read-only file object over the decompressed content of a gzip file.

    It is what ``tarfile`` reads from, so every decompressed byte passes through
    :meth:`read`, where the size, ratio and per-header limits are applied. Handles
    multi-member gzip files and zero padding after the last member, as gzip(1) does.
    """

    def __init__(self, raw: BinaryIO, limits: UnpackLimits) -> None:
        self._raw = raw
        self._limits = limits
        self._decomp: zlib._Decompress | None = None
        self._pending = b""  # compressed bytes read from raw and not yet consumed by zlib
        self._raw_read = 0
        self._gzip_members = 0
        self._started = False
        self.produced = 0  # decompressed bytes handed out so far
        # While set (by _Extractor around tarfile's header parsing): the value of
        # `produced` past which tarfile is reading too much for one member's headers.
        self.header_deadline: int | None = None

    @property
    def consumed(self) -> int:
        """Bytes of the compressed file zlib has consumed so far."""
        return self._raw_read - len(self._pending)

    # --- the file-object interface tarfile uses ---------------------------------

    def read(self, size: int = -1, /) -> bytes:
        if size == 0:
            return b""
        want = size if size > 0 else _limits.STREAM_CHUNK_BYTES
        if not self._started:
            self._check_magic()
        while True:
            if self._decomp is None and not self._next_gzip_member():
                return b""
            assert self._decomp is not None
            if not self._pending:
                chunk = self._read_raw()
                if not chunk:
                    raise ArchiveInvalid("archive is truncated or corrupt: the compressed data ends early")
                self._pending = chunk
            try:
                out = self._decomp.decompress(self._pending, want)
            except zlib.error as exc:
                self._fail_zlib(exc)
            if self._decomp.eof:
                # The rest of the input belongs to whatever follows this gzip member.
                self._pending = self._decomp.unused_data
                self._decomp = None
            else:
                self._pending = self._decomp.unconsumed_tail
            if out:
                self._account(len(out))
                return out

    def write(self, data: bytes, /) -> NoReturn:
        raise OSError("read-only stream")

    def tell(self) -> int:
        return self.produced

    def seek(self, pos: int, /) -> NoReturn:
        # tarfile's stream mode never seeks the underlying object; refusing makes
        # sure no random access can sneak in.
        raise OSError("stream is not seekable")

    def close(self) -> None:
        # The raw file belongs to the caller, which closes it.
        pass

    # --- helpers ------------------------------------------------------------------

    def drain(self, limit: int) -> None:
        """Read and drop up to ``limit`` more bytes, so zlib checks the gzip trailer."""
        left = limit
        while left > 0:
            chunk = self.read(min(left, _limits.STREAM_CHUNK_BYTES))
            if not chunk:
                return
            left -= len(chunk)

    def _read_raw(self) -> bytes:
        chunk = self._raw.read(_limits.STREAM_CHUNK_BYTES)
        self._raw_read += len(chunk)
        # The size was checked before opening; this covers a file that grows
        # while it is read.
        if self._raw_read > self._limits.max_compressed_bytes:
            raise ArchiveTooLarge(
                f"package is larger than {self._limits.max_compressed_bytes} bytes compressed"
            )
        return chunk

    def _check_magic(self) -> None:
        self._started = True
        while len(self._pending) < len(_GZIP_MAGIC):
            chunk = self._read_raw()
            if not chunk:
                break
            self._pending += chunk
        if not self._pending:
            raise ArchiveInvalid("archive is empty")
        if not self._pending.startswith(_GZIP_MAGIC):
            raise ArchiveInvalid("not a gzip-compressed tar archive")

    def _next_gzip_member(self) -> bool:
        """Start decoding the next gzip member; False at the clean end of the file."""
        while True:
            if self._gzip_members:
                # gzip(1) accepts zero bytes after the last member (tape padding).
                self._pending = self._pending.lstrip(b"\x00")
            if self._pending:
                break
            chunk = self._read_raw()
            if not chunk:
                return False
            self._pending = chunk
        self._decomp = zlib.decompressobj(_GZIP_WBITS)
        self._gzip_members += 1
        return True

    def _fail_zlib(self, exc: zlib.error) -> NoReturn:
        # The magic bytes were right (checked first), so whatever zlib dislikes
        # (a bad header field, bad data, a CRC or length mismatch) is damage.
        raise ArchiveInvalid(f"archive is truncated or corrupt: {exc}") from None

    def _account(self, count: int) -> None:
        self.produced += count
        if self.header_deadline is not None and self.produced > self.header_deadline:
            raise ArchiveInvalid(
                f"archive has a tar header (pax or GNU long name) larger than {MAX_MEMBER_HEADER_BYTES} bytes"
            )
        _check_ratio(self.produced, self.consumed, self._limits)


def _check_ratio(uncompressed: int, compressed: int, limits: UnpackLimits) -> None:
    # Small archives compress far better than max_ratio (tar pads every member to
    # 512 bytes), so the ratio only means something past the floor.
    if uncompressed > limits.ratio_floor_bytes and uncompressed > limits.max_ratio * max(compressed, 1):
        raise ArchiveTooLarge(
            f"compression ratio is suspicious: {uncompressed} bytes unpacked from {compressed} compressed "
            f"bytes is more than {limits.max_ratio}:1; refusing a possible decompression bomb"
        )


class _CheckedTarInfo(tarfile.TarInfo):
    """TarInfo whose header parsing does not treat a damaged header as the end.

    ``TarFile.next`` quietly ends the archive on a bad checksum or a short header
    block anywhere but at offset 0, which would accept a damaged package as a
    shorter one. Raising a non-HeaderError from here makes tarfile pass it on.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        first = tarfile_.fileobj.tell() == 0
        try:
            return super().fromtarfile(tarfile_)
        except _EOFHeaderError:
            raise  # a zero block: the regular end-of-archive marker
        except _EmptyHeaderError:
            if first:
                raise ArchiveInvalid("archive is empty") from None
            # The data ends on a header boundary without the end-of-archive marker;
            # every member was complete, and several tar writers omit the marker.
            raise
        except _BadHeaderErrors as exc:
            if first:
                raise ArchiveInvalid(
                    f"not a gzip-compressed tar archive: the content is not a tar archive ({exc})"
                ) from None
            raise ArchiveInvalid(f"archive is truncated or corrupt: {exc}") from None


class _Extractor:
    """One extraction: walks the members in order and creates them under ``dest``."""

    def __init__(
        self,
        raw: BinaryIO,
        dest: str,
        limits: UnpackLimits,
        check_cancelled: Callable[[], object] | None,
    ) -> None:
        self._reader = _GzipReader(raw, limits)
        self._dest = dest
        self._dest_real = os.path.realpath(dest)
        self._limits = limits
        self._check_cancelled = check_cancelled
        self._members = 0
        self._written = 0
        # What each extracted path (as a tuple of components) is: True for a
        # directory, False for a file. The tree is ours alone while we build it, so
        # this is the truth about it and saves probing the filesystem per member.
        self._kinds: dict[tuple[str, ...], bool] = {}

    def run(self) -> UnpackStats:
        try:
            self._extract_all()
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise ArchiveInvalid(f"archive is truncated or corrupt: {exc}") from None
        except RecursionError:
            # tarfile recurses once per chained extension header.
            raise ArchiveInvalid("archive is corrupt: too many chained tar extension headers") from None
        return UnpackStats(
            members=self._members,
            uncompressed_bytes=self._written,
            compressed_bytes=self._reader.consumed,
        )

    def _extract_all(self) -> None:
        reader = self._reader
        # TarFile reads the first header while opening, so the header bound already
        # applies to open().
        reader.header_deadline = reader.produced + MAX_MEMBER_HEADER_BYTES
        with tarfile.open(fileobj=reader, mode="r|", tarinfo=_CheckedTarInfo) as tar:
            while True:
                reader.header_deadline = reader.produced + MAX_MEMBER_HEADER_BYTES
                member = tar.next()
                reader.header_deadline = None
                if member is None:
                    break
                self._extract(tar, member)
        if self._members == 0:
            raise ArchiveInvalid("archive is empty")
        reader.drain(MAX_TRAILER_BYTES)

    def _extract(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        if self._check_cancelled is not None:
            self._check_cancelled()
        self._members += 1
        if self._members > self._limits.max_members:
            raise ArchiveTooLarge(f"archive has more than {self._limits.max_members} members")
        parts = self._parts(member.name)
        if member.isdir():
            self._make_dirs(parts, member.name)
        elif member.isfile():  # regular file (tarfile counts sparse files here too)
            if member.issparse():
                raise ArchiveInvalid(f"member {_quote(member.name)} is a sparse file; not allowed")
            self._write_file(tar, member, parts)
        elif member.issym():
            raise ArchiveInvalid(f"member {_quote(member.name)} is a symbolic link; links are not allowed")
        elif member.islnk():
            raise ArchiveInvalid(f"member {_quote(member.name)} is a hard link; links are not allowed")
        elif member.isdev():
            raise ArchiveInvalid(
                f"member {_quote(member.name)} is a device or FIFO; only files and directories are allowed"
            )
        else:
            raise ArchiveInvalid(
                f"member {_quote(member.name)} has unsupported type {member.type!r}; "
                "only files and directories are allowed"
            )

    def _parts(self, name: str) -> tuple[str, ...]:
        """Validate a member name and split it into path components."""
        if "\x00" in name:
            raise ArchiveInvalid(f"member name {_quote(name)} contains a NUL character")
        if "\\" in name:
            # Harmless on POSIX, but a separator on Windows: a package moved there
            # (or inspected there) must not turn "a\\..\\..\\x" into a way out.
            raise ArchiveInvalid(f"member name {_quote(name)} contains a backslash")
        if name.startswith("/"):
            raise ArchiveInvalid(f"member {_quote(name)} has an absolute path")
        # Empty and "." components are dropped: this normalises the "./" prefix the
        # original CLI writes ("./package.json") and "a//b" alike.
        parts = tuple(part for part in name.split("/") if part not in ("", "."))
        if ".." in parts:
            raise ArchiveInvalid(f"member {_quote(name)} has a '..' path component")
        # Lengths in bytes, as the filesystem counts them (names may be non-ASCII).
        if len(os.fsencode("/".join(parts))) > self._limits.max_path_length:
            raise ArchiveInvalid(
                f"member {_quote(name)} has a path longer than {self._limits.max_path_length} bytes"
            )
        for part in parts:
            if len(os.fsencode(part)) > self._limits.max_name_length:
                raise ArchiveInvalid(
                    f"member {_quote(name)} has a path component longer than "
                    f"{self._limits.max_name_length} bytes"
                )
        return parts

    def _path(self, parts: tuple[str, ...], name: str) -> str:
        path = os.path.join(self._dest, *parts)
        # Belt and braces: names are already free of "..", "/" prefixes and links,
        # but the final word on "inside dest" is the resolved path of the parent.
        parent_real = os.path.realpath(os.path.dirname(path))
        if parent_real != self._dest_real and not parent_real.startswith(self._dest_real + os.sep):
            raise ArchiveInvalid(f"member {_quote(name)} resolves outside the package directory")
        return path

    def _make_dirs(self, parts: tuple[str, ...], name: str) -> None:
        """Create the directory ``parts`` and any missing parents, all 0o755."""
        for depth in range(1, len(parts) + 1):
            prefix = parts[:depth]
            kind = self._kinds.get(prefix)
            if kind is True:
                continue
            if kind is False:
                raise ArchiveInvalid(
                    f"member {_quote(name)} needs {_quote('/'.join(prefix))} to be a directory, "
                    "but an earlier member is a file there"
                )
            path = self._path(prefix, name)
            os.mkdir(path, 0o755)
            # A directory is always 0o755 whatever the archive says: we must be
            # able to write into it now and delete it later.
            os.chmod(path, 0o755)
            self._kinds[prefix] = True

    def _write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        name = member.name
        if not parts:
            raise ArchiveInvalid(f"member {_quote(name)} is a file without a name")
        if member.size < 0:
            # Possible with tar's base-256 number encoding; tarfile would then
            # compute the next header's offset backwards.
            raise ArchiveInvalid(f"member {_quote(name)} has a negative size")
        limit = self._limits.max_uncompressed_bytes
        if member.size > limit or self._written + member.size > limit:
            raise ArchiveTooLarge(
                f"member {_quote(name)} ({member.size} bytes) takes the package past {limit} bytes unpacked"
            )
        self._make_dirs(parts[:-1], name)
        kind = self._kinds.get(parts)
        path = self._path(parts, name)
        if kind is True:
            raise ArchiveInvalid(
                f"member {_quote(name)} is a file, but an earlier member made it a directory"
            )
        if kind is False:
            # Tar semantics: a later member with the same name replaces the earlier.
            os.unlink(path)
        source = tar.extractfile(member)
        if source is None:  # pragma: no cover - tarfile returns a reader for every regular file
            raise ArchiveInvalid(f"member {_quote(name)} cannot be read")
        # Keep the executable bits (scripts, bundled binaries) but never
        # setuid/setgid/sticky or group/other write; the owner can always read and
        # write, so the hub can replace and delete the package.
        mode = (member.mode & 0o755) | 0o600
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        self._kinds[parts] = False
        with os.fdopen(fd, "wb") as out:
            while True:
                if self._check_cancelled is not None:
                    self._check_cancelled()
                chunk = source.read(_limits.STREAM_CHUNK_BYTES)
                if not chunk:
                    break
                # Declared sizes were checked above; these checks hold even if the
                # header lied, and they run as the data comes, not afterwards.
                self._written += len(chunk)
                if self._written > limit:
                    raise ArchiveTooLarge(f"package is larger than {limit} bytes unpacked")
                _check_ratio(self._written, self._reader.consumed, self._limits)
                out.write(chunk)
            os.fchmod(out.fileno(), mode)


def _quote(name: str) -> str:
    """A member name fit for an error message: repr'd, and cut if very long."""
    if len(name) > _MAX_QUOTED_NAME:
        return repr(name[:_MAX_QUOTED_NAME]) + "..."
    return repr(name)
