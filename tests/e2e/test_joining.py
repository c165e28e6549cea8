"""Join tokens over the Space API and the software the manager hands a new machine, against
a real `cpm` (and real hubs joining with the tokens). The whole line, run as root on a
machine with the real .deb, is in packaging/test-deb.sh (CI) and packaging/join-test.sh
(a fresh debootstrap machine under systemd, by hand)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import trio

from spacehub import SpaceClient
from spacehub.client import ApiError
from tests.cpm_helpers import CPM, ManagerProcess, cpm, run_cpm
from tests.e2e.test_link_e2e import (
    FAST,
    TIMEOUT,
    hub_status,
    run_linked_sth,
    space_client,
    ssl_context,
    wait_hub,
    wait_refused,
)

PACKAGE = "spacehub_9.9.9_all.deb"


def open_space(manager: ManagerProcess, token: str) -> SpaceClient:
    return SpaceClient(manager.space_url("demo"), token=token, verify=ssl_context(manager))


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A file for the manager to hand out: serving does not look inside it (the real
    package goes through the same routes in packaging/test-deb.sh)."""
    path = tmp_path / PACKAGE
    path.write_bytes(os.urandom(300_000))
    return path


async def test_join_tokens_over_the_api(tmp_path: Path, package: Path) -> None:
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    token = cpm(data, "token", "create", "--space", "demo")
    with run_cpm(data, *FAST, "--package", str(package)) as manager, open_space(manager, token) as space:
        made = space.create_join_token(expires=600, description="line 3 press", tags=["line3", "press"])
        assert made["token"].startswith("shj_") and made["tags"] == ["line3", "press"]
        assert made["expires"].endswith("Z") and made["description"] == "line 3 press"
        fingerprint_hex = manager.fingerprint.replace(":", "").lower()
        assert fingerprint_hex in made["command"] and made["token"] in made["command"]
        assert f"https://{manager.address}/install.sh" in made["command"]
        assert made["cloudInit"].startswith("#cloud-config\n") and made["token"] in made["cloudInit"]

        # Listings never carry a secret.
        with httpx.Client(verify=ssl_context(manager), timeout=TIMEOUT) as raw:
            listed = raw.get(
                f"{manager.space_url('demo')}/join-tokens", headers={"Authorization": f"Bearer {token}"}
            )
        assert listed.status_code == 200 and "shj_" not in listed.text
        assert [t["id"] for t in listed.json()] == [made["id"]]
        assert "shj_" not in cpm(data, "join-token", "list", "--space", "demo", "--all")

        # A hub joins with it and is shown as the token said; the token is then spent.
        with run_linked_sth(tmp_path, manager, "--join-token", made["token"]) as hub:
            async with space_client(manager, token) as client:
                record = await wait_hub(client)
            assert record["tags"] == ["line3", "press"] and record["description"] == "line 3 press"
            assert (await hub_status(hub))["id"] == record["id"]
        assert space.join_tokens() == []
        with run_linked_sth(tmp_path, manager, "--join-token", made["token"], name="second") as second:
            assert "already used" in (await wait_refused(second))["lastError"]

        # A revoked token lets no hub in.
        revoked = space.create_join_token()
        assert space.revoke_join_token(revoked["id"])["revoked"]
        assert space.join_tokens() == []
        with run_linked_sth(tmp_path, manager, "--join-token", revoked["token"], name="third") as third:
            assert "revoked" in (await wait_refused(third))["lastError"]
        with pytest.raises(ApiError) as missing:
            space.revoke_join_token("0123456789abcdef")
        assert missing.value.status == 404

        # An expired one leaves the listing (a hub refused with it: test_link_e2e).
        space.create_join_token(expires=1)
        await trio.sleep(1.2)
        assert space.join_tokens() == []
        assert manager.alive()


def test_bad_requests_are_refused_and_nothing_is_made(tmp_path: Path, package: Path) -> None:
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    token = cpm(data, "token", "create", "--space", "demo")
    auth = {"Authorization": f"Bearer {token}"}
    with (
        run_cpm(data, "--package", str(package)) as manager,
        httpx.Client(
            base_url=manager.space_url("demo"), verify=ssl_context(manager), timeout=TIMEOUT
        ) as client,
    ):
        bodies = [
            b'{"expires": -5}',
            b'{"expires": 1e9}',
            b'{"expires": "tomorrow"}',
            b'{"expires": "2020-01-01T00:00:00Z"}',
            b'{"expires": "2099-01-01T00:00:00"}',
            b'{"expires": true}',
            b'{"expires": NaN}',
            b'{"tags": {"a": 1}}',
            b'{"tags": [""]}',
            b'{"description": ["x"]}',
            b'{"colour": "red"}',
            b"[1, 2]",
            b"{" * 500,
        ]
        for body in bodies:
            answer = client.post(
                "/join-tokens", content=body, headers={**auth, "content-type": "application/json"}
            )
            assert answer.status_code == 400, (body, answer.text)
            assert answer.json()["error"]
        assert client.post("/join-tokens", json={}).status_code == 403  # no bearer token
        assert client.get("/join-tokens", headers=auth).json() == []
        assert manager.alive()


def test_the_manager_hands_out_its_package(tmp_path: Path, package: Path) -> None:
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    digest = hashlib.sha256(package.read_bytes()).hexdigest()
    with (
        run_cpm(data, "--package", str(package)) as manager,
        httpx.Client(base_url=manager.base, verify=ssl_context(manager), timeout=TIMEOUT) as client,
    ):
        script = client.get("/install.sh")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/x-shellscript")
        assert f"SPACEHUB_PACKAGE={PACKAGE}\n" in script.text
        assert f"SPACEHUB_PACKAGE_SHA256={digest}\n" in script.text
        assert f"SPACEHUB_LINK_URL=wss://{manager.address}\n" in script.text
        (tmp_path / "install.sh").write_text(script.text)
        subprocess.run(["sh", "-n", str(tmp_path / "install.sh")], check=True)
        assert client.get("/install/SHA256SUMS").text == f"{digest}  {PACKAGE}\n"
        served = client.get(f"/install/{PACKAGE}")
        assert served.status_code == 200 and hashlib.sha256(served.content).hexdigest() == digest
        other = client.get("/install/spacehub_0.0.1_all.deb")
        assert other.status_code == 404 and PACKAGE in other.json()["error"]
        # The command line makes the same line.
        line = cpm(data, "join-token", "create", "--space", "demo", "--command", "--package", str(package))
        assert manager.fingerprint.replace(":", "").lower() in line and "--join-token shj_" in line


async def test_without_a_package_the_manager_says_so(tmp_path: Path) -> None:
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    token = cpm(data, "token", "create", "--space", "demo")
    nowhere = tmp_path / "missing" / PACKAGE
    with run_cpm(data, "--package", str(nowhere)) as manager, open_space(manager, token) as space:
        made = space.create_join_token()
        assert made["command"] is None and made["cloudInit"] is None
        assert str(nowhere) in made["commandError"] and made["token"].startswith("shj_")
        with httpx.Client(base_url=manager.base, verify=ssl_context(manager), timeout=TIMEOUT) as client:
            assert client.get("/install/SHA256SUMS").status_code == 404
            assert "SPACEHUB_PACKAGE=''" in client.get("/install.sh").text
    create = ["join-token", "create", "--space", "demo", "--command"]
    done = subprocess.run(
        [*CPM, *create, "--data-dir", str(data), "--package", str(nowhere)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 1 and "no command" in done.stderr and done.stdout.startswith("shj_")


def test_the_line_stops_on_a_wrong_fingerprint(tmp_path: Path, package: Path) -> None:
    """The pasted line fetches the CA unchecked, so it must refuse one with another hash
    before it fetches or runs anything with it."""
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    token = cpm(data, "token", "create", "--space", "demo")
    with run_cpm(data, "--package", str(package)) as manager, open_space(manager, token) as space:
        line = space.create_join_token()["command"]
        good = manager.fingerprint.replace(":", "").lower()
        bad = ("0" if good[0] != "0" else "1") + good[1:]
        assert good in line
        done = subprocess.run(
            ["sh", "-c", line.replace(good, bad)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode != 0
        assert "does not match the fingerprint" in done.stderr
        assert space.join_tokens()[0]["id"]  # nothing used it


def test_cloud_init_user_data_is_valid(tmp_path: Path, package: Path) -> None:
    if shutil.which("cloud-init") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have cloud-init (.ci/run installs it)")
        pytest.skip("cloud-init is not installed (apt-get install cloud-init)")
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    token = cpm(data, "token", "create", "--space", "demo")
    with run_cpm(data, "--package", str(package)) as manager, open_space(manager, token) as space:
        user_data = space.create_join_token(description='it\'s a "pi"', tags=["x"])["cloudInit"]
    path = tmp_path / "user-data"
    path.write_text(user_data)
    done = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Valid cloud-config" in done.stdout
