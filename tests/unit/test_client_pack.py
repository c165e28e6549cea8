"""spacehub.client.pack: .siignore rules, refusal without package.json, archives that round-trip."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from spacehub.client.errors import PackageError
from spacehub.client.pack import IgnoreRules, pack, pack_to_tempfile


@pytest.mark.parametrize(
    ("lines", "path", "is_dir", "ignored"),
    [
        (["*.log"], "a.log", False, True),
        (["*.log"], "deep/er/a.log", False, True),
        (["*.log"], "a.logs", False, False),
        (["# *.log", ""], "a.log", False, False),
        (["build/"], "build", True, True),
        (["build/"], "build", False, False),  # a trailing / matches directories only
        (["build/"], "src/build", True, True),
        (["/build"], "src/build", True, False),  # a leading / anchors to the top
        (["/build"], "build", True, True),
        (["doc/*.md"], "doc/a.md", False, True),
        (["doc/*.md"], "x/doc/a.md", False, False),  # a middle / anchors too
        (["doc/*.md"], "doc/sub/a.md", False, False),  # * stays in one segment
        (["**/cache"], "a/b/cache", True, True),
        (["**/cache"], "cache", True, True),
        (["logs/**"], "logs/a/b.txt", False, True),
        (["a/**/z"], "a/b/c/z", False, True),
        (["a/**/z"], "a/z", False, True),
        (["file?.txt"], "file1.txt", False, True),
        (["file?.txt"], "file10.txt", False, False),
        (["[ab].py"], "a.py", False, True),
        (["[!ab].py"], "a.py", False, False),
        (["[!ab].py"], "c.py", False, True),
        (["*.txt", "!keep.txt"], "keep.txt", False, False),
        (["*.txt", "!keep.txt"], "drop.txt", False, True),
        (["!keep.txt", "*.txt"], "keep.txt", False, True),  # the last match wins
        (["\\#hash"], "#hash", False, True),
        (["\\!bang"], "!bang", False, True),
        (["trailing   "], "trailing", False, True),
    ],
)
def test_ignore_rules(lines: list[str], path: str, is_dir: bool, ignored: bool) -> None:
    assert IgnoreRules(lines).ignored(path, is_dir) is ignored


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


def _members(data: bytes) -> dict[str, bytes | None]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        out: dict[str, bytes | None] = {}
        for member in tar.getmembers():
            file = tar.extractfile(member)
            out[member.name] = file.read() if file is not None else None
        return out


def test_refuses_a_directory_without_package_json(tmp_path: Path) -> None:
    _tree(tmp_path, {"main.py": "x"})
    with pytest.raises(PackageError, match=r"package\.json"):
        pack(tmp_path, tmp_path.parent / "out.tar.gz")
    assert not (tmp_path.parent / "out.tar.gz").exists()
    with pytest.raises(PackageError):
        pack_to_tempfile(tmp_path)
    with pytest.raises(PackageError, match="not a directory"):
        pack_to_tempfile(tmp_path / "main.py")


def test_round_trip_honours_siignore(tmp_path: Path) -> None:
    source = _tree(
        tmp_path / "seq",
        {
            "package.json": '{"name": "x"}',
            "main.py": "print(1)",
            "lib/util.py": "u = 1",
            "lib/util.pyc": "bytecode",
            "node_modules/dep/index.js": "",
            "logs/a.log": "x",
            "keep.log": "kept",
            ".siignore": "# comment\n*.pyc\nnode_modules/\nlogs\n*.log\n!keep.log\n",
        },
    )
    output = tmp_path / "seq.tar.gz"
    pack(source, output)
    members = _members(output.read_bytes())
    assert set(members) == {"package.json", "main.py", "lib", "lib/util.py", "keep.log", ".siignore"}
    assert members["main.py"] == b"print(1)" and members["keep.log"] == b"kept"
    assert members["lib"] is None  # the directory entry
    with pack_to_tempfile(source) as file:
        assert _members(file.read()) == members


def test_output_inside_the_directory_is_not_packed(tmp_path: Path) -> None:
    source = _tree(tmp_path, {"package.json": "{}", "main.py": ""})
    pack(source, source / "self.tar.gz")
    assert set(_members((source / "self.tar.gz").read_bytes())) == {"package.json", "main.py"}


def test_pack_to_an_open_file(tmp_path: Path) -> None:
    source = _tree(tmp_path, {"package.json": "{}", "a/b/c.txt": "deep"})
    buffer = io.BytesIO()
    pack(source, buffer)
    assert _members(buffer.getvalue())["a/b/c.txt"] == b"deep"
