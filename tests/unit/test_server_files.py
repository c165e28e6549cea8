"""spacehub.server.files: whole-or-nothing writes with the mode meant, and private reads."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from spacehub.server import files
from spacehub.server.files import PRIVATE, UnsafeFile, read_private, write_atomic


def test_a_write_replaces_the_file_with_the_mode_meant_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"old")
    old_umask = os.umask(0)
    try:
        write_atomic(target, b"new", PRIVATE)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def disk_full(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "write", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"new" * 1000)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_the_temporary_file_can_live_elsewhere(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    write_atomic(tmp_path / "x", b"1", temp_dir=tmp_path / "tmp")
    assert (tmp_path / "x").read_bytes() == b"1" and list((tmp_path / "tmp").iterdir()) == []


def test_a_private_read_refuses_a_file_others_may_read(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"k" * 10)
    key.chmod(0o600)
    assert read_private(key, 4) == b"kkkkk"  # limit + 1: the caller sees it is too long
    key.chmod(0o640)
    with pytest.raises(UnsafeFile, match=r"the key .*mode is 0640.*chmod 600"):
        read_private(key, 100, "the key")
