"""End-to-end: the Python client and `si` through a real Space (cpm + a joined sth)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpm.tls import client_ssl_context
from spacehub import ManagerClient, SpaceClient
from tests.cpm_helpers import ManagerProcess, run_cpm
from tests.e2e.test_link_e2e import FAST, run_linked_sth, setup_space
from tests.helpers import ROOT, HubProcess, python_package

ECHO = "async def run(context, input, *args):\n    async for line in input:\n        yield line.upper()\n"


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ManagerProcess, HubProcess, str, Path]]:
    tmp = tmp_path_factory.mktemp("space")
    token, join = setup_space(tmp / "cpm")
    with run_cpm(tmp / "cpm", *FAST) as manager, run_linked_sth(tmp, manager, "--join-token", join) as hub:
        client = SpaceClient(
            manager.space_url("demo"), token=token, verify=client_ssl_context(ca_file=manager.ca_file)
        )
        deadline = time.monotonic() + 30
        while not [h for h in client.hubs() if h["isConnectionActive"]]:
            assert time.monotonic() < deadline, "the hub did not join"
            time.sleep(0.2)
        yield manager, hub, token, tmp


def test_space_client_drives_the_hub(space: tuple[ManagerProcess, HubProcess, str, Path]) -> None:
    manager, _hub, token, _tmp = space
    manager_client = ManagerClient(
        f"{manager.base}/api/v1", token=token, verify=client_ssl_context(ca_file=manager.ca_file)
    )
    assert "demo" in [
        s["id"] if isinstance(s, dict) and "id" in s else s.get("name") for s in manager_client.spaces()
    ]
    client = SpaceClient(
        manager.space_url("demo"), token=token, verify=client_ssl_context(ca_file=manager.ca_file)
    )
    assert client.version()["apiVersion"] == "v1"
    hub_id = client.hubs()[0]["id"]
    hub = client.hub(hub_id)
    assert hub.version()["apiVersion"] == "v1"
    sequence = hub.send_sequence(python_package(ECHO))
    instance = sequence.start()
    instance.input(b"through the link\n", content_type="text/plain")
    assert b"".join(instance.output()) == b"THROUGH THE LINK\n"
    deadline = time.monotonic() + 30
    while sequence.id not in [s.get("id") for s in client.sequences()]:  # aggregated from heartbeats
        assert time.monotonic() < deadline
        time.sleep(0.2)


def _si(config_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spacehub.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT), "SI_CONFIG_PATH": str(config_dir)},
    )


def test_si_through_the_space(space: tuple[ManagerProcess, HubProcess, str, Path], tmp_path: Path) -> None:
    manager, _hub, token, _tmp = space
    config = tmp_path / "si"
    for args in (
        ("config", "set", "env", "production"),
        ("config", "set", "middlewareApiUrl", f"{manager.base}/api/v1"),
        ("config", "set", "token", token),
        ("config", "set", "caFile", str(manager.ca_file)),
        ("space", "use", "demo"),
    ):
        done = _si(config, *args)
        assert done.returncode == 0, done.stderr
    hubs = json.loads(_si(config, "hub", "list", "--format", "json").stdout)
    assert hubs and hubs[0]["isConnectionActive"] is True
    assert _si(config, "hub", "use", hubs[0]["id"]).returncode == 0
    package = tmp_path / "echo"
    package.mkdir()
    (package / "package.json").write_text(
        json.dumps({"name": "echo", "version": "1.0.0", "main": "main.py", "engines": {"python3": "3"}})
    )
    (package / "main.py").write_text(ECHO)
    done = _si(config, "seq", "deploy", str(package), "--format", "json")
    assert done.returncode == 0, done.stderr
    source = tmp_path / "in.txt"
    source.write_text("via si\n")
    done = _si(config, "inst", "input", "-", str(source), "-t", "text/plain", "-e")
    assert done.returncode == 0, done.stderr
    done = _si(config, "inst", "output", "-")
    assert done.returncode == 0 and done.stdout == "VIA SI\n", done.stderr
    done = _si(config, "inst", "info", "nope")
    assert done.returncode == 1 and "not found" in done.stderr.lower()
