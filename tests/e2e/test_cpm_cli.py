"""End-to-end: the real `cpm` command line, as an operator would use it.

Rules: every command runs as a subprocess on a fresh data dir; the server listens on
127.0.0.1 port 0; admin commands run while it serves (SQLite in WAL mode); every
wait is bounded (subprocess and httpx timeouts).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx

from cpm.tls import client_ssl_context
from tests.cpm_helpers import cpm, run_cpm
from tests.helpers import ROOT

TIMEOUT = httpx.Timeout(20.0)


def verify(data_dir: Path) -> ssl.SSLContext:
    return client_ssl_context(ca_file=data_dir / "ca.pem")


def test_space_token_and_serve_over_tls(tmp_path: Path) -> None:
    data = tmp_path / "cpm"
    assert cpm(data, "space", "create", "demo") == "demo"
    assert cpm(data, "space", "list").split("\t")[0] == "demo"
    token = cpm(data, "token", "create", "--space", "demo", "--description", "ci")
    assert token.startswith("shk_")
    with run_cpm(data) as manager:
        assert manager.tls
        # The fingerprint the admin command prints is the one serve printed.
        assert cpm(data, "ca-fingerprint") == manager.fingerprint
        with httpx.Client(base_url=manager.base, verify=verify(data), timeout=TIMEOUT) as client:
            assert client.get("/api/v1/version").json()["service"] == "@scramjet/manager"
            listed = client.get(
                f"{manager.space_url('demo')}/list", headers={"Authorization": f"Bearer {token}"}
            )
            assert listed.status_code == 200
            assert listed.json() == []
            denied = client.get(f"{manager.space_url('demo')}/list")
            assert denied.status_code == 403
            assert denied.json() == {"message": "Forbidden"}
            # The CA is public, and matches the fingerprint.
            ca = client.get("/api/v1/ca.pem")
            assert ca.status_code == 200
            assert ca.content == (data / "ca.pem").read_bytes()
            # A token made while the server runs works at once; a revoked one stops at once.
            second = cpm(data, "token", "create", "--space", "demo")
            headers = {"Authorization": f"Bearer {second}"}
            assert client.get(f"{manager.space_url('demo')}/version", headers=headers).status_code == 200
            assert cpm(data, "token", "revoke", "--space", "demo", second).startswith("revoked ")
            assert client.get(f"{manager.space_url('demo')}/version", headers=headers).status_code == 403
        assert manager.alive()


def test_join_tokens_and_hub_list(tmp_path: Path) -> None:
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    join = cpm(data, "join-token", "create", "--space", "demo", "--ttl", "600")
    assert join.startswith("shj_")
    assert json.loads(cpm(data, "hub", "list", "--space", "demo", "--json")) == []
    assert cpm(data, "hub", "list", "--space", "demo").split() == [
        "ID",
        "STATE",
        "LAST",
        "SEEN",
        "TAGS",
        "DESCRIPTION",
    ]
    # Errors say why and exit non-zero.
    assert cpm(data, "join-token", "create", "--space", "nowhere", check=False) == ""
    assert cpm(data, "hub", "revoke", "sth-nope", "--reason", "x", check=False) == ""
    assert cpm(data, "space", "create", "demo", check=False) == ""


def test_restart_keeps_spaces_tokens_and_ca(tmp_path: Path) -> None:
    data = tmp_path / "cpm"
    with run_cpm(data, "--space", "alpha") as first:
        token = cpm(data, "token", "create", "--space", "alpha")
        fingerprint = first.fingerprint
    with run_cpm(data, "--space", "alpha") as second:
        assert second.fingerprint == fingerprint
        with httpx.Client(base_url=second.base, verify=verify(data), timeout=TIMEOUT) as client:
            response = client.get("/api/v1/spaces", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200
            assert [space["id"] for space in response.json()] == ["alpha"]


def test_plain_http_on_loopback_only(tmp_path: Path) -> None:
    data = tmp_path / "cpm"
    with run_cpm(data, "--no-tls", "--space", "demo") as manager:
        assert not manager.tls
        assert manager.fingerprint.startswith("none")
        with httpx.Client(base_url=manager.base, timeout=TIMEOUT) as client:
            assert client.get("/api/v1/version").status_code == 200
    # Refused on a non-loopback address, with exit code 2 and a reason.
    assert cpm(data, "serve", "--no-tls", "-H", "0.0.0.0", check=False) == ""


CPM_MODULE = (sys.executable, "-m", "cpm.main")


def test_admin_commands_say_which_data_dir_they_read(tmp_path: Path) -> None:
    """Without the manager's --data-dir an admin command names the dir it looked in, and makes nothing."""
    empty = tmp_path / "elsewhere"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cpm.main",
            "join-token",
            "create",
            "--space",
            "local",
            "--data-dir",
            str(empty),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 1 and done.stdout == ""
    assert f"no registry in {empty}" in done.stderr and "--data-dir" in done.stderr
    assert not (empty / "registry.sqlite3").exists()
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cpm.main",
            "join-token",
            "create",
            "--space",
            "local",
            "--data-dir",
            str(data),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 1 and f"space 'local' not found in {data}" in done.stderr
