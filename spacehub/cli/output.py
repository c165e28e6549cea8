"""How `si` prints: tables for lists, JSON for ``--format json`` and objects, progress on stderr."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, TextIO

__all__ = ["Progress", "format_log", "format_object", "print_json", "print_table", "print_value"]

#: A bar appears only for transfers longer than this (seconds), and redraws at most this often.
PROGRESS_DELAY: Final = 1.0
PROGRESS_INTERVAL: Final = 0.1
_BAR_WIDTH: Final = 30

Column = tuple[str, Callable[[Mapping[str, Any]], Any]]


def print_json(value: Any, *, indent: int | None = None, file: TextIO | None = None) -> None:
    print(json.dumps(value, indent=indent, ensure_ascii=False), file=file or sys.stdout, flush=True)


def print_value(value: Any, fmt: str) -> None:
    """An object: one line of JSON for scripts (``--format json``); for people, ``key: value``
    lines (nested objects indented under their key); text as it is."""
    if fmt == "json":
        print_json(value)
    elif isinstance(value, str):
        print(value, flush=True)
    else:
        print("\n".join(format_object(value)), flush=True)


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _is_flat(value: Any) -> bool:
    """Short enough to stay on its key's line: a scalar, or an empty or all-scalar list."""
    if isinstance(value, dict):
        return not value
    if isinstance(value, list):
        return all(not isinstance(item, dict | list) for item in value)
    return True


def format_object(value: Any, indent: str = "") -> list[str]:
    """``value`` as readable lines: ``key: value`` for objects, ``- item`` for lists of objects."""
    if isinstance(value, dict):
        if not value:
            return [f"{indent}(none)"]
        lines: list[str] = []
        for key, item in value.items():
            if _is_flat(item):
                shown = (
                    "{}"
                    if item == {}
                    else _scalar(item)
                    if not isinstance(item, list)
                    else (", ".join(_scalar(i) for i in item) or "[]")
                )
                lines.append(f"{indent}{key}: {shown}")
            else:
                lines.append(f"{indent}{key}:")
                lines.extend(format_object(item, indent + "  "))
        return lines
    if isinstance(value, list):
        if not value:
            return [f"{indent}(none)"]
        lines = []
        for item in value:
            inner = format_object(item, indent + "  ")
            lines.append(f"{indent}- {inner[0].lstrip()}")
            lines.extend(inner[1:])
        return lines
    return [f"{indent}{_scalar(value)}"]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], fmt: str) -> None:
    """``rows`` as a table of ``columns`` (header, getter), or as one JSON array."""
    if fmt == "json":
        print_json(list(rows))
        return
    cells = [[h for h, _ in columns], *([_cell(get(row)) for _, get in columns] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    sys.stdout.flush()


def format_log(record: Any) -> str:
    """A hub or instance log record as one line of text."""
    if not isinstance(record, dict):
        return str(record)
    ts = record.get("ts")
    when = (
        datetime.fromtimestamp(ts / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if isinstance(ts, int | float)
        else ""
    )
    level = str(record.get("level", "")).ljust(5)
    source = record.get("from", "")
    message = record.get("msg", "")
    extra = record.get("data")
    tail = f" {json.dumps(extra)}" if extra else ""
    return f"{when} {level} {source}: {message}{tail}".strip()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """A progress bar on ``stream`` (stderr), drawn only when it is a terminal and the transfer
    has lasted :data:`PROGRESS_DELAY`; call it as ``progress(done, total_or_None)``."""

    def __init__(self, label: str, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self._drawn_at = 0.0
        self._drawn = False
        self._last: tuple[int, int | None] = (0, None)

    def __call__(self, done: int, total: int | None) -> None:
        self._last = (done, total)
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.started < PROGRESS_DELAY or now - self._drawn_at < PROGRESS_INTERVAL:
            return
        self._draw(done, total, now)

    def _draw(self, done: int, total: int | None, now: float) -> None:
        self._drawn_at = now
        rate = done / max(now - self.started, 1e-6)
        if total:
            part = min(done / total, 1.0)
            fill = int(part * _BAR_WIDTH)
            bar = f"[{'#' * fill}{'.' * (_BAR_WIDTH - fill)}] {part:4.0%} {_size(done)}/{_size(total)}"
        else:
            bar = _size(done)
        self.stream.write(f"\r{self.label} {bar} {_size(rate)}/s\x1b[K")
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        """End the bar's line (if one was drawn)."""
        if self._drawn:
            self._draw(*self._last, time.monotonic())
            self.stream.write("\n")
            self.stream.flush()


def lines(chunks: Iterable[bytes]) -> Iterable[str]:
    """Text lines out of byte chunks."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace")
    if buffer:
        yield buffer.decode("utf-8", "replace")
