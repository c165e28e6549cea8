"""The hub's on-disk sequence store.

Layout under the sequences root::

    <root>/<id>/                 the unpacked package
    <root>/<id>.sequence.json    our metadata: {"id", "created", "packageSize", "config"}
    <root>/.incoming/            uploads in progress, removed packages on their way out,
                                 metadata being written; emptied at every start

A sequence exists on disk once both its directory and its metadata file are in
place: the directory is renamed into the root first, then the metadata is written
atomically (temporary file, fsync, rename). Every rename happens inside one
filesystem (``.incoming`` is inside the root), so each step is atomic, and a crash
leaves at worst a directory without metadata (adopted by ``--identify-existing``)
or files in ``.incoming`` (deleted at the next start).

Slow file work (unpacking, deleting trees, fsync) runs in worker threads; the
in-memory index is changed only on the Trio thread, right after the disk change
it mirrors, with no checkpoint in between.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import os
import pathlib
import re
import shutil
import stat
import uuid
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import trio

from agent import limits as _limits
from agent.errors import (
    ArchiveInvalid,
    ArchiveTooLarge,
    BadRequest,
    Conflict,
    HubError,
    PackageInvalid,
    SequenceNotFound,
)
from agent.sequences.package import PackageInfo, parse_package_json
from agent.sequences.unpack import DEFAULT_UNPACK_LIMITS, UnpackLimits, unpack_package
from spacehub.models import SequenceInfo
from spacehub.server.files import fsync_dir, write_atomic

__all__ = ["Sequence", "SequenceStore", "is_valid_sequence_id"]

METADATA_SUFFIX: Final = ".sequence.json"
INCOMING_DIR: Final = ".incoming"

#: Sequence ids become directory and file names and URL path segments: letters,
#: digits, '_', '-', '.', not starting with '.' (hidden entries such as .incoming
#: are ours). uuid4 strings and the names people give directories both fit.
_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: Leaves room for METADATA_SUFFIX and the .incoming suffixes within NAME_MAX (255).
MAX_SEQUENCE_ID_LENGTH: Final = 200

#: Our metadata holds a copy of the package.json fields, re-encoded; JSON escapes
#: can make that several times the source, hence the generous multiple.
_MAX_METADATA_BYTES: Final = 8 * _limits.MAX_PACKAGE_JSON_BYTES

_NOT_AT_ROOT: Final = "package.json not found at the archive root"


def is_valid_sequence_id(value: str) -> bool:
    """Whether ``value`` can name a sequence (see ``_ID_PATTERN``)."""
    return len(value) <= MAX_SEQUENCE_ID_LENGTH and _ID_PATTERN.fullmatch(value) is not None


def _iso_utc(moment: datetime) -> str:
    """ISO-8601 in UTC with milliseconds and a "Z", as JavaScript's toISOString()."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Sequence:
    """One stored sequence."""

    id: str
    directory: pathlib.Path  # absolute
    package: PackageInfo
    created: str  # ISO-8601 UTC, e.g. "2024-05-01T12:00:00.000Z"
    package_size: int  # bytes of the uploaded tar.gz (0 for adopted directories)
    # Ids of this sequence's instances; maintained by the hub's supervisor, the
    # store only carries the list (and keeps the same list object across replace()).
    instances: list[str] = field(default_factory=list)
    location: str = ""  # the hub id, reported as "location"; set by the store

    def config(self) -> dict[str, Any]:
        """The SequenceConfig of spec §1.5 (process adapter)."""
        return {
            "type": "process",
            "entrypointPath": self.package.main,
            "sequenceDir": str(self.directory),
            "id": self.id,
            "packageSize": self.package_size,
            **self.package.config_fields(),
        }

    def info(self) -> SequenceInfo:
        """The sequence as the API lists it."""
        info: SequenceInfo = {
            "id": self.id,
            "config": self.config(),
            "location": self.location,
            "instances": list(self.instances),
            "created": self.created,
        }
        if self.package.name:
            # Before "created", as the original lists it.
            info = {**info, "name": self.package.name, "created": self.created}
        return info


class _BrokenMetadata(Exception):
    """A metadata file that cannot be loaded; the message says why."""


class SequenceStore:
    """Sequences on disk under ``root``, indexed in memory.

    Call :meth:`load` once before anything else. Not thread-safe: use it from the
    Trio thread only (it hands slow work to worker threads itself).
    """

    def set_location(self, location: str) -> None:
        """Report ``location`` (the hub's id) for every sequence from now on."""
        self.location = location
        for sequence in self._sequences.values():
            sequence.location = location

    def __init__(
        self,
        root: os.PathLike[str] | str,
        *,
        location: str,
        limits: UnpackLimits = DEFAULT_UNPACK_LIMITS,
    ) -> None:
        # Absolute but not resolved: the configured path is what operators see in
        # "sequenceDir", even if part of it is a symlink.
        self.root = pathlib.Path(os.path.abspath(root))
        self.location = location
        self.limits = limits
        self._incoming = self.root / INCOMING_DIR
        self._sequences: dict[str, Sequence] = {}
        # Ids with an add/replace/remove in progress: a second change to the same
        # id while one is between its awaits would race for the same names on disk.
        self._busy: set[str] = set()

    # --- start-up ------------------------------------------------------------------

    def load(self, *, identify_existing: bool) -> builtins.list[str]:
        """Load the stored sequences; return warnings about what was skipped and why.

        Synchronous: called once at start, before the hub serves requests. With
        ``identify_existing`` (``sth -E``), every other sub-directory of the root
        holding a valid package.json is adopted under its directory name.
        """
        _make_dir(self.root, parents=True)
        self._clear_incoming()
        warnings: list[str] = []
        loaded: list[Sequence] = []
        entries = sorted(os.scandir(self.root), key=lambda entry: entry.name)
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(METADATA_SUFFIX):
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            seq_id = entry.name[: -len(METADATA_SUFFIX)]
            try:
                loaded.append(self._load_stored(seq_id))
            except _BrokenMetadata as exc:
                warnings.append(f"skipped sequence {seq_id}: {exc}")
            except HubError as exc:
                warnings.append(f"skipped sequence {seq_id}: {exc.message}")
            except OSError as exc:
                warnings.append(f"skipped sequence {seq_id}: {_os_reason(exc)}")
        if identify_existing:
            known = {sequence.id for sequence in loaded}
            for entry in entries:
                if entry.name.startswith(".") or entry.name in known:
                    continue
                if entry.is_symlink():
                    # remove() must be able to move and delete what it owns; a link
                    # into some other tree is not ours to delete.
                    if entry.is_dir():
                        warnings.append(f"not adopting {entry.name}: it is a symbolic link")
                    continue
                if not entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    loaded.append(self._adopt(entry.name))
                except HubError as exc:
                    warnings.append(f"not adopting directory {entry.name}: {exc.message}")
                except OSError as exc:
                    warnings.append(f"not adopting directory {entry.name}: {_os_reason(exc)}")
        # Oldest first; sort is stable, so equal times keep the name order.
        loaded.sort(key=lambda sequence: sequence.created)
        self._sequences = {sequence.id: sequence for sequence in loaded}
        return warnings

    def _clear_incoming(self) -> None:
        # Anything here is from a run that ended mid-operation.
        if self._incoming.is_symlink() or self._incoming.is_file():
            self._incoming.unlink()
        elif self._incoming.exists():
            shutil.rmtree(self._incoming)
        # Private: partly written uploads are nobody else's business.
        _make_dir(self._incoming, mode=0o700)

    def _load_stored(self, seq_id: str) -> Sequence:
        if not is_valid_sequence_id(seq_id):
            raise _BrokenMetadata("the file name does not hold a valid sequence id")
        raw = _read_bounded(self.root / f"{seq_id}{METADATA_SUFFIX}", _MAX_METADATA_BYTES)
        if raw is None:
            raise _BrokenMetadata(f"its metadata file is larger than {_MAX_METADATA_BYTES} bytes")
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _BrokenMetadata("its metadata file is not valid JSON") from None
        if not isinstance(meta, dict):
            raise _BrokenMetadata("its metadata file does not hold a JSON object")
        if meta.get("id") != seq_id:
            raise _BrokenMetadata("the id in its metadata file does not match the file name")
        created = meta.get("created")
        if not isinstance(created, str) or not _is_iso_time(created):
            raise _BrokenMetadata("its metadata has no valid 'created' time")
        size = meta.get("packageSize")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _BrokenMetadata("its metadata has no valid 'packageSize'")
        directory = self.root / seq_id
        if directory.is_symlink() or not directory.is_dir():
            raise _BrokenMetadata(f"its directory {directory} is missing")
        package = parse_package_json(_read_package_json(directory, missing="package.json not found"))
        return Sequence(
            id=seq_id,
            directory=directory,
            package=package,
            created=created,
            package_size=size,
            location=self.location,
        )

    def _adopt(self, name: str) -> Sequence:
        if not is_valid_sequence_id(name):
            raise BadRequest("the directory name is not a valid sequence id")
        directory = self.root / name
        package = parse_package_json(_read_package_json(directory, missing="it has no package.json"))
        # The directory's time is the best guess at when the package arrived.
        created = _iso_utc(datetime.fromtimestamp(directory.stat().st_mtime, UTC))
        sequence = Sequence(
            id=name,
            directory=directory,
            package=package,
            created=created,
            # The size of an upload that never happened here is unknown.
            package_size=0,
            location=self.location,
        )
        self._write_metadata(sequence)
        return sequence

    # --- queries -------------------------------------------------------------------

    def get(self, id: str) -> Sequence:
        try:
            return self._sequences[id]
        except KeyError:
            raise SequenceNotFound(f"Sequence {id} not found") from None

    def list(self) -> builtins.list[Sequence]:
        """All sequences, oldest first."""
        return sorted(self._sequences.values(), key=lambda sequence: sequence.created)

    # --- changes -------------------------------------------------------------------

    async def add(self, body: AsyncIterable[bytes], *, sequence_id: str | None = None) -> Sequence:
        """Store the package streamed in ``body`` (a tar.gz) as a new sequence.

        ``sequence_id`` defaults to a new uuid4. On any failure, cancellation
        included, nothing of the upload is left on disk.
        """
        if sequence_id is None:
            seq_id = str(uuid.uuid4())
        elif not is_valid_sequence_id(sequence_id):
            raise BadRequest(f"invalid sequence id {sequence_id[:MAX_SEQUENCE_ID_LENGTH]!r}")
        else:
            seq_id = sequence_id
        if seq_id in self._sequences:
            raise Conflict(f"Sequence {seq_id} already exists")
        self._claim(seq_id)
        spool, workdir = self._scratch_paths(seq_id)
        try:
            # Leftovers of a sequence that failed to load would be silently merged
            # with (or replaced by) the rename below.
            if os.path.lexists(self.root / seq_id):
                raise Conflict(f"Sequence {seq_id}: a directory of that name is already in the store")
            size = await self._spool(body, spool)
            package = await trio.to_thread.run_sync(self._unpack, spool, workdir)
            sequence = Sequence(
                id=seq_id,
                directory=self.root / seq_id,
                package=package,
                created=_iso_utc(datetime.now(UTC)),
                package_size=size,
                location=self.location,
            )
            # A thread started without abandon_on_cancel always runs to the end and
            # its result is delivered, so the disk and the index cannot disagree.
            await trio.to_thread.run_sync(self._commit_new, workdir, sequence)
            self._sequences[seq_id] = sequence
            return sequence
        finally:
            self._busy.discard(seq_id)
            await self._discard(spool, workdir)

    async def replace(self, id: str, body: AsyncIterable[bytes]) -> Sequence:
        """Replace the package of sequence ``id`` with the one streamed in ``body``.

        The old package stays untouched until the new one has been unpacked and
        validated; the swap is two renames. The caller checks for instances first.
        """
        old = self.get(id)
        self._claim(id)
        spool, workdir = self._scratch_paths(id)
        trash = workdir.with_name(workdir.name + ".old")
        try:
            size = await self._spool(body, spool)
            package = await trio.to_thread.run_sync(self._unpack, spool, workdir)
            sequence = Sequence(
                id=id,
                directory=old.directory,
                package=package,
                # The sequence (and its place in the list) is the same, only its
                # contents change.
                created=old.created,
                package_size=size,
                instances=old.instances,
                location=self.location,
            )
            await trio.to_thread.run_sync(self._commit_replace, workdir, trash, sequence)
            self._sequences[id] = sequence
            return sequence
        finally:
            self._busy.discard(id)
            await self._discard(spool, workdir, trash)

    async def remove(self, id: str) -> None:
        """Delete sequence ``id`` (directory and metadata). The caller checks instances."""
        sequence = self.get(id)
        self._claim(id)
        trash = self._incoming / f"{id}.{uuid.uuid4().hex}.removed"
        try:
            await trio.to_thread.run_sync(self._detach, sequence, trash)
            del self._sequences[id]
        finally:
            self._busy.discard(id)
            await self._discard(trash)

    # --- helpers (Trio thread) --------------------------------------------------------

    def _claim(self, seq_id: str) -> None:
        if seq_id in self._busy:
            raise Conflict(f"Sequence {seq_id} is being changed by another request")
        self._busy.add(seq_id)

    def _scratch_paths(self, seq_id: str) -> tuple[pathlib.Path, pathlib.Path]:
        # A fresh token per operation: a retry after a failure never meets the
        # previous attempt's files, even if their cleanup failed.
        base = f"{seq_id}.{uuid.uuid4().hex}"
        return self._incoming / f"{base}.tar.gz", self._incoming / base

    async def _spool(self, body: AsyncIterable[bytes], path: pathlib.Path) -> int:
        """Write ``body`` to ``path``; return its size. Bounded by max_compressed_bytes."""
        size = 0
        async with await trio.open_file(path, "xb") as spool:
            async for chunk in body:
                if not chunk:
                    continue
                size += len(chunk)
                if size > self.limits.max_compressed_bytes:
                    # Stop reading here: the rest of the body is not wanted.
                    raise ArchiveTooLarge(
                        f"package is larger than {self.limits.max_compressed_bytes} bytes compressed"
                    )
                await spool.write(chunk)
        if size == 0:
            raise ArchiveInvalid("empty body: send the package as a tar.gz")
        return size

    async def _discard(self, *paths: pathlib.Path) -> None:
        # Shielded: this runs in `finally` blocks, also when the operation was
        # cancelled, and must finish for "nothing left on disk" to hold.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_remove_paths, paths)

    # --- helpers (worker threads) -------------------------------------------------------

    def _unpack(self, spool: pathlib.Path, workdir: pathlib.Path) -> PackageInfo:
        # check_cancelled lets a cancelled upload stop between chunks instead of
        # unpacking up to a gigabyte nobody waits for.
        unpack_package(spool, workdir, self.limits, check_cancelled=trio.from_thread.check_cancelled)
        # The upload is on disk twice now; the compressed copy is no longer needed.
        spool.unlink(missing_ok=True)
        return parse_package_json(_read_package_json(workdir, missing=_NOT_AT_ROOT))

    def _commit_new(self, workdir: pathlib.Path, sequence: Sequence) -> None:
        os.rename(workdir, sequence.directory)
        try:
            self._write_metadata(sequence)
        except BaseException:
            # Without metadata the directory would be an orphan: take it back out.
            os.rename(sequence.directory, workdir)
            raise

    def _commit_replace(self, workdir: pathlib.Path, trash: pathlib.Path, sequence: Sequence) -> None:
        target = sequence.directory
        try:
            os.rename(target, trash)
            had_old = True
        except FileNotFoundError:
            # Someone deleted the directory by hand; the new package still goes in.
            had_old = False
        try:
            os.rename(workdir, target)
        except BaseException:
            if had_old:
                os.rename(trash, target)
            raise
        try:
            self._write_metadata(sequence)
        except BaseException:
            # Put the old package back: the old metadata file was not replaced.
            os.rename(target, workdir)
            if had_old:
                os.rename(trash, target)
            raise

    def _detach(self, sequence: Sequence, trash: pathlib.Path) -> None:
        # The directory goes first: a crash after this leaves metadata without a
        # directory, which load() skips, rather than a package that -E would adopt
        # again although its removal was requested.
        try:
            os.rename(sequence.directory, trash)
            moved = True
        except FileNotFoundError:
            moved = False
        try:
            (self.root / f"{sequence.id}{METADATA_SUFFIX}").unlink(missing_ok=True)
        except BaseException:
            if moved:
                os.rename(trash, sequence.directory)
            raise
        fsync_dir(self.root)

    def _write_metadata(self, sequence: Sequence) -> None:
        """Write ``<root>/<id>.sequence.json`` atomically (tmp file, fsync, rename)."""
        document = {
            "id": sequence.id,
            "created": sequence.created,
            "packageSize": sequence.package_size,
            "config": sequence.config(),
        }
        data = json.dumps(document, indent=2, ensure_ascii=False).encode() + b"\n"
        # The temporary file goes in .incoming: the root's listing is the store's index.
        write_atomic(self.root / f"{sequence.id}{METADATA_SUFFIX}", data, 0o644, temp_dir=self._incoming)


def _make_dir(path: pathlib.Path, *, mode: int = 0o755, parents: bool = False) -> None:
    if path.is_dir():
        return
    path.mkdir(mode=mode, parents=parents)
    # mkdir's mode is filtered by the umask.
    os.chmod(path, mode)


def _remove_paths(paths: tuple[pathlib.Path, ...]) -> None:
    for path in paths:
        # Errors are dropped: this is cleanup after the operation already succeeded
        # or failed for its own reason, and .incoming is emptied at the next start.
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def _read_bounded(path: pathlib.Path, limit: int) -> bytes | None:
    """Read a regular file of at most ``limit`` bytes; None if it is larger.

    O_NOFOLLOW and O_NONBLOCK: an adopted directory is not ours, and a symlink or
    a FIFO named package.json must neither lead elsewhere nor block the hub.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # Checked on the descriptor (not the name) so nothing can swap the file in
        # between; and before fdopen, which refuses directories with its own error.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PackageInvalid(f"{path.name} is not a regular file")
        source = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with source:
        data = source.read(limit + 1)
    return None if len(data) > limit else data


def _read_package_json(directory: pathlib.Path, *, missing: str) -> bytes:
    """The bytes of ``directory/package.json``, bounded by MAX_PACKAGE_JSON_BYTES."""
    try:
        data = _read_bounded(directory / "package.json", _limits.MAX_PACKAGE_JSON_BYTES)
    except FileNotFoundError:
        raise PackageInvalid(missing) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW refused a symlink
            raise PackageInvalid("package.json is a symbolic link") from None
        raise PackageInvalid(f"package.json cannot be read: {_os_reason(exc)}") from None
    if data is None:
        raise PackageInvalid(f"package.json is larger than {_limits.MAX_PACKAGE_JSON_BYTES} bytes")
    return data


def _is_iso_time(value: str) -> bool:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
