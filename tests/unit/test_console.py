"""The console's pieces that need no server: sessions and login links, load history, fleet rows."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cpm.console.auth import (
    LOGIN_LINK_SECONDS,
    MAX_LOGIN_LINKS,
    MAX_SESSIONS,
    SESSION_SECONDS,
    ConsoleSessions,
    same_secret,
)
from cpm.console.fleet import FIELDS, FleetRow, FleetSnapshot, hub_row, row_html, row_key, shown_time
from cpm.loadhistory import HISTORY_MINUTES, LoadHistory, load_percentages


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- sessions -----------------------------------------------------------------------------------


def test_session_lasts_until_its_expiry(clock: FakeClock) -> None:
    sessions = ConsoleSessions(clock)
    session = sessions.sign_in("tok", ["space-a", "space-b"])
    assert session.space == "space-a"
    assert session.id != session.csrf
    assert "tok" not in repr(session)
    clock.now += SESSION_SECONDS - 1
    assert sessions.get(session.id) is session
    clock.now += 1
    assert sessions.get(session.id) is None
    assert len(sessions) == 0  # an expired session is forgotten, not kept


def test_unknown_and_empty_session_ids(clock: FakeClock) -> None:
    sessions = ConsoleSessions(clock)
    sessions.sign_in("tok", ["s"])
    assert sessions.get(None) is None
    assert sessions.get("") is None
    assert sessions.get("not-a-session") is None


def test_sign_out_ends_only_that_session(clock: FakeClock) -> None:
    sessions = ConsoleSessions(clock)
    first, second = sessions.sign_in("a", ["s"]), sessions.sign_in("b", ["s"])
    sessions.sign_out(first.id)
    sessions.sign_out(first.id)  # twice is harmless
    assert sessions.get(first.id) is None
    assert sessions.get(second.id) is second


def test_sessions_are_bounded_and_the_oldest_goes(clock: FakeClock) -> None:
    sessions = ConsoleSessions(clock)
    made = [sessions.sign_in(f"t{n}", ["s"]) for n in range(MAX_SESSIONS + 3)]
    assert len(sessions) == MAX_SESSIONS
    assert [sessions.get(s.id) for s in made[:3]] == [None, None, None]
    assert all(sessions.get(s.id) is s for s in made[3:])


def test_a_session_needs_a_space(clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        ConsoleSessions(clock).sign_in("tok", [])


def test_session_secrets_are_unique(clock: FakeClock) -> None:
    sessions = ConsoleSessions(clock)
    made = [sessions.sign_in("t", ["s"]) for _ in range(50)]
    secrets = {s.id for s in made} | {s.csrf for s in made}
    assert len(secrets) == 100


def test_login_link_works_once(clock: FakeClock) -> None:
    sessions = ConsoleSessions(clock)
    code = sessions.create_login_link("space", "tok")
    assert sessions.redeem_login_link(code) == ("space", "tok")
    assert sessions.redeem_login_link(code) is None
    assert sessions.redeem_login_link("unknown") is None


def test_login_link_expires(clock: FakeClock) -> None:
    sessions = ConsoleSessions(clock)
    code = sessions.create_login_link("space", "tok")
    clock.now += LOGIN_LINK_SECONDS
    assert sessions.redeem_login_link(code) is None
    fresh = sessions.create_login_link("space", "tok")
    clock.now += LOGIN_LINK_SECONDS - 1
    assert sessions.redeem_login_link(fresh) == ("space", "tok")


def test_login_links_are_bounded(clock: FakeClock) -> None:
    sessions = ConsoleSessions(clock)
    codes = [sessions.create_login_link("s", f"t{n}") for n in range(MAX_LOGIN_LINKS + 1)]
    assert sessions.redeem_login_link(codes[0]) is None
    assert sessions.redeem_login_link(codes[-1]) == ("s", f"t{MAX_LOGIN_LINKS}")


@pytest.mark.parametrize(
    ("given", "expected", "same"),
    [
        ("abc", "abc", True),
        ("abd", "abc", False),
        ("", "abc", False),
        (None, "abc", False),
        ("ab", "abc", False),
    ],
)
def test_same_secret(given: str | None, expected: str, same: bool) -> None:
    assert same_secret(given, expected) is same


# -- load history -------------------------------------------------------------------------------


def test_load_percentages_from_a_load_check() -> None:
    load = {
        "currentLoad": 37.5,
        "memUsed": 300,
        "memFree": 100,
        "fsSize": [{"use": 12.0}, {"use": 81.5}, "junk"],
    }
    assert load_percentages(load) == (37.5, 75.0, 81.5)


@pytest.mark.parametrize(
    "load",
    [{}, {"currentLoad": "x", "memUsed": True, "memFree": None, "fsSize": None}, {"fsSize": [{"use": "9"}]}],
)
def test_load_percentages_of_junk_are_zero(load: dict[str, Any]) -> None:
    assert load_percentages(load) == (0.0, 0.0, 0.0)


def test_load_percentages_are_clamped() -> None:
    assert load_percentages({"currentLoad": 250, "fsSize": [{"use": -5}]}) == (100.0, 0.0, 0.0)


def test_history_keeps_the_last_point_of_each_minute() -> None:
    history = LoadHistory()
    start = 60.0 * 1_000_000
    history.add(start + 5, 10, 20, 30)
    history.add(start + 50, 11, 21, 31)  # same minute: replaces
    history.add(start + 65, 12, 22, 32)
    assert history.points(start + 70) == [(int(start), 11.0, 21.0, 31.0), (int(start) + 60, 12.0, 22.0, 32.0)]


def test_history_keeps_one_hour_and_no_more() -> None:
    history = LoadHistory()
    start = 60.0 * 2_000_000
    for minute in range(HISTORY_MINUTES * 2):
        history.add(start + 60 * minute, minute, 0, 0)
    now = start + 60 * (HISTORY_MINUTES * 2 - 1)
    points = history.points(now)
    assert len(points) == HISTORY_MINUTES
    assert [p[1] for p in points] == [float(m) for m in range(HISTORY_MINUTES, HISTORY_MINUTES * 2)]
    # an hour later with no heartbeats, nothing is left to draw
    assert history.points(now + 60 * HISTORY_MINUTES) == []


def test_history_is_small() -> None:
    history = LoadHistory()
    size = history._minutes.buffer_info()[1] * history._minutes.itemsize
    size += history._values.buffer_info()[1] * history._values.itemsize
    assert size <= 1024


# -- fleet rows ---------------------------------------------------------------------------------


def record(hub_id: str, state: str = "connected", **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": hub_id,
        "state": state,
        "lastHeartbeat": "2026-12-03T10:15:42.000Z",
        "info": {"lastConnected": "2026-12-03T09:00:00.000Z"},
        "version": "0.1.0",
        "tags": ["edge"],
        "instances": ["i1", "i2"],
        "sequences": ["s1"],
        "load": {"currentLoad": 20, "memUsed": 1, "memFree": 3, "fsSize": [{"use": 40}]},
    }
    base.update(extra)
    return base


def test_hub_row_shows_what_the_page_needs() -> None:
    row = hub_row(record("h1"))
    assert row == {
        "id": "h1",
        "description": "",
        "state": "healthy",
        "heartbeat": "2026-12-03T10:15:42.000Z",
        "connected": "2026-12-03T09:00:00.000Z",
        "disconnected": None,
        "cpu": 20,
        "memory": 25,
        "disk": 40,
        "version": "0.1.0",
        "tags": ["edge"],
        "instances": 2,
        "sequences": 1,
    }


@pytest.mark.parametrize(
    ("api_state", "shown"),
    [
        ("connected", "healthy"),
        ("unhealthy", "unhealthy"),
        ("disconnected", "disconnected"),
        ("odd", "disconnected"),
    ],
)
def test_hub_row_states(api_state: str, shown: str) -> None:
    assert hub_row(record("h", api_state))["state"] == shown


def test_hub_row_without_load_or_lists() -> None:
    row = hub_row({"id": "bare"})
    assert (row["cpu"], row["memory"], row["disk"], row["instances"], row["tags"]) == (
        None,
        None,
        None,
        0,
        [],
    )


def test_row_key_ignores_heartbeat_seconds_but_not_the_minute() -> None:
    base = hub_row(record("h"))
    later_same_minute = hub_row(record("h", lastHeartbeat="2026-12-03T10:15:59.000Z"))
    next_minute = hub_row(record("h", lastHeartbeat="2026-12-03T10:16:01.000Z"))
    assert row_key(base) == row_key(later_same_minute)
    assert row_key(base) != row_key(next_minute)


@pytest.mark.parametrize(
    "change",
    [
        {"state": "unhealthy"},
        {"tags": ["edge", "pi"]},
        {"instances": []},
        {"version": "0.2.0"},
        {"description": "lab"},
        {"load": {"currentLoad": 90}},
        {"info": {"lastDisconnected": "2026-12-03T10:00:00.000Z"}},
    ],
)
def test_row_key_changes_with_anything_shown(change: dict[str, Any]) -> None:
    assert row_key(hub_row(record("h"))) != row_key(hub_row(record("h", **change)))


def fleet_row(data: dict[str, Any]) -> FleetRow:
    row = hub_row(data)
    return FleetRow(row["id"], row, row_key(row), row_html(row, "/console"), json.dumps(row))


def test_snapshot_filters_and_counts() -> None:
    snapshot = FleetSnapshot.of(
        [
            fleet_row(record("a", tags=["edge", "pi"])),
            fleet_row(record("b", "unhealthy", tags=["edge"])),
            fleet_row(record("c", "disconnected", tags=[])),
        ]
    )
    assert [r.id for r in snapshot.select(None, None)] == ["a", "b", "c"]
    assert [r.id for r in snapshot.select("edge", None)] == ["a", "b"]
    assert [r.id for r in snapshot.select("edge", "unhealthy")] == ["b"]
    assert [r.id for r in snapshot.select("pi", "disconnected")] == []
    assert snapshot.select(None, None) is snapshot.rows
    assert snapshot.all_tags == ["edge", "pi"]
    assert snapshot.all_counts == {"total": 3, "healthy": 1, "unhealthy": 1, "disconnected": 1}
    edge = snapshot.select("edge", None)
    assert snapshot.counts_of(edge, "edge", None) == {
        "total": 2,
        "healthy": 1,
        "unhealthy": 1,
        "disconnected": 0,
    }
    assert snapshot.counts_of(snapshot.rows, None, None) is snapshot.all_counts
    assert FleetSnapshot.counts([]) == {"total": 0, "healthy": 0, "unhealthy": 0, "disconnected": 0}


def test_row_html_has_a_cell_per_field_in_order() -> None:
    html = row_html(hub_row(record("h1", description="press <4>")), "/console")
    assert html.startswith(
        '<tr id="hub-h1"><td><a href="/console/hubs/h1">h1</a><small>press &lt;4&gt;</small></td>'
    )
    cells = html.count("<td>")
    assert cells == len(FIELDS)
    assert '<span class="state healthy">healthy</span>' in html
    assert "<td>2026-12-03 10:15</td>" in html  # the heartbeat to the minute, as the key
    assert "<td>20%</td><td>25%</td><td>40%</td>" in html
    assert "<td>edge</td><td>2</td><td>2026-12-03 09:00</td><td></td></tr>" in html


def test_row_html_escapes_what_a_hub_reports() -> None:
    nasty = '"><script>alert(1)</script>'
    html = row_html(hub_row(record("h2", version=nasty, tags=[nasty], description=nasty)), "/console")
    assert "<script>" not in html and html.count("&lt;script&gt;") == 3
    assert "never" in row_html(hub_row({"id": "h3"}), "/console")


@pytest.mark.parametrize(
    ("stamp", "shown"),
    [("2026-12-03T10:15:42.000Z", "2026-12-03 10:15"), (None, ""), ("", ""), ("2026-12", "")],
)
def test_shown_time(stamp: Any, shown: str) -> None:
    assert shown_time(stamp) == shown


def test_chart_draws_each_minute_as_a_step() -> None:
    from cpm.console.app import _chart

    now = 60.0 * 3_000_000
    chart = _chart([(int(now) - 120, 10.0, 50.0, 90.0)], now)
    # one point still draws a line: across its minute, 10 of 600 units, near the right end
    assert chart["lines"]["cpu"] == "580.0,90.0 590.0,90.0"
    assert chart["lines"]["disk"] == "580.0,10.0 590.0,10.0"
    assert chart["count"] == 1
    old = _chart([(int(now) - 3600, 0.0, 0.0, 0.0), (int(now) - 60, 100.0, 0.0, 0.0)], now)
    assert old["lines"]["cpu"] == "0.0,100.0 10.0,100.0 590.0,0.0 600.0,0.0"


class FakeSessions:
    """What FleetView asks of HubSessions, for hubs with no link."""

    def __init__(self) -> None:
        self.records = 0

    def state(self, hub_id: str) -> str:
        return "disconnected"

    def last_report(self, hub_id: str) -> None:
        return None

    def record(self, hub: Any) -> dict[str, Any]:
        self.records += 1
        return {**hub.record(), "state": "disconnected"}


async def test_fleet_view_makes_a_row_again_only_when_its_hub_changed(autojump_clock: Any) -> None:
    import dataclasses

    import trio

    from cpm.console.fleet import SNAPSHOT_SECONDS, FleetView
    from cpm.registry import Hub

    hubs = [Hub(f"sth-{n}", "s", b"k" * 32, f"hub {n}", ("edge",), 1_700_000_000.0) for n in range(3)]
    sessions = FakeSessions()

    async def list_hubs(space: str) -> list[Hub]:
        return list(hubs)

    view = FleetView(sessions, list_hubs, "/console")  # type: ignore[arg-type]
    first = await view.snapshot("s")
    assert [row.id for row in first.rows] == ["sth-0", "sth-1", "sth-2"] and sessions.records == 3
    assert await view.snapshot("s") is first  # within SNAPSHOT_SECONDS: shared
    await trio.sleep(SNAPSHOT_SECONDS)
    hubs[1] = dataclasses.replace(hubs[1], description="moved")
    del hubs[2]
    second = await view.snapshot("s")
    assert sessions.records == 4  # only the changed hub was made again
    assert second.rows[0] is first.rows[0]
    assert "moved" in second.rows[1].html and second.all_counts["total"] == 2
