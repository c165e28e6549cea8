"""Compatibility: the request shapes the original clients send, byte for byte, without them.

`test_compat_si.py` and `test_compat_python_client.py` run the real clients, but skip
when the registries cannot be reached; these tests pin the same shapes (sth-spec §1.7)
against a real `sth` with plain HTTP, so the hub keeps accepting them everywhere.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from tests.helpers import HubProcess, python_package

TIMEOUT = httpx.Timeout(20.0)
JSON = {"Content-Type": "application/json"}

SEQUENCE = """
async def run(context, input, *args):
    context.on("ping", lambda message: context.emit("pong", {"got": message}))
    yield "args=" + repr(list(args)) + "\\n"
    async for chunk in input:
        yield chunk
"""


@pytest.fixture
async def client(hub: HubProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=hub.url, timeout=TIMEOUT) as http:
        yield http
    assert hub.alive()


async def _sequence(client: httpx.AsyncClient) -> str:
    response = await client.post(
        "/sequence", content=python_package(SEQUENCE), headers={"content-type": "application/octet-stream"}
    )
    assert response.status_code in (200, 202), response.text
    return str(response.json()["id"])


async def _start_null(client: httpx.AsyncClient, sequence_id: str) -> dict[str, Any]:
    """The Python client's start: JSON content type, body ``null``."""
    response = await client.post(f"/sequence/{sequence_id}/start", content=b"null", headers=JSON)
    assert response.status_code == 200, response.text
    info: dict[str, Any] = response.json()
    return info


async def _wait_ended(client: httpx.AsyncClient, instance_id: str) -> dict[str, Any]:
    with trio.fail_after(20):
        while True:
            info: dict[str, Any] = (await client.get(f"/instance/{instance_id}")).json()
            if info["status"] in ("completed", "errored"):
                return info
            await trio.sleep(0.05)


async def test_python_client_start_event_and_nameless_once(client: httpx.AsyncClient) -> None:
    instance = await _start_null(client, await _sequence(client))
    instance_id = instance["id"]
    assert instance["args"] == []
    received: list[Any] = []
    async with trio.open_nursery() as nursery:

        async def once() -> None:
            received.append((await client.get(f"/instance/{instance_id}/once")).json())

        nursery.start_soon(once)
        await trio.sleep(0.3)
        # misspelt "messagee", array form, and a JSON string as the query string
        response = await client.post(
            f"/instance/{instance_id}/_event",
            content=json.dumps([5001, {"eventName": "ping", "messagee": "hi"}]),
            headers=JSON,
            params={json.dumps({"json": "true", "parse": "json"}): ""},
        )
        assert response.status_code == 200
        assert response.json() == {"accepted": "OK"}
    assert received == [{"got": "hi"}]
    assert (await client.get(f"/instance/{instance_id}/event")).json() == {"got": "hi"}
    # si 0.26: [4002, {removeImmediately}]
    killed = await client.post(f"/instance/{instance_id}/_kill", json=[4002, {"removeImmediately": False}])
    assert killed.status_code == 202
    await _wait_ended(client, instance_id)


@pytest.mark.parametrize(
    ("value", "status"), [("False", 202), ("success", 202), ("True", 200), ("true", 200)]
)
async def test_x_end_stream_values(client: httpx.AsyncClient, value: str, status: int) -> None:
    instance_id = (await _start_null(client, await _sequence(client)))["id"]
    response = await client.post(
        f"/instance/{instance_id}/input",
        content=b"data\n",
        headers={"content-type": "text/plain", "x-end-stream": value},
    )
    assert response.status_code == status
    if status == 200:
        assert (await _wait_ended(client, instance_id))["status"] == "completed"
    else:
        await client.post(f"/instance/{instance_id}/_kill", json={})


async def test_si_stop_array_and_delete_without_body(client: httpx.AsyncClient) -> None:
    sequence_id = await _sequence(client)
    instance_id = (await _start_null(client, sequence_id))["id"]
    stopped = await client.post(
        f"/instance/{instance_id}/_stop", json=[4001, {"timeout": 1000, "canCallKeepalive": True}]
    )
    assert stopped.status_code == 202
    assert stopped.json()["id"] == instance_id
    await _wait_ended(client, instance_id)
    # both clients: DELETE with a JSON content type and no body
    deleted = await client.request("DELETE", f"/sequence/{sequence_id}", headers=JSON)
    assert deleted.status_code == 200
    assert deleted.json()["id"] == sequence_id


async def test_topic_send_with_expect_and_get_with_content_type(client: httpx.AsyncClient) -> None:
    sent = await client.post(
        "/topic/shapes-topic",
        content=b"one\ntwo\n",
        headers={"content-type": "text/plain", "expect": "100-continue"},
    )
    assert sent.status_code in (200, 202)
    data = b""
    with trio.fail_after(10):
        async with client.stream("GET", "/topic/shapes-topic", headers={"content-type": "text/plain"}) as got:
            assert got.status_code == 200
            async for chunk in got.aiter_bytes():
                data += chunk
                if data.endswith(b"two\n"):
                    break
    assert data == b"one\ntwo\n"
