"""Sequence packages as tests and benchmarks build them: tar.gz bytes in memory."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any


def make_package(files: dict[str, str | bytes], *, package_json: dict[str, Any] | None = None) -> bytes:
    """A tar.gz Sequence package; ``package_json`` defaults to a Python one with main.py."""
    if package_json is None:
        package_json = {
            "name": "test-seq",
            "version": "1.0.0",
            "main": "main.py",
            "engines": {"python3": "3"},
        }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        entries = {"package.json": json.dumps(package_json), **files}
        for name, content in entries.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def python_package(source: str, **package: Any) -> bytes:
    meta = {"name": "test-seq", "version": "1.0.0", "main": "main.py", "engines": {"python3": "3"}, **package}
    return make_package({"main.py": source}, package_json=meta)
