"""The console against a real `cpm` with real hubs, over HTTPS, as a browser without JavaScript
sees it (the browser with JavaScript is in test_console_browser.py)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from tests.console_helpers import (
    WAIT,
    console_space,
    form_csrf,
    package_bytes,
    page_csrf,
    read_events,
    sign_in,
)


def text_of(pairs: list[tuple[str, str]]) -> str:
    """What a tail showed: its messages' text, in order."""
    return "".join(json.loads(data) for event, data in pairs if event == "message")


def test_sign_in_fleet_filters_and_sign_out(tmp_path: Path) -> None:
    with console_space(tmp_path, 2) as space, space.browser() as browser:
        assert browser.get("/").headers["location"] == "/console/fleet"
        # Not signed in: pages send to the form, which says nothing of the Space.
        refused = browser.get("/console/fleet")
        assert refused.status_code == 303 and refused.headers["location"].startswith("/console/login")

        wrong = sign_in(browser, "shk_not-a-token")
        assert wrong.status_code == 403 and "opens no Space" in wrong.text

        fleet = sign_in(browser, space.token)
        assert fleet.status_code == 200 and str(fleet.url).endswith("/console/fleet")
        cookie = next(v for k, v in fleet.history[-1].headers.multi_items() if k == "set-cookie")
        for attribute in ("HttpOnly", "SameSite=Strict", "Secure", "Path=/console", "Max-Age="):
            assert attribute in cookie, cookie
        for hub_id in space.hub_ids:
            assert f'id="hub-{hub_id}"' in fleet.text
        assert '<b data-count="total">2</b>' in fleet.text
        assert '<b data-count="healthy">2</b>' in fleet.text
        assert "line1" in fleet.text and "line2" in fleet.text

        one = browser.get("/console/fleet", params={"tag": "line2"})
        assert '<b data-count="total">1</b>' in one.text and one.text.count('<tr id="hub-') == 1
        none = browser.get("/console/fleet", params={"state": "disconnected"})
        assert '<b data-count="total">0</b>' in none.text
        bad = browser.get("/console/fleet", params={"state": "sleepy"})
        assert bad.status_code == 400 and "state is one of" in bad.text

        topics = browser.get("/console/topics")
        assert topics.status_code == 200 and "Topics of demo" in topics.text

        out = browser.post("/console/logout", data={"csrf": form_csrf(fleet.text)})
        assert out.status_code == 303 and out.headers["location"] == "/console/login"
        assert browser.get("/console/fleet").status_code == 303


def test_fleet_live_updates_are_server_sent_events(tmp_path: Path) -> None:
    with console_space(tmp_path, 1) as space, space.browser() as browser:
        sign_in(browser, space.token)
        with browser.stream(
            "GET", "/console/fleet/events", headers={"accept": "text/event-stream"}
        ) as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            pairs = read_events(events, lambda p: any(e == "hubs" for e, _ in p))
        update = json.loads(next(data for event, data in pairs if event == "hubs"))
        assert update["counts"]["healthy"] == 1 and update["removed"] == []
        (row,) = update["rows"]
        assert row["id"] == space.hub_ids[0] and row["state"] == "healthy"
        assert row["tags"] == ["edge", "line1"] and row["version"]
        assert row["cpu"] is not None and row["heartbeat"].endswith("Z")


def test_hub_page_upload_start_tail_and_stop(tmp_path: Path) -> None:
    with console_space(tmp_path, 1) as space, space.browser() as browser:
        hub_id = space.hub_ids[0]
        sign_in(browser, space.token)
        page = browser.get(f"/console/hubs/{hub_id}")
        assert page.status_code == 200 and 'id="load-chart"' in page.text  # a heartbeat came with load
        csrf = page_csrf(page.text)

        # The page's script uploads the file as the raw body, its CSRF token in a header.
        uploaded = browser.post(
            f"/console/hubs/{hub_id}/sequences",
            content=package_bytes(),
            headers={"x-csrf-token": csrf, "content-type": "application/octet-stream"},
        )
        assert uploaded.status_code == 200, uploaded.text
        sequence_id = uploaded.json()["id"]
        page = browser.get(f"/console/hubs/{hub_id}")
        assert f'data-sequence="{sequence_id}"' in page.text and "echo-py" in page.text

        bad = browser.post(
            f"/console/hubs/{hub_id}/sequences/{sequence_id}/start",
            data={"csrf": csrf, "args": "[1,", "appConfig": ""},
        )
        assert bad.status_code == 400 and "args is not valid JSON" in bad.text

        started = browser.post(
            f"/console/hubs/{hub_id}/sequences/{sequence_id}/start",
            data={"csrf": csrf, "args": '["> "]', "appConfig": "{}"},
        )
        assert started.status_code == 303
        instance_path = started.headers["location"]
        instance_id = instance_path.rsplit("/", 1)[1]
        instance = browser.get(instance_path)
        assert instance.status_code == 200 and 'id="instance-status">running' in instance.text

        with browser.stream("GET", f"{instance_path}/tail/output") as tail:
            with space.api() as api:
                sent = api.post(
                    f"/sth/{hub_id}/api/v1/instance/{instance_id}/input",
                    content=b"one\ntwo\n",
                    headers={"content-type": "text/plain", "x-end-stream": "false"},
                )
                assert sent.status_code in (200, 202), sent.text
            pairs = read_events(
                tail, lambda p: "two" in "".join(json.loads(d) for e, d in p if e == "message")
            )
        assert "> one\n> two\n" in "".join(json.loads(data) for event, data in pairs if event == "message")

        with browser.stream("GET", f"/console/hubs/{hub_id}/tail/log") as log:
            pairs = read_events(log, lambda p: len(p) >= 1)
        assert pairs and pairs[0][0] == "message"

        stopped = browser.post(f"{instance_path}/stop", data={"csrf": csrf, "next": instance_path})
        assert stopped.status_code == 303 and stopped.headers["location"] == instance_path
        deadline = time.monotonic() + WAIT
        while 'id="instance-status">running' in browser.get(instance_path).text:
            assert time.monotonic() < deadline
            time.sleep(0.2)

        deleted = browser.post(f"/console/hubs/{hub_id}/sequences/{sequence_id}/delete", data={"csrf": csrf})
        assert deleted.status_code in (303, 409), deleted.text


def test_join_page_makes_a_token_with_its_line_and_cloud_init(tmp_path: Path) -> None:
    package = tmp_path / "spacehub_9.9.9_all.deb"
    package.write_bytes(os.urandom(1000))
    with (
        console_space(tmp_path, 1, "--package", str(package)) as space,
        space.browser() as browser,
    ):
        page = sign_in(browser, space.token)
        csrf = page_csrf(page.text)
        made = browser.post(
            "/console/join",
            data={"csrf": csrf, "description": "press 4", "tags": "line4, press", "hours": "2"},
        )
        assert made.status_code == 200, made.text
        command = re.search(r'<pre class="copyable" id="join-command">([^<]+)</pre>', made.text)
        assert command is not None and "install.sh" in command.group(1)
        assert 'id="join-cloud-init">#cloud-config' in made.text
        assert 'data-copy="join-command"' in made.text and 'data-copy="join-cloud-init"' in made.text
        token = re.search(r'id="join-token">(shj_[^<]+)<', made.text)
        assert token is not None and token.group(1) in command.group(1)

        with space.api() as api:
            (listed,) = api.get("/join-tokens").json()
        assert listed["description"] == "press 4" and listed["tags"] == ["line4", "press"]
        later = browser.get("/console/join")
        assert listed["id"] in later.text and "shj_" not in later.text  # shown once, then never

        revoked = browser.post(f"/console/join/{listed['id']}/revoke", data={"csrf": csrf})
        assert revoked.status_code == 303
        with space.api() as api:
            assert api.get("/join-tokens").json() == []

        # Revoking a hub from the page: its link is closed and the fleet shows it no more.
        hub_id = space.hub_ids[0]
        gone = browser.post(f"/console/hubs/{hub_id}/revoke", data={"csrf": csrf})
        assert gone.status_code == 303
        deadline = time.monotonic() + WAIT
        while f'id="hub-{hub_id}"' in browser.get("/console/fleet").text:
            assert time.monotonic() < deadline
            time.sleep(0.3)


def test_an_unknown_hub_is_a_404_page(tmp_path: Path) -> None:
    with console_space(tmp_path, 1) as space, space.browser() as browser:
        sign_in(browser, space.token)
        missing = browser.get("/console/hubs/sth-00000000")
        assert missing.status_code == 404 and "text/html" in missing.headers["content-type"]
        assert browser.get("/console/static/nope.js").status_code == 404
        script = browser.get("/console/static/console.js")
        assert script.status_code == 200 and "EventSource" in script.text
