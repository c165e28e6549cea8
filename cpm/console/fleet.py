"""The fleet as the console shows it: one row per hub, counts, filters, and what changed.

Rows are made from the same records the Space API lists (:meth:`HubSessions.record`), once
per :data:`SNAPSHOT_SECONDS` per space however many consoles look, so twenty open consoles
on a 5,000-hub Space cost one listing every two seconds, not twenty.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import trio

from ..link.sessions import HubSessions
from ..loadhistory import load_percentages
from ..registry import Hub

__all__ = ["SNAPSHOT_SECONDS", "STATES", "FleetSnapshot", "FleetView", "hub_row", "row_key"]

#: How long one listing of a space's hubs serves every console.
SNAPSHOT_SECONDS: Final = 2.0
#: The console's names for the Space API's states, in the order the counts show them.
STATES: Final = {"connected": "healthy", "unhealthy": "unhealthy", "disconnected": "disconnected"}


def hub_row(record: dict[str, Any]) -> dict[str, Any]:
    """A hub's row: what the fleet page shows of a Space API hub record (JSON-ready)."""
    load = record.get("load")
    cpu = memory = disk = None
    if isinstance(load, dict):
        cpu, memory, disk = (round(value) for value in load_percentages(load))
    info = record.get("info") or {}
    return {
        "id": record["id"],
        "description": record.get("description", ""),
        "state": STATES.get(str(record.get("state")), "disconnected"),
        "heartbeat": record.get("lastHeartbeat"),
        "connected": info.get("lastConnected"),
        "disconnected": info.get("lastDisconnected"),
        "cpu": cpu,
        "memory": memory,
        "disk": disk,
        "version": record.get("version", ""),
        "tags": list(record.get("tags", [])),
        "instances": len(record.get("instances") or []),
        "sequences": len(record.get("sequences") or []),
    }


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """What must differ for a row to be sent again: everything shown, the heartbeat to the
    minute (the page shows it to the minute; every heartbeat would resend every row)."""
    heartbeat = row["heartbeat"]
    return (
        row["state"],
        heartbeat[:16] if isinstance(heartbeat, str) else None,
        row["connected"],
        row["disconnected"],
        row["cpu"],
        row["memory"],
        row["disk"],
        row["version"],
        tuple(row["tags"]),
        row["instances"],
        row["sequences"],
        row["description"],
    )


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    rows: list[dict[str, Any]]

    def select(self, tag: str | None, state: str | None) -> list[dict[str, Any]]:
        return [
            row
            for row in self.rows
            if (not tag or tag in row["tags"]) and (not state or row["state"] == state)
        ]

    @staticmethod
    def counts(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
        counts = dict.fromkeys(("total", *STATES.values()), 0)
        for row in rows:
            counts["total"] += 1
            counts[row["state"]] += 1
        return counts

    def tags(self) -> list[str]:
        return sorted({tag for row in self.rows for tag in row["tags"]})


class FleetView:
    """Shared, briefly cached snapshots of each space's fleet."""

    def __init__(self, sessions: HubSessions, list_hubs: Callable[[str], Awaitable[list[Hub]]]) -> None:
        self._sessions = sessions
        self._list_hubs = list_hubs
        #: space -> (trio time taken, snapshot)
        self._cache: dict[str, tuple[float, FleetSnapshot]] = {}
        self._lock = trio.Lock()

    async def snapshot(self, space: str) -> FleetSnapshot:
        async with self._lock:  # one listing at a time: concurrent consoles share it
            cached = self._cache.get(space)
            now = trio.current_time()
            if cached is not None and now - cached[0] < SNAPSHOT_SECONDS:
                return cached[1]
            hubs = await self._list_hubs(space)
            rows = [hub_row(dict(self._sessions.record(hub))) for hub in hubs]
            snapshot = FleetSnapshot(rows)
            self._cache[space] = (trio.current_time(), snapshot)
            return snapshot
