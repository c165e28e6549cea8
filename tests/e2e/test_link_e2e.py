"""End-to-end: a real `sth` joins a real `cpm`, and the Space API drives the hub through the link.

Rules: both daemons are started as an operator would (subprocesses, flags only), on
127.0.0.1 with free ports, the manager over TLS with its own CA (the hub is given
``ca.pem``); every wait is bounded (``fail_after``, httpx and subprocess timeouts);
both processes must still be alive at the end of each test. The manager runs with
``--heartbeat-interval 1`` so health follows within seconds.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from cpm.tls import client_ssl_context
from tests.cpm_helpers import ManagerProcess, cpm, run_cpm
from tests.helpers import HubProcess, python_package, run_sth

pytest.importorskip("agent.link.client")

TIMEOUT = httpx.Timeout(20.0)
#: Seconds to wait for a hub to (re)connect: the hub's backoff starts at about a second.
LINK_WAIT = 30.0
FAST = ("--heartbeat-interval", "1")

ECHO = """
async def run(context, input, *args):
    async for chunk in input:
        yield chunk
"""

EVENTS = """
import asyncio
async def run(context, input, *args):
    context.on("test-event", lambda message: context.emit("test-response", f"reply to {message}"))
    await asyncio.sleep(3600)
"""

FLOOD = """
import asyncio, sys
async def run(context, input, *args):
    line = "x" * 1000 + "\\n"
    while True:
        sys.stdout.write(line)
        await asyncio.sleep(0)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def run_linked_sth(tmp: Path, manager: ManagerProcess, *args: str, name: str = "hub") -> Iterator[HubProcess]:
    """A real `sth` with its own data dir, linked to ``manager`` (TLS, pinned to its CA)."""
    data = tmp / name
    data.mkdir(exist_ok=True)
    link = ["--data-dir", str(data), "--cpm-url", manager.link_url, "--space", "demo"]
    link += ["--cpm-ca", str(manager.ca_file)]
    with run_sth(data / "sequences", *link, *args, "--instance-lifetime", "30", "--kill-grace", "1") as hub:
        yield hub


def ssl_context(manager: ManagerProcess) -> ssl.SSLContext:
    return client_ssl_context(ca_file=manager.ca_file)


@asynccontextmanager
async def space_client(manager: ManagerProcess, token: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=manager.space_url("demo"),
        headers={"Authorization": f"Bearer {token}"},
        verify=ssl_context(manager),
        timeout=TIMEOUT,
    ) as client:
        yield client


def setup_space(data: Path) -> tuple[str, str]:
    """Make space ``demo``; its API token and a join token."""
    cpm(data, "space", "create", "demo")
    return cpm(data, "token", "create", "--space", "demo"), cpm(
        data, "join-token", "create", "--space", "demo"
    )


async def wait_hub(
    space: httpx.AsyncClient, *, hub_id: str | None = None, healthy: bool = True
) -> dict[str, Any]:
    """The hub record once it is connected (and healthy, unless told otherwise)."""
    with trio.fail_after(LINK_WAIT):
        while True:
            hubs = (await space.get("/list")).json()
            for record in hubs:
                if hub_id is not None and record["id"] != hub_id:
                    continue
                if record["isConnectionActive"] and (record["healthy"] or not healthy):
                    return dict(record)
            await trio.sleep(0.2)


async def hub_status(hub: HubProcess) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        status: dict[str, Any] = (await client.get(f"{hub.url}/status")).json()
        return status


async def wait_refused(hub: HubProcess) -> dict[str, Any]:
    """The hub's link status once the manager refused it."""
    with trio.fail_after(LINK_WAIT):
        while True:
            link = (await hub_status(hub))["cpm"]
            if link.get("state") == "refused":
                return dict(link)
            await trio.sleep(0.2)


async def test_join_and_every_hub_route_through_the_space(tmp_path: Path) -> None:
    data = tmp_path / "cpm"
    token, join = setup_space(data)
    with run_cpm(data, *FAST) as manager, run_linked_sth(tmp_path, manager, "--join-token", join) as hub:
        async with space_client(manager, token) as space:
            record = await wait_hub(space)
            hub_id = record["id"]
            assert record["healthy"] is True
            assert "lastConnected" in record["info"]
            assert (await space.get(f"/sth/{hub_id}/info")).json()["id"] == hub_id
            base = f"/sth/{hub_id}/api/v1"

            version = await space.get(f"{base}/version")
            assert version.status_code == 200
            assert version.json()["service"] == "@scramjet/host"

            upload = await space.post(
                f"{base}/sequence",
                content=python_package(ECHO),
                headers={"content-type": "application/octet-stream"},
            )
            assert upload.status_code == 202, upload.text
            sequence_id = upload.json()["id"]
            # One hub id everywhere: the hub itself and its sequences go by the Space's id.
            assert (await space.get(f"{base}/status")).json()["id"] == hub_id
            assert (await space.get(f"{base}/sequence/{sequence_id}")).json()["location"] == hub_id
            started = await space.post(f"{base}/sequence/{sequence_id}/start", json={})
            assert started.status_code == 200, started.text
            instance_id = started.json()["id"]
            info = (await space.get(f"{base}/instance/{instance_id}")).json()
            assert info["sequence"]["location"] == hub_id
            sent = await space.post(
                f"{base}/instance/{instance_id}/input",
                content=b"hello\nworld\n",
                headers={"content-type": "text/plain"},
            )
            assert sent.status_code == 200, sent.text
            with trio.fail_after(20):
                output = b""
                async with space.stream("GET", f"{base}/instance/{instance_id}/output") as response:
                    assert response.status_code == 200
                    async for chunk in response.aiter_bytes():
                        output += chunk
            assert output == b"hello\nworld\n"

            # Events, and kill, through the link.
            upload = await space.post(
                f"{base}/sequence",
                content=python_package(EVENTS, name="events"),
                headers={"content-type": "application/octet-stream"},
            )
            events_id = (await space.post(f"{base}/sequence/{upload.json()['id']}/start", json={})).json()[
                "id"
            ]
            event = {"eventName": "test-event", "message": "foo"}
            with trio.fail_after(20):
                while True:
                    assert (
                        await space.post(f"{base}/instance/{events_id}/_event", json=event)
                    ).status_code == 200
                    reply = await space.get(f"{base}/instance/{events_id}/event/test-response")
                    if reply.status_code == 200 and reply.json() == "reply to foo":
                        break
                    await trio.sleep(0.2)

            # The aggregates follow the hub's heartbeats, each item naming its hub.
            with trio.fail_after(20):
                while True:
                    instances = (await space.get("/instances?detail=true")).json()
                    if any(item["id"] == events_id for item in instances):
                        break
                    await trio.sleep(0.3)
            assert all(item["hub"] == hub_id for item in instances)
            sequences = (await space.get("/sequences?detail=true")).json()
            assert {sequence_id, upload.json()["id"]} <= {item["id"] for item in sequences}
            # the seeds' shapes, which the original's clients read
            assert {sequence_id, upload.json()["id"]} <= set((await space.get("/sequences")).json())
            per_hub = (await space.get("/instances")).json()
            assert [events_id] in [entry for hub_list in per_hub for entry in hub_list]

            killed = await space.post(f"{base}/instance/{events_id}/_kill", json={})
            assert killed.status_code in (200, 202), killed.text
            missing = await space.get(f"{base}/no-such-route")
            assert missing.status_code == 404
        assert hub.alive() and manager.alive()


async def test_hub_restart_reuses_its_identity(tmp_path: Path) -> None:
    data = tmp_path / "cpm"
    token, join = setup_space(data)
    with run_cpm(data, *FAST) as manager:
        async with space_client(manager, token) as space:
            with run_linked_sth(tmp_path, manager, "--join-token", join):
                hub_id = (await wait_hub(space))["id"]
            # Gone: shown disconnected, with the time it left.
            with trio.fail_after(LINK_WAIT):
                while (record := (await space.get(f"/sth/{hub_id}/info")).json())["isConnectionActive"]:
                    await trio.sleep(0.2)
            assert "lastDisconnected" in record["info"]
            assert record["healthy"] is False
            # No join token the second time: the hub authenticates with its key.
            with run_linked_sth(tmp_path, manager) as hub:
                again = await wait_hub(space, hub_id=hub_id)
                assert again["id"] == hub_id
                # known by that id from its start, before its link is up again
                assert httpx.get(f"{hub.url}/status", timeout=10).json()["id"] == hub_id
            listed = json.loads(cpm(data, "hub", "list", "--space", "demo", "--json"))
            assert [item["id"] for item in listed] == [hub_id]


async def test_manager_restart_hub_reconnects(tmp_path: Path) -> None:
    data = tmp_path / "cpm"
    token, join = setup_space(data)
    port = free_port()
    with (
        run_cpm(data, *FAST, port=port) as manager,
        run_linked_sth(tmp_path, manager, "--join-token", join) as hub,
    ):
        async with space_client(manager, token) as space:
            hub_id = (await wait_hub(space))["id"]
        manager.process.terminate()
        manager.process.wait(timeout=15)
        with run_cpm(data, *FAST, port=port) as restarted:
            async with space_client(restarted, token) as space:
                assert (await wait_hub(space, hub_id=hub_id))["id"] == hub_id
                version = await space.get(f"/sth/{hub_id}/api/v1/version")
                assert version.status_code == 200
        assert hub.alive()


async def test_hubs_come_back_after_a_manager_down_for_30_s(tmp_path: Path) -> None:
    """kill -9 of the manager, 30 s of connection refused, a restart: every hub is linked again.
    How soon is printed by `python -m bench.manager_restart`, not asserted here."""
    data = tmp_path / "cpm"
    token, first_join = setup_space(data)
    joins = [first_join] + [cpm(data, "join-token", "create", "--space", "demo") for _ in range(2)]
    port = free_port()
    with contextlib.ExitStack() as stack:
        manager = stack.enter_context(run_cpm(data, *FAST, port=port))
        hubs = [
            stack.enter_context(run_linked_sth(tmp_path, manager, "--join-token", join, name=f"hub{n}"))
            for n, join in enumerate(joins)
        ]
        async with space_client(manager, token) as space:
            with trio.fail_after(LINK_WAIT):
                while len([r for r in (await space.get("/list")).json() if r["healthy"]]) < len(hubs):
                    await trio.sleep(0.2)
        manager.process.kill()
        manager.process.wait(timeout=15)
        await trio.sleep(30)
        with run_cpm(data, *FAST, port=port) as restarted:
            async with space_client(restarted, token) as space:
                with trio.fail_after(LINK_WAIT):
                    while len([r for r in (await space.get("/list")).json() if r["healthy"]]) < len(hubs):
                        await trio.sleep(0.2)
        assert all(hub.alive() for hub in hubs)


async def test_revoked_hub_is_cut_off_and_refused(tmp_path: Path) -> None:
    data = tmp_path / "cpm"
    token, join = setup_space(data)
    with run_cpm(data, *FAST) as manager:
        async with space_client(manager, token) as space:
            with run_linked_sth(tmp_path, manager, "--join-token", join) as hub:
                hub_id = (await wait_hub(space))["id"]
                cpm(data, "hub", "revoke", hub_id, "--reason", "decommissioned")
                link = await wait_refused(hub)
                assert "decommissioned" in (link.get("lastError") or "")
                assert (await space.get("/list")).json() == []
                proxied = await space.get(f"/sth/{hub_id}/api/v1/version")
                assert proxied.status_code == 503
            # Restarted, it is refused again at once.
            with run_linked_sth(tmp_path, manager) as hub:
                link = await wait_refused(hub)
                assert hub.alive()
        listed = json.loads(cpm(data, "hub", "list", "--space", "demo", "--json"))
        assert listed[0]["revoked"] is not None


async def test_used_and_expired_join_tokens_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "cpm"
    token, join = setup_space(data)
    expiring = cpm(data, "join-token", "create", "--space", "demo", "--ttl", "1")
    with run_cpm(data, *FAST) as manager:
        async with space_client(manager, token) as space:
            with run_linked_sth(tmp_path, manager, "--join-token", join, name="first"):
                await wait_hub(space)
                with run_linked_sth(tmp_path, manager, "--join-token", join, name="second") as second:
                    link = await wait_refused(second)
                    assert "used" in (link.get("lastError") or "")
            await trio.sleep(1.5)
            with run_linked_sth(tmp_path, manager, "--join-token", expiring, name="third") as third:
                link = await wait_refused(third)
                assert "expired" in (link.get("lastError") or "")
            assert len(json.loads(cpm(data, "hub", "list", "--space", "demo", "--json"))) == 1


async def test_a_stalled_output_reader_holds_back_only_its_stream(tmp_path: Path) -> None:
    data = tmp_path / "cpm"
    token, join = setup_space(data)
    with run_cpm(data, *FAST) as manager, run_linked_sth(tmp_path, manager, "--join-token", join) as hub:
        async with space_client(manager, token) as space:
            hub_id = (await wait_hub(space))["id"]
            base = f"/sth/{hub_id}/api/v1"
            upload = await space.post(
                f"{base}/sequence",
                content=python_package(FLOOD, name="flood"),
                headers={"content-type": "application/octet-stream"},
            )
            instance_id = (await space.post(f"{base}/sequence/{upload.json()['id']}/start", json={})).json()[
                "id"
            ]
            with trio.fail_after(60):
                async with space.stream("GET", f"{base}/instance/{instance_id}/stdout") as stalled:
                    assert stalled.status_code == 200
                    assert await stalled.aiter_raw().__anext__()
                    # Stop reading: the stream's windows fill up, and nothing else may wait for it.
                    first = (await space.get(f"/sth/{hub_id}/info")).json().get("lastHeartbeat")
                    await trio.sleep(4)
                    for _ in range(10):
                        response = await space.get(f"{base}/version")
                        assert response.status_code == 200
                    record = (await space.get(f"/sth/{hub_id}/info")).json()
                    assert record["healthy"] is True
                    assert record["lastHeartbeat"] != first  # heartbeats kept flowing
            killed = await space.post(f"{base}/instance/{instance_id}/_kill", json={})
            assert killed.status_code in (200, 202)
        assert hub.alive() and manager.alive()
