"""Bad input against a real `sth`: a 4xx JSON error, nothing kept, the daemon fine.

Non-finite numbers (NaN, Infinity, 1e400), absurd nesting, absurd stop timeouts, limits that
cannot be read, an upload refused with 413 (its connection closed after the answer), and a
/config that shows no path of the machine.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from agent import limits
from spacehub.server.limits import MAX_JSON_DEPTH
from tests.helpers import HubProcess, python_package, run_sth

SLEEPER = """
import asyncio
async def run(context, input, *args):
    await asyncio.sleep(3600)
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    with run_sth(tmp_path_factory.mktemp("sequences"), "--kill-grace", "1") as process:
        yield process


@pytest.fixture
async def client(hub: HubProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=hub.url, timeout=20) as http:
        yield http
    assert hub.alive()


@pytest.fixture
async def sequence_id(client: httpx.AsyncClient) -> str:
    response = await client.post(
        "/sequence", content=python_package(SLEEPER), headers={"content-type": "application/octet-stream"}
    )
    assert response.status_code == 202
    return str(response.json()["id"])


async def post_raw(client: httpx.AsyncClient, path: str, body: str) -> httpx.Response:
    return await client.post(path, content=body.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    "body",
    [
        '{"appConfig": {"x": NaN}}',
        '{"appConfig": {"x": Infinity}}',
        '{"args": [-Infinity]}',
        '{"args": [1e400]}',
        "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1),
        '{"a":' * 100_000 + "1" + "}" * 100_000,
    ],
    ids=["nan", "infinity", "minus-infinity", "overflow", "just-too-deep", "absurdly-deep"],
)
async def test_a_start_with_unusable_json_is_refused_and_starts_nothing(
    client: httpx.AsyncClient, sequence_id: str, body: str
) -> None:
    before = len((await client.get("/instances")).json())
    response = await post_raw(client, f"/sequence/{sequence_id}/start", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]
    assert len((await client.get("/instances")).json()) == before


async def test_nesting_up_to_the_bound_is_fine(client: httpx.AsyncClient, sequence_id: str) -> None:
    deep: Any = 1
    for _ in range(MAX_JSON_DEPTH - 2):
        deep = [deep]
    response = await client.post(f"/sequence/{sequence_id}/start", json={"appConfig": {"deep": deep}})
    assert response.status_code == 200, response.text
    instance_id = response.json()["id"]
    # the hub's listings stay valid JSON (they are what the heartbeat carries to the Space)
    json.loads((await client.get("/instances")).text)
    await client.post(f"/instance/{instance_id}/_kill", json={})


@pytest.mark.parametrize(
    "body",
    [
        '{"timeout": NaN}',
        '{"timeout": 1e400}',
        '{"timeout": -1}',
        f'{{"timeout": {limits.MAX_STOP_TIMEOUT_MS + 1}}}',
        '[4001, {"timeout": Infinity}]',
    ],
)
async def test_a_stop_with_an_unusable_timeout_is_refused(
    client: httpx.AsyncClient, sequence_id: str, body: str
) -> None:
    instance_id = (await client.post(f"/sequence/{sequence_id}/start", json={})).json()["id"]
    try:
        response = await post_raw(client, f"/instance/{instance_id}/_stop", body)
        assert response.status_code == 400, response.text
        assert (await client.get(f"/instance/{instance_id}")).json()["status"] == "running"
        event = await post_raw(
            client, f"/instance/{instance_id}/_event", '{"eventName": "x", "message": NaN}'
        )
        assert event.status_code == 400
    finally:
        await client.post(f"/instance/{instance_id}/_kill", json={})


@pytest.mark.parametrize(
    ("requested", "error"),
    [
        ({"memory": "lots"}, "limits.memory must be a number"),
        ({"memory": -5}, "limits.memory must be a number above 0"),
        ({"memory": 0}, "limits.memory must be a number above 0"),
        ({"cpu": True}, "limits.cpu must be a number"),
        ({"pids": 2.5}, "limits.pids must be a whole number"),
        ({"pids": 10**12}, "at most"),
        ({"disk": 5}, "limits.disk is not a limit this hub knows"),
    ],
)
async def test_limits_that_cannot_be_read_refuse_the_start(
    client: httpx.AsyncClient, sequence_id: str, requested: dict[str, Any], error: str
) -> None:
    before = len((await client.get("/instances")).json())
    response = await client.post(f"/sequence/{sequence_id}/start", json={"limits": requested})
    assert response.status_code == 400
    assert error in response.json()["error"]
    assert len((await client.get("/instances")).json()) == before


def test_an_upload_refused_with_413_closes_its_connection(hub: HubProcess) -> None:
    """The answer arrives, then the hub closes the socket instead of holding the unread rest."""
    host, port = hub.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    too_large = 300 * 1024 * 1024  # over MAX_PACKAGE_COMPRESSED_BYTES, announced up front
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(
            b"POST /api/v1/sequence HTTP/1.1\r\nHost: hub\r\n"
            b"Content-Type: application/octet-stream\r\n"
            + f"Content-Length: {too_large}\r\n\r\n".encode()
            + b"\x1f\x8b"
            + b"\0" * 65536
        )
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break  # closed by the hub
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 413") or head.startswith(b"http/1.1 400"), answer[:200]
    assert b"connection: close" in head


async def test_config_shows_no_path_of_the_machine(client: httpx.AsyncClient, tmp_path: Path) -> None:
    config = (await client.get("/config")).json()

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)

    paths = [s for s in strings(config) if s.startswith("/") and not s.startswith("/api")]
    assert paths == []
    assert config["runtimes"]["python3"].startswith("python")


async def test_the_hub_is_fine_after_all_that(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        assert (await client.get("/version")).status_code == 200
