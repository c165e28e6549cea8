"""A hub's load over the last hour, from the heartbeats this manager received.

One point a minute (the minute's last heartbeat), in a fixed ring: about 1 KB per hub, so a
fleet of 5,000 hubs keeps its hour of history in 5 MB. Heartbeats are never written to the
registry; a manager restart starts the history again.
"""

from __future__ import annotations

from array import array
from typing import Any, Final

__all__ = ["HISTORY_MINUTES", "LoadHistory", "load_percentages"]

#: Minutes of history kept per hub (one point each).
HISTORY_MINUTES: Final = 60


def load_percentages(load: dict[str, Any]) -> tuple[float, float, float]:
    """CPU, memory and (fullest filesystem's) disk use in percent, from a load-check."""

    def number(value: Any) -> float:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

    cpu = number(load.get("currentLoad"))
    used, free = number(load.get("memUsed")), number(load.get("memFree"))
    memory = 100.0 * used / (used + free) if used + free > 0 else 0.0
    disks = [number(fs.get("use")) for fs in load.get("fsSize") or [] if isinstance(fs, dict)]
    disk = max(disks, default=0.0)
    return (min(max(cpu, 0.0), 100.0), min(max(memory, 0.0), 100.0), min(max(disk, 0.0), 100.0))


class LoadHistory:
    """``add(wall_time, cpu, memory, disk)`` each heartbeat; ``points(now)`` the last hour."""

    __slots__ = ("_minutes", "_values")

    def __init__(self) -> None:
        #: the minute (Unix time // 60) each slot holds, 0 for none
        self._minutes = array("I", bytes(4 * HISTORY_MINUTES))
        #: cpu, memory, disk per slot
        self._values = array("f", bytes(4 * 3 * HISTORY_MINUTES))

    def add(self, when: float, cpu: float, memory: float, disk: float) -> None:
        minute = int(when // 60)
        slot = minute % HISTORY_MINUTES
        self._minutes[slot] = minute
        self._values[3 * slot : 3 * slot + 3] = array("f", (cpu, memory, disk))

    def points(self, now: float) -> list[tuple[int, float, float, float]]:
        """``(minute start as Unix time, cpu %, memory %, disk %)``, oldest first, within the hour."""
        current = int(now // 60)
        kept = []
        for slot, minute in enumerate(self._minutes):
            if minute and current - HISTORY_MINUTES < minute <= current:
                cpu, memory, disk = self._values[3 * slot : 3 * slot + 3]
                kept.append((minute * 60, round(cpu, 1), round(memory, 1), round(disk, 1)))
        kept.sort()
        return kept
