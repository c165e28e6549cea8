"""End-to-end: what only the Podman runtime does (limits, network, labels, leftovers).

Rules: a real `sth --runtime podman` on 127.0.0.1 per test that needs its own; every
wait bounded; skipped as a whole where `podman info` fails. The runtime-neutral
behaviour is covered by the other e2e modules, which run once per runtime.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import trio

from agent.runtimes.podman import LABEL_HUB, LABEL_INSTANCE, container_name
from tests.e2e.conftest import podman_works
from tests.helpers import HubProcess, python_package, run_sth

pytestmark = pytest.mark.skipif(not podman_works(), reason="podman runtime: `podman info` fails here")

TIMEOUT = httpx.Timeout(20.0)

MEMORY_HOG = """
def run(context, input, *args):
    hog = b"x" * (256 * 1024 * 1024)  # written, so every page is really used
    return str(len(hog))
"""

DIAL = """
import socket
def run(context, input, port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
        return "connected\\n"
    except OSError as exc:
        return f"{type(exc).__name__}\\n"
"""

SANDBOX = """
import os
def attempt(path):
    try:
        with open(path, "w") as file:
            file.write("x")
        return "written"
    except OSError as exc:
        return type(exc).__name__
def run(context, input, *args):
    return " ".join(
        [attempt("/package/new.txt"), attempt("/etc/new.txt"), attempt("new.txt"), attempt("/tmp/new.txt")]
    ) + "\\n"
"""

FOREVER = """
import asyncio
async def run(context, input, *args):
    await asyncio.sleep(3600)
"""


@pytest.fixture(scope="module")
def podman_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    root: Path = tmp_path_factory.mktemp("podman-sequences")
    with run_sth(root, "--runtime", "podman", "--instance-lifetime", "30", "--kill-grace", "1") as process:
        yield process
        assert process.alive(), "sth died during the tests"


@pytest.fixture
async def client(podman_hub: HubProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=podman_hub.url, timeout=TIMEOUT) as http:
        yield http


def hub_id(root: Path) -> str:
    return (root / ".hub-id").read_text().strip()


def podman_json(*args: str) -> list[dict[str, object]]:
    result = subprocess.run(["podman", *args], capture_output=True, check=True, timeout=30)
    return list(json.loads(result.stdout or b"[]"))


def containers_of(hub: str) -> list[str]:
    result = subprocess.run(
        ["podman", "ps", "-a", "--filter", f"label={LABEL_HUB}={hub}", "--format", "{{.Names}}"],
        capture_output=True,
        check=True,
        timeout=30,
    )
    return result.stdout.decode().split()


async def start(client: httpx.AsyncClient, source: str, **payload: object) -> str:
    response = await client.post("/sequence", content=python_package(source))
    assert response.status_code == 202, response.text
    response = await client.post(f"/sequence/{response.json()['id']}/start", json=payload)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


async def wait_status(client: httpx.AsyncClient, instance_id: str, *statuses: str) -> dict[str, object]:
    with trio.fail_after(30):
        while True:
            info = (await client.get(f"/instance/{instance_id}")).json()
            if info["status"] in statuses:
                return dict(info)
            await trio.sleep(0.1)


async def output(client: httpx.AsyncClient, instance_id: str) -> bytes:
    with trio.fail_after(20):
        return (await client.get(f"/instance/{instance_id}/output")).content


async def test_config_reports_podman_and_its_limits(client: httpx.AsyncClient) -> None:
    config = (await client.get("/config")).json()
    assert config["runtimeAdapter"] == "podman"
    podman = config["podman"]
    assert podman["available"] is True and podman["network"] == "none"
    assert set(podman["limitsEnforced"]) == {"memory", "cpu", "pids"}


async def test_memory_hog_is_killed_by_its_limit(client: httpx.AsyncClient) -> None:
    instance_id = await start(client, MEMORY_HOG, limits={"memory": 64})
    final = await wait_status(client, instance_id, "completed", "errored")
    assert final["status"] == "errored"
    terminated = final["terminated"]
    assert isinstance(terminated, dict) and "memory limit" in terminated["reason"], terminated


async def test_network_none_refuses_a_local_server(client: httpx.AsyncClient) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[object] = []

    def accept() -> None:
        server.settimeout(10)
        with contextlib.suppress(OSError):
            accepted.append(server.accept())

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = server.getsockname()[1]
        instance_id = await start(client, DIAL, args=[port])
        assert await output(client, instance_id) == b"ConnectionRefusedError\n"
        assert not accepted
    finally:
        server.close()
        thread.join(timeout=15)


async def test_root_and_package_are_read_only_scratch_is_writable(client: httpx.AsyncClient) -> None:
    instance_id = await start(client, SANDBOX)
    assert await output(client, instance_id) == b"OSError OSError written written\n"


async def test_labels_and_container_stats_in_health(
    client: httpx.AsyncClient, podman_hub: HubProcess
) -> None:
    instance_id = await start(client, FOREVER)
    name = container_name(hub_id(podman_hub.root), instance_id)
    (inspected,) = await trio.to_thread.run_sync(podman_json, "inspect", name)
    labels = inspected["Config"]["Labels"]  # type: ignore[index]
    assert labels[LABEL_HUB] == hub_id(podman_hub.root) and labels[LABEL_INSTANCE] == instance_id
    host_config = inspected["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True  # type: ignore[index]
    assert host_config["Memory"] == 512 * 1024 * 1024  # type: ignore[index]  # the hub default
    health = (await client.get(f"/instance/{instance_id}/health")).json()
    assert health["healthy"] is True and health["container"]["memUsage"]
    response = await client.post(f"/instance/{instance_id}/_kill", json={})
    assert response.status_code == 202
    final = await wait_status(client, instance_id, "completed", "errored")
    assert final["status"] == "completed"
    with trio.fail_after(10):
        while name in await trio.to_thread.run_sync(containers_of, hub_id(podman_hub.root)):
            await trio.sleep(0.1)


def test_a_container_nobody_takes_back_is_removed_at_the_next_start(tmp_path: Path) -> None:
    """A hub killed with -9 and its instance's holder too (as a reboot ends it, minus the
    container): the next hub lists the instance as ended and removes the container.
    (A container whose holder lives is taken back: tests/e2e/test_survival.py.)"""
    with (
        run_sth(tmp_path, "--runtime", "podman", "--kill-grace", "1", keep_instances=True) as first,
        httpx.Client(base_url=first.url, timeout=TIMEOUT) as http,
    ):
        sequence_id = http.post("/sequence", content=python_package(FOREVER)).json()["id"]
        instance_id = http.post(f"/sequence/{sequence_id}/start", json={}).json()["id"]
        name = container_name(hub_id(tmp_path), instance_id)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
    holders = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "holder.py" in " ".join(p.info["cmdline"] or []) and str(tmp_path) in " ".join(p.info["cmdline"])
    ]
    assert len(holders) == 1, holders
    holders[0].kill()
    holders[0].wait(10)
    assert name in containers_of(hub_id(tmp_path)), "the killed hub's container should still be there"
    with run_sth(tmp_path, "--runtime", "podman") as second:
        assert second.alive()
        deadline = time.monotonic() + 10
        while name in containers_of(hub_id(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert name not in containers_of(hub_id(tmp_path))
        info = httpx.get(f"{second.url}/instance/{instance_id}", timeout=TIMEOUT).json()
        assert info["status"] == "errored" and "no hub ran" in info["terminated"]["reason"]
