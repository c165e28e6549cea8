"""End-to-end: the public API of ``spacehub`` (HubClient and its async twin) against a real `sth`.

Rules: one real hub per module (``hub`` fixture); every wait is bounded (clients with a
``stream_timeout``, ``trio.fail_after``, ``asyncio.timeout``, thread joins with a timeout); the async
client is driven under Trio (pytest-trio) and under asyncio (``asyncio.run`` in a sync test).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from spacehub import (
    AsyncHubClient,
    BadRequest,
    ClientError,
    Conflict,
    ConnectionFailed,
    Gone,
    HubClient,
    InstanceClient,
    NotFound,
    SpaceClient,
)
from spacehub.client import ApiError, ManagerClient
from tests.helpers import HubProcess, python_package

WAIT = 15.0

ECHO = """
async def run(context, input, *args):
    context.on("ping", lambda message: context.emit("pong", {"got": message}))
    async for chunk in input:
        yield chunk
"""

ARGS = """
import json
def run(context, input, *args):
    return json.dumps({"args": list(args), "config": context.config}) + "\\n"
"""

STDIO = """
import sys
async def run(context, input, *args):
    data = await sys.stdin.read()
    print(f"stdin: {data.strip()}", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
"""

FOREVER = """
import asyncio
async def run(context, input, *args):
    await asyncio.sleep(3600)
"""


@pytest.fixture(scope="module")
def runtime() -> str:
    """The client does not depend on how the hub runs instances: the process runtime is enough."""
    return "process"


@pytest.fixture
def client(hub: HubProcess) -> Iterator[HubClient]:
    with HubClient(hub.url, timeout=WAIT, stream_timeout=WAIT) as http:
        yield http
    assert hub.alive()


def _wait_status(instance: InstanceClient, *statuses: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        info = instance.info()
        if info["status"] in statuses:
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def _sequence_dir(root: Path, source: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "package.json").write_text(
        json.dumps({"name": "from-dir", "version": "1.2.3", "main": "main.py", "engines": {"python3": "3"}})
    )
    (root / "main.py").write_text(source)
    (root / "junk.bin").write_bytes(b"x" * 1000)
    (root / ".siignore").write_text("*.bin\n")
    return root


# ------------------------------------------------------------------------------ sync: hub
def test_hub_routes(client: HubClient) -> None:
    version = client.version()
    assert version["apiVersion"] == "v1" and version["version"]
    assert client.config()["host"]["hostname"] == "127.0.0.1"
    assert "cpm" in client.status()
    assert {"avgLoad", "memFree", "fsSize"} <= client.load_check().keys()
    assert {"sequences", "instances"} <= client.entities().keys()
    with client.log() as log:
        first = next(log.iter_json())
    assert "msg" in first


def test_upload_from_bytes_file_and_directory(client: HubClient, tmp_path: Path) -> None:
    package = python_package(ECHO, name="from-bytes")
    archive = tmp_path / "pkg.tar.gz"
    archive.write_bytes(package)
    seen: list[tuple[int, int | None]] = []
    from_bytes = client.send_sequence(package)
    from_file = client.send_sequence(archive, progress=lambda done, total: seen.append((done, total)))
    with archive.open("rb") as file:
        from_open_file = client.send_sequence(file)
    from_dir = client.send_sequence(_sequence_dir(tmp_path / "seq", ECHO))
    assert seen and seen[-1] == (len(package), len(package))

    listed = {s["id"] for s in client.list_sequences()}
    assert {from_bytes.id, from_file.id, from_open_file.id, from_dir.id} <= listed
    info = from_dir.info()
    assert info["config"]["name"] == "from-dir" and info["config"]["version"] == "1.2.3"
    assert not (Path(info["config"]["sequenceDir"]) / "junk.bin").exists()  # .siignore'd
    assert from_dir.instances() == []
    for sequence in (from_bytes, from_file, from_open_file, from_dir):
        assert sequence.delete()["id"] == sequence.id
    with pytest.raises(NotFound) as caught:
        from_dir.info()
    assert caught.value.status == 404 and from_dir.id in caught.value.message


def test_errors_carry_status_and_message(client: HubClient, hub: HubProcess) -> None:
    with pytest.raises(NotFound) as not_found:
        client.instance("nope").info()
    assert not_found.value.status == 404
    assert not_found.value.message == "Instance nope not found"
    assert not_found.value.body == {"error": "Instance nope not found"}
    with pytest.raises(ApiError) as bad_package:
        client.send_sequence(b"not a tar.gz")
    assert bad_package.value.status == 400 and bad_package.value.message
    with pytest.raises(NotFound), client.instance("nope").output() as output:
        list(output)
    with pytest.raises(NotFound):
        client.sequence("nope").start()
    with (
        HubClient("http://127.0.0.1:9/api/v1", timeout=2) as dead,
        pytest.raises(ConnectionFailed),
    ):
        dead.version()
    assert issubclass(ConnectionFailed, ClientError) and issubclass(NotFound, ClientError)


# ------------------------------------------------------------------------------ sync: instances
def test_start_with_args_and_app_config(client: HubClient) -> None:
    sequence = client.send_sequence(python_package(ARGS))
    instance = sequence.start(args=["a", 1, {"x": True}], app_config={"greeting": "Hi"})
    with instance.output() as output:
        data = b"".join(output)
    assert json.loads(data) == {"args": ["a", 1, {"x": True}], "config": {"greeting": "Hi"}}
    assert instance.id in sequence.instances()
    assert instance.id in {i["id"] for i in client.list_instances()}
    info = _wait_status(instance, "completed")
    assert info["args"] == ["a", 1, {"x": True}] and info["appConfig"] == {"greeting": "Hi"}
    with pytest.raises(Conflict):  # the id is taken
        sequence.start(instance_id=instance.id)


def test_input_from_bytes_file_and_iterator(client: HubClient, tmp_path: Path) -> None:
    instance = client.send_sequence(python_package(ECHO)).start()
    data_file = tmp_path / "input.txt"
    data_file.write_text("from a file\n")
    instance.input(b"from bytes\n", content_type="text/plain", end=False)
    instance.input(data_file, end=False)
    with data_file.open("rb") as file:
        instance.input(file, end=False)
    pieces: list[bytes | str] = [b"from ", b"an iterator\n", "and text\n"]
    instance.input(iter(pieces))  # ends the input
    assert (
        b"".join(instance.output()) == b"from bytes\nfrom a file\nfrom a file\nfrom an iterator\nand text\n"
    )
    with pytest.raises((Conflict, Gone)):
        instance.input(b"too late\n")


def test_stdin_stdout_stderr_and_log(client: HubClient) -> None:
    instance = client.send_sequence(python_package(STDIO)).start()
    instance.stdin(b"hello\n")
    assert b"".join(instance.stdout()) == b"stdin: hello\n"
    assert b"to stderr" in b"".join(instance.stderr())
    records = list(instance.log().iter_json())
    assert records and all("msg" in r for r in records)


def test_events_send_next_last_stream(client: HubClient) -> None:
    instance = client.send_sequence(python_package(ECHO)).start()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(instance.next_event("pong")), daemon=True)
    waiter.start()
    deadline = time.monotonic() + WAIT
    while waiter.is_alive() and time.monotonic() < deadline:  # until the long poll has caught one
        instance.send_event("ping", 1)
        waiter.join(0.1)
    assert got == [{"got": 1}]
    assert instance.last_event("pong") == {"got": 1}
    with instance.events("pong") as events:
        instance.send_event("ping", "two")
        instance.send_event("ping", [3])
        messages = events.iter_json()
        assert next(messages) == {"got": "two"}
        assert next(messages) == {"got": [3]}
    with pytest.raises(BadRequest):
        client.instance(instance.id).send_event("", 1)
    instance.kill()


def test_health_stop_kill_and_forced_delete(client: HubClient) -> None:
    sequence = client.send_sequence(python_package(FOREVER))
    first = sequence.start()
    health = first.health()
    assert health["healthy"] is True and health["processId"]
    stopped = first.stop(300)
    assert stopped["id"] == first.id
    assert _wait_status(first, "completed", "errored")["status"] in ("completed", "errored")
    second = sequence.start()
    assert second.kill()["status"] == "killing"
    _wait_status(second, "completed", "errored")
    with pytest.raises(BadRequest):
        second.kill()
    third = sequence.start()
    with pytest.raises(Conflict):
        sequence.delete()
    assert sequence.delete(force=True)["id"] == sequence.id
    with pytest.raises(NotFound):
        sequence.info()
    assert third.info()["status"] not in ("running", "starting")


def test_topics(client: HubClient) -> None:
    created = client.create_topic("client-topic", "text/plain")
    assert created["id"] == "client-topic" and created["contentType"] == "text/plain"
    assert "client-topic" in json.dumps(client.list_topics())
    with client.get_topic("client-topic", content_type="text/plain") as reader:
        client.send_topic("client-topic", b"one\ntwo\n", content_type="text/plain")
        data = b""
        for chunk in reader:
            data += chunk
            if data.count(b"\n") >= 2:
                break
    assert data == b"one\ntwo\n"
    client.delete_topic("client-topic")
    assert "client-topic" not in json.dumps(client.list_topics())
    with pytest.raises(NotFound):
        client.delete_topic("client-topic")


# ------------------------------------------------------------------------------ async
async def _async_flow(url: str, tmp_path: Path) -> None:
    """One walk through the async client; no trio or asyncio in here, so it runs under both."""
    async with AsyncHubClient(url, timeout=WAIT, stream_timeout=WAIT) as hub:
        assert (await hub.version())["apiVersion"] == "v1"
        sequence = await hub.send_sequence(_sequence_dir(tmp_path / "seq", ECHO))
        assert (await sequence.info())["config"]["name"] == "from-dir"
        instance = await sequence.start(args=["x"], app_config={"k": 1})
        assert (await instance.info())["appConfig"] == {"k": 1}
        assert (await instance.health())["healthy"] is True

        async def lines() -> AsyncIterator[bytes]:
            yield b"async "
            yield b"iterator\n"

        data_file = tmp_path / "in.txt"
        data_file.write_bytes(b"file\n")
        await instance.input(b"bytes\n", content_type="text/plain", end=False)
        await instance.input(data_file, end=False)
        await instance.input(iter([b"sync iterator\n"]), end=False)
        async with instance.events("pong") as events:
            await instance.send_event("ping", "a")
            async for message in events.aiter_json():
                assert message == {"got": "a"}
                break
        assert await instance.last_event("pong") == {"got": "a"}
        await instance.input(lines())  # ends the input: the sequence completes

        output = b""
        async for chunk in instance.output():
            output += chunk
        assert output == b"bytes\nfile\nsync iterator\nasync iterator\n"

        with pytest.raises(NotFound) as caught:
            await hub.instance("nope").info()
        assert caught.value.message == "Instance nope not found"

        await hub.create_topic("async-topic", "text/plain")
        async with hub.get_topic("async-topic", content_type="text/plain") as reader:
            await hub.send_topic("async-topic", b"hi\n", content_type="text/plain")
            assert await reader.aiter_bytes().__anext__() == b"hi\n"
        assert "async-topic" in json.dumps(await hub.list_topics())
        await hub.delete_topic("async-topic")

        second = await sequence.start()
        assert (await second.kill())["status"] in ("killing", "completed")
        assert (await sequence.delete(force=True))["id"] == sequence.id


async def test_async_client_under_trio(hub: HubProcess, tmp_path: Path) -> None:
    with trio.fail_after(60):
        await _async_flow(hub.url, tmp_path)


def test_async_client_under_asyncio(hub: HubProcess, tmp_path: Path) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(60):
            await _async_flow(hub.url, tmp_path)

    asyncio.run(bounded())


# ------------------------------------------------------------------------------ Space / manager
def test_space_urls_and_token_without_a_manager() -> None:
    """The URL nesting of sth-spec §7, checked on a mock transport (the manager is tested below)."""
    seen: list[tuple[str, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        if request.url.path.endswith("/list"):
            return httpx.Response(200, json=[{"id": "h1"}])
        if request.url.path.endswith("/nope/api/v1/version"):
            return httpx.Response(403, json={"message": "Forbidden"})
        return httpx.Response(200, json={"service": "x"})

    http = httpx.Client(transport=httpx.MockTransport(answer))
    manager = ManagerClient("http://m/api/v1", token="secret", http=http)
    space = manager.space("demo")
    assert space.hubs() == [{"id": "h1"}]
    assert space.hub("h1").version() == {"service": "x"}
    with pytest.raises(ApiError) as forbidden:
        manager.space("nope").version()
    assert forbidden.value.status == 403 and forbidden.value.message == "Forbidden"
    assert [url for url, _ in seen] == [
        "http://m/api/v1/space/demo/api/v1/list",
        "http://m/api/v1/space/demo/api/v1/sth/h1/api/v1/version",
        "http://m/api/v1/space/nope/api/v1/version",
    ]
    assert {auth for _, auth in seen} == {"Bearer secret"}
    assert isinstance(space, SpaceClient)
