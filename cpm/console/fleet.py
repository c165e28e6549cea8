"""The fleet as the console shows it: one row per hub, counts, filters, and what changed.

Rows are made from the same records the Space API lists (:meth:`HubSessions.record`), once
per :data:`SNAPSHOT_SECONDS` per space however many consoles look, so twenty open consoles
on a 5,000-hub Space cost one listing every two seconds, not twenty.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

import trio
from markupsafe import escape

from ..link.sessions import HubSessions
from ..loadhistory import load_percentages
from ..registry import Hub

__all__ = [
    "FIELDS",
    "SNAPSHOT_SECONDS",
    "STATES",
    "FleetRow",
    "FleetSnapshot",
    "FleetView",
    "hub_row",
    "row_html",
    "row_key",
    "row_source",
    "shown_time",
]

#: How long one listing of a space's hubs serves every console.
SNAPSHOT_SECONDS: Final = 2.0
#: The console's names for the Space API's states, in the order the counts show them.
STATES: Final = {"connected": "healthy", "unhealthy": "unhealthy", "disconnected": "disconnected"}
#: The fleet table's columns, in order (console.js fills cells by position).
FIELDS: Final = (
    "id",
    "state",
    "heartbeat",
    "cpu",
    "memory",
    "disk",
    "version",
    "tags",
    "instances",
    "connected",
    "disconnected",
)


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


def shown_time(stamp: Any) -> str:
    """A timestamp as the fleet table shows it: to the minute, UTC (the row key's precision)."""
    return f"{stamp[:10]} {stamp[11:16]}" if isinstance(stamp, str) and len(stamp) >= 16 else ""


def _percent(value: Any) -> str:
    return "" if value is None else f"{value}%"


def row_html(row: dict[str, Any], base: str) -> str:
    """The fleet table's ``<tr>`` for a row; cells in :data:`FIELDS` order (the script fills
    them by position), made here rather than by the template: 5,000 rows of a Jinja loop took
    ~130 ms, and a row is made again only when its :func:`row_key` changes."""
    hub = escape(row["id"])
    description = f"<small>{escape(row['description'])}</small>" if row["description"] else ""
    state = escape(row["state"])
    return (
        f'<tr id="hub-{hub}"><td><a href="{base}/hubs/{escape(quote(row["id"]))}">{hub}</a>{description}</td>'
        f'<td><span class="state {state}">{state}</span></td>'
        f"<td>{escape(shown_time(row['heartbeat']) or 'never')}</td>"
        f"<td>{_percent(row['cpu'])}</td><td>{_percent(row['memory'])}</td><td>{_percent(row['disk'])}</td>"
        f"<td>{escape(row['version'])}</td><td>{escape(', '.join(row['tags']))}</td>"
        f"<td>{row['instances']}</td>"
        f"<td>{escape(shown_time(row['connected']))}</td><td>{escape(shown_time(row['disconnected']))}</td></tr>\n"
    )


@dataclass(frozen=True, slots=True)
class FleetRow:
    """A hub's row with what every console would otherwise make again from it."""

    id: str
    data: dict[str, Any]
    key: tuple[Any, ...]
    html: str
    #: the row as JSON, for the live updates
    json: str
    #: what the row was made from (see :func:`row_source`): the same source, the same row
    source: tuple[Any, ...] = ()


def row_source(sessions: HubSessions, hub: Hub) -> tuple[Any, ...]:
    """Everything a hub's row is made from, cheap to gather: the registry's facts, the state,
    and the last report by its heartbeat time (a report changes only with a heartbeat). A row
    whose source is unchanged is not made again, which spares :meth:`HubSessions.record`, the
    costliest part of a snapshot (parsing the load, formatting times) for most hubs."""
    report = sessions.last_report(hub.id)
    return (
        sessions.state(hub.id),
        hub.description,
        hub.tags,
        hub.last_connected,
        hub.last_disconnected,
        hub.revoked_at,
        None if report is None else report.last_heartbeat_wall,
        None if report is None else report.version,
    )


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    rows: list[FleetRow]
    #: counts and tags of all the rows, made once per snapshot
    all_counts: dict[str, int] = field(default_factory=dict)
    all_tags: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, rows: list[FleetRow]) -> FleetSnapshot:
        return cls(rows, cls.counts(rows), sorted({tag for row in rows for tag in row.data["tags"]}))

    def select(self, tag: str | None, state: str | None) -> list[FleetRow]:
        if not tag and not state:
            return self.rows
        return [
            row
            for row in self.rows
            if (not tag or tag in row.data["tags"]) and (not state or row.data["state"] == state)
        ]

    def counts_of(self, rows: list[FleetRow], tag: str | None, state: str | None) -> dict[str, int]:
        """The counts of ``select(tag, state)``'s rows, made once per snapshot when unfiltered."""
        return self.all_counts if not tag and not state else self.counts(rows)

    @staticmethod
    def counts(rows: Iterable[FleetRow]) -> dict[str, int]:
        counts = dict.fromkeys(("total", *STATES.values()), 0)
        for row in rows:
            counts["total"] += 1
            counts[row.data["state"]] += 1
        return counts


class FleetView:
    """Shared, briefly cached snapshots of each space's fleet.

    A row is made again only when what it is made from changed (:func:`row_source`), and its
    HTML and JSON only when what it shows changed (:func:`row_key`): not once per snapshot or
    per console. Between two snapshots most rows are the same.
    """

    def __init__(
        self, sessions: HubSessions, list_hubs: Callable[[str], Awaitable[list[Hub]]], base: str
    ) -> None:
        self._sessions = sessions
        self._list_hubs = list_hubs
        self._base = base
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
            # Made rows are looked up in the previous snapshot only, so hubs that left it are
            # forgotten with it: the cache never holds more than the space's hubs.
            previous = {row.id: row for row in cached[1].rows} if cached is not None else {}
            rows = [self._row(hub, previous.get(hub.id)) for hub in hubs]
            snapshot = FleetSnapshot.of(rows)
            self._cache[space] = (trio.current_time(), snapshot)
            return snapshot

    def _row(self, hub: Hub, made: FleetRow | None) -> FleetRow:
        source = row_source(self._sessions, hub)
        if made is not None and made.source == source:
            return made
        data = hub_row(dict(self._sessions.record(hub)))
        key = row_key(data)
        if made is not None and made.key == key:
            return FleetRow(hub.id, made.data, key, made.html, made.json, source)
        return FleetRow(
            hub.id, data, key, row_html(data, self._base), json.dumps(data, separators=(",", ":")), source
        )
