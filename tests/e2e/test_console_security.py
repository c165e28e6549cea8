"""The console refuses every state-changing request without a live session and its CSRF token,
and no page, header or cookie it sends carries an API token. Against a real `cpm` and hub."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from cpm.api.app import ManagerApp
from cpm.config import ManagerConfig
from cpm.registry import Registry
from cpm.service import Manager
from tests.console_helpers import ConsoleSpace, console_space, package_bytes, page_csrf, sign_in

SECURITY_HEADERS = {
    "content-security-policy": "script-src 'self'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def console_post_routes(tmp_path: Path) -> list[str]:
    """Every POST route the console serves, from the manager's own route table."""
    registry = Registry(":memory:")
    (tmp_path / "routes").mkdir()
    try:
        app = ManagerApp(Manager(ManagerConfig(data_dir=tmp_path / "routes"), registry))
        return [
            pattern
            for method, pattern in app.router.routes()
            if method == "POST" and pattern.startswith("/console")
        ]
    finally:
        registry.close()


def fill(pattern: str, hub_id: str, sequence_id: str, instance_id: str) -> str:
    values = {"id": hub_id, "seq": sequence_id, "inst": instance_id, "token": "jt-0000", "code": "x"}
    return re.sub(r":(\w+)", lambda m: values[m.group(1)], pattern)


def state(space: ConsoleSpace) -> tuple[object, ...]:
    """What a refused request must not have changed."""
    with space.api() as api:
        return (
            sorted(h["id"] for h in api.get("/list").json()),
            api.get("/join-tokens").json(),
            sorted(i["id"] for i in api.get("/instances", params={"detail": "true"}).json()),
            sorted(s["id"] for s in api.get("/sequences", params={"detail": "true"}).json()),
        )


def test_every_state_changing_request_needs_a_session_and_its_csrf_token(tmp_path: Path) -> None:
    routes = console_post_routes(tmp_path)
    guarded = [r for r in routes if r not in ("/console/login",)]
    assert len(guarded) >= 10, routes
    with console_space(tmp_path, 1) as space, space.browser() as browser:
        hub_id = space.hub_ids[0]
        page = sign_in(browser, space.token)
        csrf = page_csrf(page.text)
        uploaded = browser.post(
            f"/console/hubs/{hub_id}/sequences", content=package_bytes(), headers={"x-csrf-token": csrf}
        )
        sequence_id = uploaded.json()["id"]
        started = browser.post(f"/console/hubs/{hub_id}/sequences/{sequence_id}/start", data={"csrf": csrf})
        instance_id = started.headers["location"].rsplit("/", 1)[1]
        browser.post("/console/join", data={"csrf": csrf, "description": "kept"})
        before = state(space)

        with space.browser() as stranger:
            for pattern in guarded:
                url = fill(pattern, hub_id, sequence_id, instance_id)
                # No session at all, even with a CSRF value that is right for another session.
                answer = stranger.post(url, data={"csrf": csrf})
                assert answer.status_code == 403, (url, answer.text)
        for pattern in guarded:
            url = fill(pattern, hub_id, sequence_id, instance_id)
            for form, headers in (({}, {}), ({"csrf": "wrong"}, {}), ({}, {"x-csrf-token": "wrong"})):
                answer = browser.post(url, data=form, headers=headers)
                assert answer.status_code == 403, (url, form, headers, answer.text)
                assert "CSRF" in answer.json()["error"]
        assert state(space) == before
        # The session is still there: refusing did not sign it out either.
        assert browser.get("/console/fleet").status_code == 200

        # The sign-in form has its own CSRF check (a double-submit cookie).
        with space.browser() as other:
            forged = other.post("/console/login", data={"token": space.token, "csrf": "guess"})
            assert forged.status_code == 403 and "console_login" not in str(other.cookies)


def test_no_page_header_or_cookie_carries_a_token(tmp_path: Path) -> None:
    with console_space(tmp_path, 1) as space, space.browser() as browser:
        hub_id = space.hub_ids[0]
        responses: list[httpx.Response] = []
        responses.append(browser.get("/console/login"))
        page = sign_in(browser, space.token)
        responses += [*page.history, page]
        csrf = page_csrf(page.text)
        uploaded = browser.post(
            f"/console/hubs/{hub_id}/sequences", content=package_bytes(), headers={"x-csrf-token": csrf}
        )
        responses.append(uploaded)
        started = browser.post(
            f"/console/hubs/{hub_id}/sequences/{uploaded.json()['id']}/start", data={"csrf": csrf}
        )
        responses.append(started)
        for path in (
            "/console/fleet",
            "/console/topics",
            "/console/join",
            f"/console/hubs/{hub_id}",
            started.headers["location"],
            "/console/hubs/sth-missing",
            "/console/static/console.js",
        ):
            responses.append(browser.get(path))
        for response in responses:
            text = response.text + str(response.headers)
            assert space.token not in text, response.url
            assert "shk_" not in text, response.url
            if response.headers.get("content-type", "").startswith("text/html"):
                for name, value in SECURITY_HEADERS.items():
                    assert value in response.headers.get(name, ""), (response.url, name)
        assert all(space.token not in value for value in browser.cookies.values())

        # An open redirect after sign-in is refused: only console paths.
        with space.browser() as other:
            form = other.get("/console/login")
            login_csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert login_csrf is not None
            moved = other.post(
                "/console/login",
                data={"csrf": login_csrf.group(1), "token": space.token, "next": "//evil.example/"},
            )
            assert moved.status_code == 303 and moved.headers["location"] == "/console/fleet"


def test_revoking_the_api_token_signs_the_console_out(tmp_path: Path) -> None:
    from tests.cpm_helpers import cpm

    with console_space(tmp_path, 1) as space, space.browser() as browser:
        sign_in(browser, space.token)
        assert browser.get("/console/fleet").status_code == 200
        cpm(space.data, "token", "revoke", "--space", "demo", space.token)
        refused = browser.get("/console/fleet")
        assert refused.status_code == 303 and refused.headers["location"].startswith("/console/login")
