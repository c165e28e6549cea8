"""agent.sequences.unpack: safe streaming extraction of package archives."""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import stat
import tarfile
from collections.abc import Iterable

import pytest

from agent.errors import ArchiveInvalid, ArchiveTooLarge
from agent.sequences.unpack import UnpackLimits, unpack_package

MiB = 1024 * 1024
PACKAGE_JSON = b'{"name": "demo", "version": "1.0.0", "main": "index.js"}'

Entry = tuple[tarfile.TarInfo, bytes | None]


# --- archive builders (also used by test_sequences_store) ----------------------------


def file_entry(name: str, data: bytes = b"", mode: int = 0o644) -> Entry:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def dir_entry(name: str, mode: int = 0o755) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    return info, None


def special_entry(name: str, kind: bytes, linkname: str = "") -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def tar_bytes(entries: Iterable[Entry], *, tar_format: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def tgz_bytes(entries: Iterable[Entry], **kwargs: int) -> bytes:
    return gzip.compress(tar_bytes(entries, **kwargs), compresslevel=1)


def package_entries(prefix: str = "") -> list[Entry]:
    """A small valid package; prefix "./" mimics the original CLI."""
    entries = [
        file_entry(f"{prefix}package.json", PACKAGE_JSON),
        file_entry(f"{prefix}index.js", b"module.exports = async function* () {};\n"),
        dir_entry(f"{prefix}lib"),
        file_entry(f"{prefix}lib/run.sh", b"#!/bin/sh\necho hi\n", mode=0o4755),
        # No directory entries for these parents: they must be created anyway.
        file_entry(f"{prefix}lib/deep/er/data.txt", b"data"),
    ]
    if prefix:
        entries.insert(0, dir_entry(prefix))
    return entries


class _Zeros(io.RawIOBase):
    """`size` zero bytes, produced on demand (a bomb without holding it in memory)."""

    def __init__(self, size: int) -> None:
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self._left)
        buffer[:count] = bytes(count)
        self._left -= count
        return count


@pytest.fixture
def archive(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "package.tar.gz"


@pytest.fixture
def dest(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "out"


def _unpack_bytes(data: bytes, archive: pathlib.Path, dest: pathlib.Path, **limits: int) -> None:
    archive.write_bytes(data)
    unpack_package(archive, dest, UnpackLimits(**limits))


def _mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- good packages ------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["./", ""])
def test_good_package(prefix: str, archive: pathlib.Path, dest: pathlib.Path) -> None:
    archive.write_bytes(tgz_bytes(package_entries(prefix)))
    stats = unpack_package(archive, dest)

    assert (dest / "package.json").read_bytes() == PACKAGE_JSON
    assert (dest / "lib" / "deep" / "er" / "data.txt").read_bytes() == b"data"
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "index.js",
        "lib",
        "lib/deep",
        "lib/deep/er",
        "lib/deep/er/data.txt",
        "lib/run.sh",
        "package.json",
    ]
    # Executable bits kept, setuid stripped; directories 0o755.
    assert _mode(dest / "lib" / "run.sh") == 0o755
    assert _mode(dest / "package.json") == 0o644
    assert _mode(dest) == 0o755
    assert _mode(dest / "lib" / "deep") == 0o755
    assert stats.members == len(package_entries(prefix))
    assert stats.uncompressed_bytes == sum(len(d) for _, d in package_entries(prefix) if d)
    assert stats.compressed_bytes == archive.stat().st_size


def test_modes_are_sanitised(archive: pathlib.Path, dest: pathlib.Path) -> None:
    entries = [
        file_entry("package.json", PACKAGE_JSON, mode=0o444),  # owner must be able to write
        file_entry("setgid", b"x", mode=0o2775),
        file_entry("sticky", b"x", mode=0o1777),
        file_entry("private", b"x", mode=0o000),
        dir_entry("ro", mode=0o500),
        file_entry("ro/inside", b"x"),
    ]
    _unpack_bytes(tgz_bytes(entries), archive, dest)
    assert _mode(dest / "package.json") == 0o644
    assert _mode(dest / "setgid") == 0o755
    assert _mode(dest / "sticky") == 0o755
    assert _mode(dest / "private") == 0o600
    assert _mode(dest / "ro") == 0o755


def test_duplicate_file_later_wins(archive: pathlib.Path, dest: pathlib.Path) -> None:
    entries = [file_entry("a.txt", b"first"), file_entry("./a.txt", b"second", mode=0o755)]
    _unpack_bytes(tgz_bytes(entries), archive, dest)
    assert (dest / "a.txt").read_bytes() == b"second"
    assert _mode(dest / "a.txt") == 0o755


def test_multi_member_gzip_and_zero_padding(archive: pathlib.Path, dest: pathlib.Path) -> None:
    raw = tar_bytes(package_entries())
    half = len(raw) // 2
    # gzip(1) and tar accept concatenated gzip members and zero padding after them.
    _unpack_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]) + bytes(1000), archive, dest)
    assert (dest / "package.json").read_bytes() == PACKAGE_JSON


def test_missing_end_of_archive_marker_is_accepted(archive: pathlib.Path, dest: pathlib.Path) -> None:
    raw = tar_bytes([file_entry("package.json", PACKAGE_JSON)])
    # One header block + one data block; the zero blocks after it are the marker.
    _unpack_bytes(gzip.compress(raw[:1024]), archive, dest)
    assert (dest / "package.json").read_bytes() == PACKAGE_JSON


# --- failures: every one must leave no `dest` behind -----------------------------------


def _assert_rejected(
    error: type[Exception],
    match: str,
    data: bytes,
    archive: pathlib.Path,
    dest: pathlib.Path,
    **limits: int,
) -> None:
    with pytest.raises(error, match=match):
        _unpack_bytes(data, archive, dest, **limits)
    assert not dest.exists()


def test_not_gzip(archive: pathlib.Path, dest: pathlib.Path) -> None:
    _assert_rejected(ArchiveInvalid, "not a gzip-compressed tar archive", b"hello, world", archive, dest)


def test_plain_tar_is_not_gzip(archive: pathlib.Path, dest: pathlib.Path) -> None:
    data = tar_bytes(package_entries())
    _assert_rejected(ArchiveInvalid, "not a gzip-compressed tar archive", data, archive, dest)


@pytest.mark.parametrize("content", [b"hello", b"x" * 5000], ids=["short", "long"])
def test_gzip_of_non_tar(content: bytes, archive: pathlib.Path, dest: pathlib.Path) -> None:
    _assert_rejected(ArchiveInvalid, "not a tar archive", gzip.compress(content), archive, dest)


def test_truncated_archive(archive: pathlib.Path, dest: pathlib.Path) -> None:
    payload = os.urandom(200_000)  # incompressible, so the cut lands inside its data
    data = tgz_bytes([file_entry("package.json", PACKAGE_JSON), file_entry("blob", payload)])
    _assert_rejected(ArchiveInvalid, "truncated or corrupt", data[: len(data) // 2], archive, dest)


def test_truncated_gzip_trailer(archive: pathlib.Path, dest: pathlib.Path) -> None:
    data = tgz_bytes(package_entries())
    _assert_rejected(ArchiveInvalid, "truncated or corrupt", data[:-4], archive, dest)


def test_bad_crc(archive: pathlib.Path, dest: pathlib.Path) -> None:
    data = bytearray(tgz_bytes(package_entries()))
    data[-8] ^= 0xFF  # first byte of the CRC-32 in the gzip trailer
    _assert_rejected(ArchiveInvalid, "truncated or corrupt", bytes(data), archive, dest)


def test_corrupt_header_mid_archive(archive: pathlib.Path, dest: pathlib.Path) -> None:
    raw = bytearray(tar_bytes([file_entry("package.json", PACKAGE_JSON), file_entry("b.txt", b"b")]))
    # The second member's ustar header starts after pax header + header + one data block.
    second = raw.index(b"b.txt", 1024)
    raw[second] ^= 0xFF  # breaks its checksum
    _assert_rejected(ArchiveInvalid, "truncated or corrupt", gzip.compress(bytes(raw)), archive, dest)


@pytest.mark.parametrize(
    "data",
    [b"", gzip.compress(b""), gzip.compress(tar_bytes([]))],
    ids=["empty-file", "empty-gzip", "empty-tar"],
)
def test_empty_archive(data: bytes, archive: pathlib.Path, dest: pathlib.Path) -> None:
    _assert_rejected(ArchiveInvalid, "archive is empty", data, archive, dest)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("../x", r"'\.\.' path component"),
        ("lib/../../x", r"'\.\.' path component"),
        ("./../x", r"'\.\.' path component"),
        ("/etc/x", "absolute path"),
        ("..\\..\\x", "backslash"),
        ("a\x00b", "NUL"),
    ],
)
def test_unsafe_names(name: str, match: str, archive: pathlib.Path, dest: pathlib.Path) -> None:
    evil = file_entry(name, b"evil")
    # A pax "path" record stores the name exactly (a ustar field would end at the NUL).
    evil[0].pax_headers = {"path": name}
    entries = [file_entry("package.json", PACKAGE_JSON), evil]
    _assert_rejected(ArchiveInvalid, match, tgz_bytes(entries), archive, dest)
    assert not (archive.parent / "x").exists()


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (special_entry("link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (special_entry("link", tarfile.SYMTYPE, "package.json"), "symbolic link"),
        (special_entry("hard", tarfile.LNKTYPE, "package.json"), "hard link"),
        (special_entry("fifo", tarfile.FIFOTYPE), "device or FIFO"),
        (special_entry("chr", tarfile.CHRTYPE), "device or FIFO"),
        (special_entry("blk", tarfile.BLKTYPE), "device or FIFO"),
        (special_entry("odd", b"Z"), "unsupported type"),
    ],
    ids=["symlink-out", "symlink-in", "hardlink", "fifo", "chr", "blk", "unknown"],
)
def test_forbidden_member_types(entry: Entry, match: str, archive: pathlib.Path, dest: pathlib.Path) -> None:
    entries = [file_entry("package.json", PACKAGE_JSON), entry]
    _assert_rejected(ArchiveInvalid, match, tgz_bytes(entries), archive, dest)


def test_gnu_sparse_member(archive: pathlib.Path, dest: pathlib.Path) -> None:
    raw = bytearray(tar_bytes([file_entry("sparse", b"")], tar_format=tarfile.GNU_FORMAT))
    _patch_header(raw, 156, 157, tarfile.GNUTYPE_SPARSE)
    _assert_rejected(ArchiveInvalid, "sparse", gzip.compress(bytes(raw)), archive, dest)


def _patch_header(raw: bytearray, start: int, end: int, value: bytes) -> None:
    """Change a field of the first ustar header and recompute its checksum."""
    raw[start:end] = value
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\x00 " % sum(raw[:512])


def test_negative_size(archive: pathlib.Path, dest: pathlib.Path) -> None:
    raw = bytearray(tar_bytes([file_entry("neg", b"")], tar_format=tarfile.GNU_FORMAT))
    _patch_header(raw, 124, 136, b"\xff" * 12)  # base-256 encoding of -1
    _assert_rejected(ArchiveInvalid, "negative size", gzip.compress(bytes(raw)), archive, dest)


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([file_entry("a", b"file"), dir_entry("a")], "earlier member is a file"),
        ([file_entry("a", b"file"), file_entry("a/b", b"x")], "earlier member is a file"),
        ([dir_entry("a"), file_entry("a", b"file")], "made it a directory"),
        ([file_entry("a/b", b"x"), file_entry("a", b"file")], "made it a directory"),
    ],
    ids=["dir-over-file", "file-under-file", "file-over-dir", "file-over-implicit-dir"],
)
def test_file_directory_conflicts(
    entries: list[Entry], match: str, archive: pathlib.Path, dest: pathlib.Path
) -> None:
    _assert_rejected(ArchiveInvalid, match, tgz_bytes(entries), archive, dest)


def test_long_path(archive: pathlib.Path, dest: pathlib.Path) -> None:
    name = "d/" * 520 + "f"  # 1041 bytes, components fine
    _assert_rejected(ArchiveInvalid, "path longer than 1024", tgz_bytes([file_entry(name)]), archive, dest)


def test_long_component(archive: pathlib.Path, dest: pathlib.Path) -> None:
    name = "lib/" + "n" * 256
    _assert_rejected(
        ArchiveInvalid, "component longer than 255", tgz_bytes([file_entry(name)]), archive, dest
    )


def test_long_component_counts_bytes(archive: pathlib.Path, dest: pathlib.Path) -> None:
    name = "\u00e9" * 128  # 128 characters, 256 bytes in UTF-8
    _assert_rejected(
        ArchiveInvalid, "component longer than 255", tgz_bytes([file_entry(name)]), archive, dest
    )


# --- bombs and limits --------------------------------------------------------------------


def test_too_many_members(archive: pathlib.Path, dest: pathlib.Path) -> None:
    entries = [file_entry(f"f{i}", b"x") for i in range(6)]
    _assert_rejected(ArchiveTooLarge, "more than 5 members", tgz_bytes(entries), archive, dest, max_members=5)


def test_compressed_size_limit(archive: pathlib.Path, dest: pathlib.Path) -> None:
    data = tgz_bytes(package_entries())
    _assert_rejected(
        ArchiveTooLarge, "largest accepted", data, archive, dest, max_compressed_bytes=len(data) - 1
    )


def test_declared_member_size_over_limit(archive: pathlib.Path, dest: pathlib.Path) -> None:
    entries = [file_entry("package.json", PACKAGE_JSON), file_entry("big", b"x" * 2000)]
    _assert_rejected(ArchiveTooLarge, "'big'", tgz_bytes(entries), archive, dest, max_uncompressed_bytes=1000)


def test_running_total_over_limit(archive: pathlib.Path, dest: pathlib.Path) -> None:
    entries = [file_entry("a", b"x" * 600), file_entry("b", b"y" * 600)]
    _assert_rejected(ArchiveTooLarge, "'b'", tgz_bytes(entries), archive, dest, max_uncompressed_bytes=1000)


def test_gzip_bomb(archive: pathlib.Path, dest: pathlib.Path) -> None:
    with tarfile.open(archive, mode="w:gz", compresslevel=1) as tar:
        tar.addfile(file_entry("package.json", PACKAGE_JSON)[0], io.BytesIO(PACKAGE_JSON))
        bomb = tarfile.TarInfo("zeros.bin")
        bomb.size = 64 * MiB
        tar.addfile(bomb, _Zeros(bomb.size))
    assert archive.stat().st_size < MiB  # > 200:1
    with pytest.raises(ArchiveTooLarge, match="compression ratio is suspicious"):
        unpack_package(archive, dest, UnpackLimits(ratio_floor_bytes=MiB))
    assert not dest.exists()


def test_header_bomb(archive: pathlib.Path, dest: pathlib.Path) -> None:
    # A GNU long-name header whose payload tarfile would read into memory whole.
    entries = [file_entry("package.json", PACKAGE_JSON), file_entry("n" * (8 * MiB))]
    data = tgz_bytes(entries, tar_format=tarfile.GNU_FORMAT)
    _assert_rejected(ArchiveInvalid, "tar header .* larger than", data, archive, dest)


# --- the contract with the caller ----------------------------------------------------------


def test_dest_must_not_exist(archive: pathlib.Path, dest: pathlib.Path) -> None:
    archive.write_bytes(tgz_bytes(package_entries()))
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(FileExistsError):
        unpack_package(archive, dest)
    assert (dest / "keep").read_text() == "mine"


def test_check_cancelled_aborts_and_cleans_up(archive: pathlib.Path, dest: pathlib.Path) -> None:
    archive.write_bytes(tgz_bytes(package_entries()))
    calls = 0

    class Stop(Exception):
        pass

    def check() -> None:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise Stop

    with pytest.raises(Stop):
        unpack_package(archive, dest, check_cancelled=check)
    assert not dest.exists()
