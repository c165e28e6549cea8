"""Pack a Sequence directory into a tar.gz, honouring ``.siignore``.

The archive is written as it is built, to a path, an open binary file or a temporary file, so a
package is never held whole in memory. Members are named relative to the directory (``package.json``
at the top), as ``tar czf pkg.tar.gz -C dir .`` would; a directory without ``package.json`` is
refused.

``.siignore`` (at the top of the directory) uses the rules of ``.gitignore``: one glob per line,
``#`` comments, ``!`` re-includes, a trailing ``/`` matches directories only, a pattern with a ``/``
other than a trailing one is anchored to the top, ``*`` and ``?`` stay within one path segment,
``**`` spans segments, the last matching line wins, and nothing inside an ignored directory can be
re-included.
"""

from __future__ import annotations

import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from .errors import PackageError

__all__ = ["IGNORE_FILE", "IgnoreRules", "pack", "pack_to_tempfile", "package_files"]

IGNORE_FILE: Final = ".siignore"


@dataclass(frozen=True, slots=True)
class _Rule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool


def _translate(glob: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(glob):
        char = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif char == "*":
            out.append("[^/]*")
            i += 1
        elif char == "?":
            out.append("[^/]")
            i += 1
        elif char == "[":
            end = glob.find("]", i + 2 if glob.startswith("[!", i) or glob.startswith("[]", i) else i + 1)
            if end < 0:
                out.append(re.escape(char))
                i += 1
            else:
                inner = glob[i + 1 : end]
                if inner.startswith("!"):
                    inner = "^" + inner[1:]
                out.append(f"[{inner.replace(chr(92), chr(92) * 2)}]")
                i = end + 1
        elif char == "\\" and i + 1 < len(glob):
            out.append(re.escape(glob[i + 1]))
            i += 2
        else:
            out.append(re.escape(char))
            i += 1
    return "".join(out)


def _compile(line: str) -> _Rule | None:
    line = line.rstrip("\n\r")
    if not line.endswith("\\ "):
        line = line.rstrip()
    if not line or line.startswith("#"):
        return None
    negate = line.startswith("!")
    if negate or line.startswith("\\"):  # "\#" and "\!" escape a leading "#" or "!"
        line = line[1:]
    dir_only = line.endswith("/")
    line = line.rstrip("/")
    if not line:
        return None
    anchored = "/" in line
    line = line.lstrip("/")
    prefix = "^" if anchored else "^(?:.*/)?"
    return _Rule(re.compile(prefix + _translate(line) + "$"), negate, dir_only)


class IgnoreRules:
    """The lines of a ``.siignore``, asked about paths relative to the package's top."""

    def __init__(self, lines: Iterable[str] = ()) -> None:
        self._rules = [rule for rule in map(_compile, lines) if rule is not None]

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> IgnoreRules:
        path = Path(directory) / IGNORE_FILE
        if not path.is_file():
            return cls()
        with path.open(encoding="utf-8", errors="replace") as file:
            return cls(file)

    def ignored(self, relative: str, is_dir: bool = False) -> bool:
        """Whether ``relative`` (a POSIX path, without a leading ``/``) is left out."""
        verdict = False
        for rule in self._rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.match(relative):
                verdict = not rule.negate
        return verdict


def package_files(
    directory: str | os.PathLike[str], *, skip: Iterable[Path] = ()
) -> Iterator[tuple[Path, str]]:
    """``(path, member name)`` of everything packed from ``directory``, in a stable order."""
    top = Path(directory)
    if not top.is_dir():
        raise PackageError(f"{top} is not a directory")
    if not (top / "package.json").is_file():
        raise PackageError(f"{top} has no package.json: not a Sequence")
    rules = IgnoreRules.load(top)
    skipped = {p.resolve() for p in skip}

    def walk(folder: Path, prefix: str) -> Iterator[tuple[Path, str]]:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            relative = f"{prefix}{entry.name}"
            is_dir = entry.is_dir(follow_symlinks=False)
            if rules.ignored(relative, is_dir) or Path(entry.path).resolve() in skipped:
                continue
            yield Path(entry.path), relative
            if is_dir:
                yield from walk(Path(entry.path), relative + "/")

    yield from walk(top, "")


def _write(directory: Path, file: IO[bytes], skip: Iterable[Path]) -> None:
    with tarfile.open(fileobj=file, mode="w:gz") as tar:
        for path, name in package_files(directory, skip=skip):
            tar.add(path, arcname=name, recursive=False)


def pack(directory: str | os.PathLike[str], output: str | os.PathLike[str] | IO[bytes]) -> None:
    """Write the package of ``directory`` to ``output`` (a path or an open binary file)."""
    top = Path(directory)
    if isinstance(output, str | os.PathLike):
        target = Path(output)
        # Refuse before creating the output: a half-made file would be left otherwise.
        if not (top / "package.json").is_file():
            raise PackageError(f"{top} has no package.json: not a Sequence")
        partial = target.with_name(target.name + ".part")
        try:
            with partial.open("wb") as file:
                _write(top, file, skip=[target, partial])
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
    else:
        _write(top, output, skip=())


def pack_to_tempfile(directory: str | os.PathLike[str]) -> IO[bytes]:
    """The package of ``directory`` in an anonymous temporary file, rewound; close it when done."""
    file = tempfile.TemporaryFile(prefix="si-pack-", suffix=".tar.gz")  # noqa: SIM115 - returned open
    try:
        _write(Path(directory), file, skip=())
        file.seek(0)
    except BaseException:
        file.close()
        raise
    return file
