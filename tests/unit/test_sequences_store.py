"""agent.sequences.store: the on-disk sequence store."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from agent.errors import (
    ArchiveInvalid,
    ArchiveTooLarge,
    BadRequest,
    Conflict,
    PackageInvalid,
    SequenceNotFound,
)
from agent.sequences import store as store_module
from agent.sequences.store import Sequence, SequenceStore
from agent.sequences.unpack import UnpackLimits, unpack_package
from tests.unit.test_sequences_unpack import (
    PACKAGE_JSON,
    dir_entry,
    file_entry,
    package_entries,
    tgz_bytes,
)

ISO_MS_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
#: Every test that waits on something is bounded by this.
TIMEOUT = 5


async def chunks(data: bytes, size: int = 700) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        await trio.lowlevel.checkpoint()
        yield data[start : start + size]


def package(main: str = "index.js", **fields: Any) -> bytes:
    document = {"name": "demo", "version": "1.0.0", "main": main, **fields}
    return tgz_bytes(
        [
            dir_entry("./"),
            file_entry("./package.json", json.dumps(document).encode()),
            file_entry("./" + main.removeprefix("./"), b"// entry\n"),
        ]
    )


@pytest.fixture
def root(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "sequences"


@pytest.fixture
def store(root: pathlib.Path) -> SequenceStore:
    seq_store = SequenceStore(root, location="hub-1")
    assert seq_store.load(identify_existing=False) == []
    return seq_store


def on_disk(root: pathlib.Path) -> set[str]:
    """Everything under root, .incoming's content included."""
    return {p.relative_to(root).as_posix() for p in root.iterdir()} | {
        p.relative_to(root).as_posix() for p in (root / ".incoming").iterdir()
    }


def make_adoptable(root: pathlib.Path, name: str, document: dict[str, Any] | None = None) -> pathlib.Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "package.json").write_text(json.dumps(document or {"name": name, "main": "index.js"}))
    (directory / "index.js").write_text("// entry\n")
    return directory


# --- add / get / list / remove -----------------------------------------------------------


async def test_add_get_list_remove(store: SequenceStore, root: pathlib.Path) -> None:
    with trio.fail_after(TIMEOUT):
        sequence = await store.add(chunks(package()))

    assert re.fullmatch(r"[0-9a-f-]{36}", sequence.id)
    assert store.get(sequence.id) is sequence
    assert store.list() == [sequence]
    assert sequence.directory == root / sequence.id
    assert (sequence.directory / "package.json").is_file()
    assert (sequence.directory / "index.js").read_bytes() == b"// entry\n"
    assert ISO_MS_Z.fullmatch(sequence.created)
    assert sequence.package_size == len(package())
    assert on_disk(root) == {".incoming", sequence.id, f"{sequence.id}.sequence.json"}

    config = sequence.config()
    assert config == {
        "type": "process",
        "entrypointPath": "index.js",
        "sequenceDir": str(root / sequence.id),
        "id": sequence.id,
        "packageSize": len(package()),
        "name": "demo",
        "version": "1.0.0",
        "main": "index.js",
        "engines": {},
        "language": "js",
    }
    sequence.instances.append("instance-1")
    assert sequence.info() == {
        "id": sequence.id,
        "config": config,
        "location": "hub-1",
        "instances": ["instance-1"],
        "name": "demo",
        "created": sequence.created,
    }

    metadata = json.loads((root / f"{sequence.id}.sequence.json").read_text())
    assert metadata == {
        "id": sequence.id,
        "created": sequence.created,
        "packageSize": len(package()),
        "config": config,
    }

    with trio.fail_after(TIMEOUT):
        await store.remove(sequence.id)
    assert store.list() == []
    assert on_disk(root) == {".incoming"}
    with pytest.raises(SequenceNotFound, match=f"Sequence {sequence.id} not found"):
        store.get(sequence.id)


async def test_info_omits_empty_name(store: SequenceStore) -> None:
    data = tgz_bytes([file_entry("package.json", b'{"main": "main.py", "engines": {"python3": "*"}}')])
    with trio.fail_after(TIMEOUT):
        sequence = await store.add(chunks(data))
    assert "name" not in sequence.info()
    assert sequence.config()["name"] == ""
    assert sequence.config()["language"] == "py"


async def test_list_oldest_first(store: SequenceStore) -> None:
    with trio.fail_after(TIMEOUT):
        added = [await store.add(chunks(package()), sequence_id=f"s{i}") for i in range(3)]
    assert store.list() == added


async def test_add_with_given_id(store: SequenceStore, root: pathlib.Path) -> None:
    with trio.fail_after(TIMEOUT):
        sequence = await store.add(chunks(package()), sequence_id="my-seq_1.0")
        assert sequence.id == "my-seq_1.0"
        assert (root / "my-seq_1.0" / "package.json").is_file()
        with pytest.raises(Conflict, match="already exists"):
            await store.add(chunks(package()), sequence_id="my-seq_1.0")


@pytest.mark.parametrize("bad_id", ["", ".incoming", "../x", "a/b", "x" * 201, "é"])
async def test_add_with_invalid_id(store: SequenceStore, root: pathlib.Path, bad_id: str) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(BadRequest, match="invalid sequence id"):
        await store.add(chunks(package()), sequence_id=bad_id)
    assert on_disk(root) == {".incoming"}


async def test_add_over_a_stray_directory(store: SequenceStore, root: pathlib.Path) -> None:
    (root / "stray").mkdir()
    with trio.fail_after(TIMEOUT), pytest.raises(Conflict, match="already in the store"):
        await store.add(chunks(package()), sequence_id="stray")
    assert on_disk(root) == {".incoming", "stray"}


async def test_remove_unknown(store: SequenceStore) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(SequenceNotFound):
        await store.remove("nope")


# --- failed uploads leave nothing behind --------------------------------------------------


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (b"", ArchiveInvalid, "empty body: send the package as a tar.gz"),
        (b"this is not gzip", ArchiveInvalid, "not a gzip-compressed tar archive"),
        (
            tgz_bytes([file_entry("index.js", b"x")]),
            PackageInvalid,
            "package.json not found at the archive root",
        ),
        (
            tgz_bytes([file_entry("sub/package.json", PACKAGE_JSON)]),
            PackageInvalid,
            "not found at the archive root",
        ),
        (tgz_bytes([dir_entry("package.json")]), PackageInvalid, "not a regular file"),
        (tgz_bytes([file_entry("package.json", b'{"name": "x"}')]), PackageInvalid, "'main' is required"),
        (tgz_bytes([file_entry("package.json", b"{nope")]), PackageInvalid, "not valid JSON"),
        (
            tgz_bytes([file_entry("package.json", b" " * (1024 * 1024) + b"{}")]),
            PackageInvalid,
            "larger than",
        ),
        (tgz_bytes([*package_entries(), file_entry("../evil", b"x")]), ArchiveInvalid, "'..'"),
    ],
    ids=[
        "empty",
        "not-gzip",
        "no-package-json",
        "nested-package-json",
        "package-json-dir",
        "no-main",
        "bad-json",
        "huge-package-json",
        "unsafe",
    ],
)
async def test_failed_add_leaves_nothing(
    store: SequenceStore, root: pathlib.Path, data: bytes, error: type[Exception], match: str
) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(error, match=match):
        await store.add(chunks(data))
    assert store.list() == []
    assert on_disk(root) == {".incoming"}


async def test_body_over_compressed_limit_stops_reading(root: pathlib.Path) -> None:
    store = SequenceStore(root, location="hub-1", limits=UnpackLimits(max_compressed_bytes=1000))
    store.load(identify_existing=False)
    consumed = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal consumed
        while True:
            consumed += 1
            yield b"\x1f\x8b" + bytes(298)

    with trio.fail_after(TIMEOUT), pytest.raises(ArchiveTooLarge, match="larger than 1000 bytes"):
        await store.add(endless())
    assert consumed == 4
    assert on_disk(root) == {".incoming"}


async def test_unpack_limits_are_applied(root: pathlib.Path) -> None:
    store = SequenceStore(root, location="hub-1", limits=UnpackLimits(max_members=2))
    store.load(identify_existing=False)
    with trio.fail_after(TIMEOUT), pytest.raises(ArchiveTooLarge, match="more than 2 members"):
        await store.add(chunks(tgz_bytes(package_entries())))
    assert on_disk(root) == {".incoming"}


async def test_metadata_write_failure_rolls_back(
    store: SequenceStore, root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(self: SequenceStore, sequence: Sequence) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SequenceStore, "_write_metadata", fail)
    with trio.fail_after(TIMEOUT), pytest.raises(OSError, match="No space left"):
        await store.add(chunks(package()), sequence_id="full")
    assert store.list() == []
    assert on_disk(root) == {".incoming"}


# --- cancellation -----------------------------------------------------------------------------


async def test_cancel_while_receiving(store: SequenceStore, root: pathlib.Path) -> None:
    data = package()
    asked_for_more = trio.Event()
    scope = trio.CancelScope()

    async def stalled() -> AsyncIterator[bytes]:
        yield data[:100]
        asked_for_more.set()  # the first chunk has been written to the spool file
        await trio.sleep_forever()
        yield b""  # pragma: no cover

    async def upload() -> None:
        with scope:
            await store.add(stalled())

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            await asked_for_more.wait()
            assert [p.suffixes[-2:] for p in (root / ".incoming").iterdir()] == [[".tar", ".gz"]]
            scope.cancel()
    assert scope.cancelled_caught
    assert store.list() == []
    assert on_disk(root) == {".incoming"}


async def test_cancel_while_unpacking(
    store: SequenceStore, root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unpacking = trio.Event()
    token = trio.lowlevel.current_trio_token()
    ran_in_thread = threading.Event()

    def slow_unpack(*args: Any, check_cancelled: Callable[[], object], **kwargs: Any) -> Any:
        def check() -> None:
            # Signal the test once, then wait here until the cancellation arrives.
            if not ran_in_thread.is_set():
                ran_in_thread.set()
                trio.from_thread.run_sync(unpacking.set, trio_token=token)
                while True:
                    check_cancelled()
                    threading.Event().wait(0.005)

        return unpack_package(*args, check_cancelled=check, **kwargs)

    monkeypatch.setattr(store_module, "unpack_package", slow_unpack)
    scope = trio.CancelScope()

    async def upload() -> None:
        with scope:
            await store.add(chunks(package()))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            await unpacking.wait()
            # The package directory is being written in .incoming at this point.
            assert any(p.is_dir() for p in (root / ".incoming").iterdir())
            scope.cancel()
    assert scope.cancelled_caught
    assert store.list() == []
    assert on_disk(root) == {".incoming"}


async def test_concurrent_change_of_same_id_conflicts(store: SequenceStore) -> None:
    with trio.fail_after(TIMEOUT):
        sequence = await store.add(chunks(package()))
        asked_for_more = trio.Event()

        async def stalled() -> AsyncIterator[bytes]:
            yield package()[:10]
            asked_for_more.set()
            await trio.sleep_forever()
            yield b""  # pragma: no cover

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.replace, sequence.id, stalled())
            await asked_for_more.wait()
            with pytest.raises(Conflict, match="being changed"):
                await store.remove(sequence.id)
            nursery.cancel_scope.cancel()
    assert store.get(sequence.id) is sequence


# --- replace ------------------------------------------------------------------------------------


async def test_replace(store: SequenceStore, root: pathlib.Path) -> None:
    with trio.fail_after(TIMEOUT):
        old = await store.add(chunks(package("index.js")))
        old.instances.append("i-1")
        new_data = package("main.py", version="2.0.0", engines={"python3": "3"})
        new = await store.replace(old.id, chunks(new_data))

    assert new.id == old.id
    assert store.get(old.id) is new
    assert new.created == old.created
    assert new.instances is old.instances
    assert new.package.version == "2.0.0"
    assert new.config()["language"] == "py"
    assert new.package_size == len(new_data)
    # The old files are gone: the new package replaced the directory whole.
    assert sorted(p.name for p in new.directory.iterdir()) == ["main.py", "package.json"]
    metadata = json.loads((root / f"{old.id}.sequence.json").read_text())
    assert metadata["config"]["version"] == "2.0.0"
    assert metadata["packageSize"] == len(new_data)
    assert on_disk(root) == {".incoming", old.id, f"{old.id}.sequence.json"}


@pytest.mark.parametrize(
    "data",
    [b"not gzip", tgz_bytes([file_entry("package.json", b"{}")]), b""],
    ids=["bad-archive", "bad-package", "empty"],
)
async def test_replace_keeps_old_on_failure(store: SequenceStore, root: pathlib.Path, data: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        old = await store.add(chunks(package()))
        before = (root / f"{old.id}.sequence.json").read_bytes()
        with pytest.raises((ArchiveInvalid, PackageInvalid)):
            await store.replace(old.id, chunks(data))
    assert store.get(old.id) is old
    assert (root / f"{old.id}.sequence.json").read_bytes() == before
    assert (old.directory / "index.js").read_bytes() == b"// entry\n"
    assert on_disk(root) == {".incoming", old.id, f"{old.id}.sequence.json"}


async def test_replace_metadata_failure_restores_old(
    store: SequenceStore, root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(TIMEOUT):
        old = await store.add(chunks(package()))

        def fail(self: SequenceStore, sequence: Sequence) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(SequenceStore, "_write_metadata", fail)
        with pytest.raises(OSError, match="No space left"):
            await store.replace(old.id, chunks(package("other.js")))
    assert store.get(old.id) is old
    assert sorted(p.name for p in old.directory.iterdir()) == ["index.js", "package.json"]
    assert on_disk(root) == {".incoming", old.id, f"{old.id}.sequence.json"}


async def test_replace_unknown(store: SequenceStore) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(SequenceNotFound):
        await store.replace("nope", chunks(package()))


# --- load: persistence, adoption, broken entries ---------------------------------------------------


async def test_persistence(store: SequenceStore, root: pathlib.Path) -> None:
    with trio.fail_after(TIMEOUT):
        first = await store.add(chunks(package()), sequence_id="first")
        second = await store.add(chunks(package("app.js", keywords=["k"])))
        removed = await store.add(chunks(package()))
        await store.remove(removed.id)

    reloaded = SequenceStore(root, location="hub-2")
    assert reloaded.load(identify_existing=False) == []
    assert [s.id for s in reloaded.list()] == [first.id, second.id]
    again = reloaded.get(second.id)
    assert again.created == second.created
    assert again.package == second.package
    assert again.package_size == second.package_size
    assert again.info() == {**second.info(), "location": "hub-2"}
    with pytest.raises(SequenceNotFound):
        reloaded.get(removed.id)


def test_load_creates_root_and_clears_incoming(root: pathlib.Path) -> None:
    store = SequenceStore(root, location="hub-1")
    assert store.load(identify_existing=False) == []
    assert stat_mode(root) == 0o755
    leftovers = root / ".incoming"
    (leftovers / "half-unpacked" / "lib").mkdir(parents=True)
    (leftovers / "upload.tar.gz").write_bytes(b"partial")
    assert SequenceStore(root, location="hub-1").load(identify_existing=False) == []
    assert list(leftovers.iterdir()) == []


def stat_mode(path: pathlib.Path) -> int:
    return path.stat().st_mode & 0o7777


def test_identify_existing(root: pathlib.Path) -> None:
    adopted = make_adoptable(root, "args-config-test", {"name": "acf", "main": "index.js", "version": "1"})
    make_adoptable(root, ".hidden")
    (root / "no-package").mkdir()
    make_adoptable(root, "bad-package", {"name": "x"})
    (root / "not-a-dir.txt").write_text("x")
    os.symlink(adopted, root / "link")

    # Without the flag, nothing is adopted and nothing is written.
    plain = SequenceStore(root, location="hub-1")
    assert plain.load(identify_existing=False) == []
    assert plain.list() == []
    assert not (root / "args-config-test.sequence.json").exists()

    store = SequenceStore(root, location="hub-1")
    warnings = store.load(identify_existing=True)
    assert [s.id for s in store.list()] == ["args-config-test"]
    sequence = store.get("args-config-test")
    assert sequence.package.name == "acf"
    assert sequence.directory == adopted
    assert sequence.package_size == 0
    assert ISO_MS_Z.fullmatch(sequence.created)
    assert (root / "args-config-test.sequence.json").is_file()
    joined = "\n".join(warnings)
    assert len(warnings) == 3, warnings
    assert "no-package" in joined and "no package.json" in joined
    assert "bad-package" in joined and "'main' is required" in joined
    assert "link" in joined and "symbolic link" in joined
    assert ".hidden" not in joined

    # Adopted once, it is an ordinary stored sequence from then on.
    later = SequenceStore(root, location="hub-1")
    assert later.load(identify_existing=False) == []
    assert [s.id for s in later.list()] == ["args-config-test"]
    assert later.get("args-config-test").created == sequence.created


async def test_broken_metadata_is_skipped(store: SequenceStore, root: pathlib.Path) -> None:
    with trio.fail_after(TIMEOUT):
        good = await store.add(chunks(package()), sequence_id="good")
        await store.add(chunks(package()), sequence_id="no-dir")
        await store.add(chunks(package()), sequence_id="bad-package")
        await store.add(chunks(package()), sequence_id="wrong-id")
    (root / "garbage.sequence.json").write_text("{not json")
    (root / "array.sequence.json").write_text("[]")
    shutil.rmtree(root / "no-dir")
    (root / "bad-package" / "package.json").write_text('{"main": 5}')
    meta = json.loads((root / "wrong-id.sequence.json").read_text())
    (root / "wrong-id.sequence.json").write_text(json.dumps({**meta, "id": "other"}))

    reloaded = SequenceStore(root, location="hub-1")
    warnings = reloaded.load(identify_existing=False)
    assert [s.id for s in reloaded.list()] == [good.id]
    by_id = {w.split(":")[0].removeprefix("skipped sequence "): w for w in warnings}
    assert set(by_id) == {"garbage", "array", "no-dir", "bad-package", "wrong-id"}
    assert "not valid JSON" in by_id["garbage"]
    assert "JSON object" in by_id["array"]
    assert "missing" in by_id["no-dir"]
    assert "'main' must be a string" in by_id["bad-package"]
    assert "does not match" in by_id["wrong-id"]

    # A valid package.json under a broken metadata file is adopted again with -E.
    adopting = SequenceStore(root, location="hub-1")
    adopting.load(identify_existing=True)
    assert {s.id for s in adopting.list()} == {"good", "wrong-id"}
