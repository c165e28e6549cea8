"""Shared helpers for the benchmarks: start a real hub, time things, print tables.

Every benchmark prints a table and one JSON line, with the machine's core count and
Python version; each figure is the median of several runs, with min and max, next
to its baseline measured in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.daemons import HubProcess, run_sth  # noqa: E402


@contextmanager
def hub(*args: str) -> Iterator[HubProcess]:
    with (
        tempfile.TemporaryDirectory(prefix="spacehub-bench-") as root,
        run_sth(Path(root), "-L", "warn", *args) as h,
    ):
        yield h


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "runs": len(values),
    }


def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()}


def report(name: str, rows: list[tuple[str, dict[str, float] | float | str, str, str]]) -> None:
    """rows: (figure, value or summary, baseline text, target text)."""
    print(f"\n## {name}  ({machine()['cores']} cores, Python {machine()['python']})")
    print(f"| {'figure':<44} | {'median (min - max)':<26} | {'baseline':<30} | {'target':<12} |")
    print(f"|{'-' * 46}|{'-' * 28}|{'-' * 32}|{'-' * 14}|")
    for figure, value, baseline, target in rows:
        text = (
            f"{value['median']} ({value['min']} - {value['max']})" if isinstance(value, dict) else str(value)
        )
        print(f"| {figure:<44} | {text:<26} | {baseline:<30} | {target:<12} |")
    line = {"benchmark": name, **machine(), "figures": {r[0]: r[1] for r in rows}}
    print(json.dumps(line))
