"""End-to-end: the real `sth` driven over HTTP, as a user (or curl) would.

Rules: every test talks to a real hub process over 127.0.0.1; every wait is
bounded (httpx timeouts, trio.fail_after); the hub must still be serving after
each bad request.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import AsyncIterator

import httpx
import psutil
import pytest
import trio

from tests.helpers import HubProcess, make_package, python_package

TIMEOUT = httpx.Timeout(20.0)

ECHO = """
async def run(context, input, *args):
    async for chunk in input:
        yield chunk
"""

ARGS = """
import json
def run(context, input, *args):
    return json.dumps({"args": list(args), "config": context.config}) + "\\n"
"""

STOP_HANDLER = """
import asyncio, sys
async def run(context, input, *args):
    async def on_stop(timeout, can_keep_alive):
        print("Cleaning up...", end=" ")
        print("Cleanup done.")
        sys.stdout.flush()
    context.set_stop_handler(on_stop)
    await asyncio.sleep(3600)
"""

KEEP_ALIVE = """
import asyncio
async def run(context, input, *args):
    async def on_stop(timeout, can_keep_alive):
        if can_keep_alive:
            await context.keep_alive(5000)
    context.set_stop_handler(on_stop)
    await asyncio.sleep(3600)
"""

RAISES = """
class TestException(Exception):
    pass
def run(context, input, *args):
    raise TestException("This exception should appear on stderr")
"""

FOREVER = """
import asyncio
async def run(context, input, *args):
    await asyncio.sleep(3600)
"""

IGNORES_SIGTERM = """
import signal, time
def run(context, input, *args):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(0.05)
"""

FLOOD_WITH_EVENTS = """
import asyncio, sys
async def run(context, input, *args):
    context.on("ping", lambda message: context.emit("pong", {"got": message}))
    line = "x" * 1000 + "\\n"
    while True:
        sys.stdout.write(line)
        await asyncio.sleep(0)
"""

EVENTS = """
import asyncio
async def run(context, input, *args):
    context.on("test-event", lambda message: context.emit("test-response", f"reply to {message}"))
    await asyncio.sleep(3600)
"""


@pytest.fixture
async def client(hub: HubProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=hub.url, timeout=TIMEOUT) as http:
        yield http
    assert hub.alive()


async def upload(client: httpx.AsyncClient, package: bytes) -> str:
    response = await client.post(
        "/sequence", content=package, headers={"content-type": "application/octet-stream"}
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def start(client: httpx.AsyncClient, sequence_id: str, **payload: object) -> str:
    response = await client.post(f"/sequence/{sequence_id}/start", json=payload)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


async def read_stream(client: httpx.AsyncClient, path: str, limit: int | None = None) -> bytes:
    data = b""
    async with client.stream("GET", path) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_bytes():
            data += chunk
            if limit is not None and len(data) >= limit:
                break
    return data


async def wait_status(client: httpx.AsyncClient, instance_id: str, *statuses: str) -> dict[str, object]:
    with trio.fail_after(20):
        while True:
            info = (await client.get(f"/instance/{instance_id}")).json()
            if info["status"] in statuses:
                return dict(info)
            await trio.sleep(0.05)


# --------------------------------------------------------------------- hub routes
async def test_version_config_status_load(client: httpx.AsyncClient) -> None:
    version = (await client.get("/version")).json()
    assert version["apiVersion"] == "v1" and version["service"] == "@scramjet/host" and version["version"]
    assert set(version) == {"service", "apiVersion", "version", "build"}  # exactly the original's
    config = (await client.get("/config")).json()
    assert config["host"]["hostname"] == "127.0.0.1"
    assert "sequencesRoot" not in json.dumps(config)
    status = (await client.get("/status")).json()
    assert "cpm" in status and isinstance(status["tasks"], int)
    assert status["product"] == "spacehub" and status["version"] == version["version"]
    load = (await client.get("/load-check")).json()
    assert {"avgLoad", "currentLoad", "memFree", "memUsed", "fsSize"} <= load.keys()
    assert load["fsSize"] and {"fs", "size", "used", "available", "use"} <= load["fsSize"][0].keys()


async def test_hub_log_replays_then_follows(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        async with client.stream("GET", "/log") as response:
            assert response.headers["content-type"].startswith("application/x-ndjson")
            first = await response.aiter_lines().__anext__()
    assert "msg" in json.loads(first)


async def test_unknown_routes_and_ids(client: httpx.AsyncClient) -> None:
    for path in (
        "/nope",
        "/sequence/nope",
        "/instance/nope",
        "/instance/nope/output",
        "/sequence/nope/instances",
    ):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]
    response = await client.delete("/version")
    assert response.status_code == 405 and response.json()["error"]


# --------------------------------------------------------------------- sequences
async def test_sequence_upload_list_info_delete(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package(ECHO, name="echo", version="2.0.0"))
    listed = (await client.get("/sequences")).json()
    assert sequence_id in [s["id"] for s in listed]
    info = (await client.get(f"/sequence/{sequence_id}")).json()
    assert info["config"]["name"] == "echo" and info["config"]["version"] == "2.0.0"
    assert info["config"]["language"] == "py" and info["instances"] == []
    assert (await client.get(f"/sequence/{sequence_id}/instances")).json() == []
    response = await client.delete(f"/sequence/{sequence_id}")
    assert response.status_code == 200 and response.json()["id"] == sequence_id
    assert (await client.get(f"/sequence/{sequence_id}")).status_code == 404


def _tar_gz(members: list[tarfile.TarInfo], contents: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(contents[member.name]) if member.name in contents else None)
    return buffer.getvalue()


def _package_json_member() -> tuple[tarfile.TarInfo, bytes]:
    data = json.dumps({"main": "main.py", "engines": {"python3": "3"}}).encode()
    info = tarfile.TarInfo("package.json")
    info.size = len(data)
    return info, data


@pytest.mark.parametrize(
    ("case", "status"),
    [("not-gzip", 400), ("dotdot", 400), ("symlink", 400), ("bomb", 413), ("no-main", 422), ("empty", 400)],
)
async def test_bad_uploads_are_refused_and_leave_nothing(
    client: httpx.AsyncClient, hub: HubProcess, case: str, status: int
) -> None:
    before = sorted(p.name for p in hub.root.iterdir())
    if case == "not-gzip":
        body = b"this is not a tar.gz"
    elif case == "dotdot":
        pj, data = _package_json_member()
        evil = tarfile.TarInfo("../x")
        evil.size = 1
        body = _tar_gz([pj, evil], {"package.json": data, "../x": b"x"})
    elif case == "symlink":
        pj, data = _package_json_member()
        link = tarfile.TarInfo("main.py")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        body = _tar_gz([pj, link], {"package.json": data})
    elif case == "bomb":
        body = _zero_bomb(64 * 1024 * 1024)
    elif case == "no-main":
        body = make_package({"main.py": "def run(c, i): pass"}, package_json={"name": "x"})
    else:
        body = b""
    response = await client.post(
        "/sequence", content=body, headers={"content-type": "application/octet-stream"}
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]
    after = sorted(p.name for p in hub.root.iterdir())
    assert after == before
    assert not list((hub.root / ".incoming").iterdir())
    assert (await client.get("/version")).status_code == 200


def _zero_bomb(size: int) -> bytes:
    """A package whose one file is ``size`` zero bytes, compressed as it is made."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
    pj, data = _package_json_member()
    out = [compressor.compress(pj.tobuf() + data + bytes(-len(data) % 512))]
    zeros = tarfile.TarInfo("zeros.bin")
    zeros.size = size
    out.append(compressor.compress(zeros.tobuf()))
    block = bytes(1024 * 1024)
    for _ in range(size // len(block)):
        out.append(compressor.compress(block))
    out.append(compressor.compress(bytes(1024)) + compressor.flush())
    return b"".join(out)


async def test_upload_with_wrong_content_type(client: httpx.AsyncClient) -> None:
    response = await client.post("/sequence", content=b"{}", headers={"content-type": "application/json"})
    assert response.status_code == 415 and response.json()["error"]


async def test_put_replaces_a_sequence(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package(ECHO, name="one"))
    response = await client.put(
        f"/sequence/{sequence_id}",
        content=python_package(ECHO, name="two"),
        headers={"content-type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    assert (await client.get(f"/sequence/{sequence_id}")).json()["config"]["name"] == "two"
    bad = await client.put(f"/sequence/{sequence_id}", content=b"junk")
    assert bad.status_code == 400
    assert (await client.get(f"/sequence/{sequence_id}")).json()["config"]["name"] == "two"


# --------------------------------------------------------------------- instances
async def test_echo_input_to_output(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package(ECHO))
    instance_id = await start(client, sequence_id)
    info = (await client.get(f"/instance/{instance_id}")).json()
    assert info["status"] == "running" and info["sequence"]["id"] == sequence_id
    assert instance_id in (await client.get(f"/sequence/{sequence_id}/instances")).json()
    response = await client.post(
        f"/instance/{instance_id}/input", content=b"hello\nworld\n", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 200
    with trio.fail_after(15):
        assert await read_stream(client, f"/instance/{instance_id}/output") == b"hello\nworld\n"
    final = await wait_status(client, instance_id, "completed")
    assert final["terminated"] == {"exitcode": 0, "reason": "Instance completed"}
    late = await client.post(
        f"/instance/{instance_id}/input", content=b"x", headers={"content-type": "text/plain"}
    )
    assert late.status_code == 410 and late.json()["error"]


async def test_args_and_app_config(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package(ARGS))
    instance_id = await start(client, sequence_id, args=["Hello", 123, {"abc": 456}], appConfig={"x": 1})
    with trio.fail_after(15):
        output = await read_stream(client, f"/instance/{instance_id}/output")
    assert json.loads(output) == {"args": ["Hello", 123, {"abc": 456}], "config": {"x": 1}}
    info = (await client.get(f"/instance/{instance_id}")).json()
    assert info["args"] == ["Hello", 123, {"abc": 456}] and info["appConfig"] == {"x": 1}


async def test_start_bad_payloads(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package(FOREVER))
    for body, status in (
        (b"{not json", 400),
        (b'{"args": "nope"}', 400),
        (b'{"appConfig": []}', 400),
        (b'{"instanceId": "../etc"}', 400),
    ):
        response = await client.post(
            f"/sequence/{sequence_id}/start", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == status, body
        assert response.json()["error"]
    response = await client.post(
        f"/sequence/{sequence_id}/start", content=b"{}", headers={"content-type": "text/csv"}
    )
    assert response.status_code == 415
    assert (await client.post("/sequence/nope/start", json={})).status_code == 404


async def test_stop_handler_runs(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package(STOP_HANDLER))
    instance_id = await start(client, sequence_id)
    response = await client.post(
        f"/instance/{instance_id}/_stop", json={"timeout": 4000, "canCallKeepalive": False}
    )
    assert response.status_code == 202
    final = await wait_status(client, instance_id, "completed", "errored")
    assert final["status"] == "completed" and final["terminated"]["reason"] == "Instance stopped"
    with trio.fail_after(10):
        assert (
            await read_stream(client, f"/instance/{instance_id}/stdout") == b"Cleaning up... Cleanup done.\n"
        )


async def test_keep_alive_during_stop(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package(KEEP_ALIVE))
    instance_id = await start(client, sequence_id)
    # One round: that the window repeats is the hub's own (tests/unit/test_instance.py).
    for _ in range(1):
        response = await client.post(
            f"/instance/{instance_id}/_stop", json=[4001, {"timeout": 1000, "canCallKeepalive": True}]
        )
        assert response.status_code == 202
        assert (await client.get(f"/instance/{instance_id}")).json()["status"] == "running"
        assert (await client.get(f"/instance/{instance_id}/health")).json()["healthy"] is True
    response = await client.post(
        f"/instance/{instance_id}/_stop", json={"timeout": 0, "canCallKeepalive": False}
    )
    assert response.status_code == 202
    final = await wait_status(client, instance_id, "completed", "errored")
    assert final["status"] == "completed"


async def test_exception_goes_to_stderr_and_errors(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package(RAISES))
    instance_id = await start(client, sequence_id)
    final = await wait_status(client, instance_id, "errored")
    assert "TestException" in final["terminated"]["reason"]
    with trio.fail_after(10):
        stderr = await read_stream(client, f"/instance/{instance_id}/stderr")
    assert b"TestException: This exception should appear on stderr" in stderr


async def test_broken_module_fails_the_start(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package("def run(:\n"))
    response = await client.post(f"/sequence/{sequence_id}/start", json={})
    assert response.status_code == 400 and "failed on start" in response.json()["error"]
    missing = await upload(client, python_package(ECHO, main="nope.py"))
    response = await client.post(f"/sequence/{missing}/start", json={})
    assert response.status_code == 400 and "nope.py" in response.json()["error"]


async def test_kill_twice_and_kill_ignoring_sigterm(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package(IGNORES_SIGTERM))
    instance_id = await start(client, sequence_id)
    first = await client.post(f"/instance/{instance_id}/_kill", json={})
    assert first.status_code == 202 and first.json()["status"] == "killing"
    final = await wait_status(client, instance_id, "completed", "errored")
    assert final["status"] == "completed" and final["terminated"]["reason"] == "Instance killed"
    second = await client.post(f"/instance/{instance_id}/_kill", json=[4002, {}])
    assert second.status_code == 400 and second.json()["error"]


async def test_events_round_trip(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package(EVENTS))
    instance_id = await start(client, sequence_id)
    async with trio.open_nursery() as nursery:
        results: list[object] = []

        async def wait_once() -> None:
            results.append((await client.get(f"/instance/{instance_id}/once/test-response")).json())

        nursery.start_soon(wait_once)
        await trio.sleep(0.3)
        response = await client.post(
            f"/instance/{instance_id}/_event", json={"eventName": "test-event", "message": "foo"}
        )
        assert response.status_code == 200
    assert results == ["reply to foo"]
    # array form and the Python client's misspelt key
    await client.post(
        f"/instance/{instance_id}/_event", json=[5001, {"eventName": "test-event", "messagee": "bar"}]
    )
    with trio.fail_after(10):
        while (await client.get(f"/instance/{instance_id}/event/test-response")).json() != "reply to bar":
            await trio.sleep(0.05)
    assert (await client.get(f"/instance/{instance_id}/event")).json() == "reply to bar"
    bad = await client.post(f"/instance/{instance_id}/_event", json={"message": "no name"})
    assert bad.status_code == 400
    await client.post(f"/instance/{instance_id}/_kill", json={})


async def test_event_stream(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package(EVENTS))
    instance_id = await start(client, sequence_id)
    received: list[object] = []
    with trio.fail_after(15):
        async with client.stream("GET", f"/instance/{instance_id}/events/test-response") as response:
            for n in range(3):
                await client.post(
                    f"/instance/{instance_id}/_event", json={"eventName": "test-event", "message": n}
                )
            async for line in response.aiter_lines():
                received.append(json.loads(line))
                if len(received) == 3:
                    break
    assert received == ["reply to 0", "reply to 1", "reply to 2"]
    await client.post(f"/instance/{instance_id}/_kill", json={})


async def test_flooded_stdout_does_not_block_events(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package(FLOOD_WITH_EVENTS))
    instance_id = await start(client, sequence_id)
    await trio.sleep(1.0)  # let stdout fill every buffer on the way
    async with trio.open_nursery() as nursery:
        answer: list[object] = []

        async def wait_pong() -> None:
            answer.append((await client.get(f"/instance/{instance_id}/once/pong")).json())

        nursery.start_soon(wait_pong)
        await trio.sleep(0.3)
        with trio.fail_after(10):
            await client.post(f"/instance/{instance_id}/_event", json={"eventName": "ping", "message": 7})
    assert answer == [{"got": 7}]
    assert (await client.get(f"/instance/{instance_id}/health")).json()["healthy"] is True
    # The unread stdout was kept, not dropped: a reader now gets the start of it.
    head = await read_stream(client, f"/instance/{instance_id}/stdout", limit=4096)
    assert head.startswith(b"x" * 1000 + b"\n")
    await client.post(f"/instance/{instance_id}/_kill", json={})


async def test_binary_output_is_exact(client: httpx.AsyncClient) -> None:
    source = "def run(context, input, *args):\n    return bytes(range(256)) * 4096\n"
    sequence_id = await upload(
        client,
        python_package(
            source.replace(
                "def run", "provides = {'provides': '', 'contentType': 'application/octet-stream'}\ndef run"
            )
        ),
    )
    instance_id = await start(client, sequence_id)
    with trio.fail_after(15):
        output = await read_stream(client, f"/instance/{instance_id}/output")
    assert hashlib.sha256(output).digest() == hashlib.sha256(bytes(range(256)) * 4096).digest()


async def test_delete_sequence_in_use(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package(FOREVER))
    instance_id = await start(client, sequence_id)
    response = await client.delete(f"/sequence/{sequence_id}")
    assert response.status_code == 409 and response.json()["error"]
    response = await client.delete(f"/sequence/{sequence_id}", headers={"x-seq-kill-inst": "true"})
    assert response.status_code == 200
    assert (await client.get(f"/instance/{instance_id}")).json()["status"] == "completed"


async def test_stdin_and_instance_log(client: httpx.AsyncClient) -> None:
    source = """
import sys
async def run(context, input, *args):
    context.logger.info("Debug log message")
    data = await sys.stdin.read()
    print(f"Got on stdin: {data.strip()}")
"""
    sequence_id = await upload(client, python_package(source))
    instance_id = await start(client, sequence_id)
    response = await client.post(f"/instance/{instance_id}/stdin", content=b"python runner\n")
    assert response.status_code == 200
    with trio.fail_after(15):
        assert (
            await read_stream(client, f"/instance/{instance_id}/stdout") == b"Got on stdin: python runner\n"
        )
        log = await read_stream(client, f"/instance/{instance_id}/log")
    messages = [json.loads(line)["msg"] for line in log.splitlines()]
    assert "Debug log message" in messages


async def test_instances_listing(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package(FOREVER))
    first = await start(client, sequence_id)
    second = await start(client, sequence_id, instanceId="my-instance-1")
    assert second == "my-instance-1"
    duplicate = await client.post(f"/sequence/{sequence_id}/start", json={"instanceId": "my-instance-1"})
    assert duplicate.status_code == 409
    ids = [i["id"] for i in (await client.get("/instances")).json()]
    assert first in ids and second in ids
    for instance_id in (first, second):
        await client.post(f"/instance/{instance_id}/_kill", json={})


async def test_kill_with_remove_immediately(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, python_package(FOREVER))
    instance_id = await start(client, sequence_id)
    response = await client.post(f"/instance/{instance_id}/_kill", json={"removeImmediately": True})
    assert response.status_code == 202
    with trio.fail_after(15):
        while (await client.get(f"/instance/{instance_id}")).status_code != 404:
            await trio.sleep(0.05)
    assert instance_id not in (await client.get(f"/sequence/{sequence_id}/instances")).json()


async def test_remove_immediately_forgets_an_ended_instance(client: httpx.AsyncClient) -> None:
    instance_id = await start(client, await upload(client, python_package(ARGS)))
    await wait_status(client, instance_id, "completed")
    response = await client.post(f"/instance/{instance_id}/_kill", json={"removeImmediately": True})
    assert response.status_code == 202
    with trio.fail_after(15):
        while (await client.get(f"/instance/{instance_id}")).status_code != 404:
            await trio.sleep(0.05)


async def test_ended_instance_holds_no_pipes(client: httpx.AsyncClient, hub: HubProcess) -> None:
    hub_process = psutil.Process(hub.process.pid)
    await client.get("/version")
    before = hub_process.num_fds()
    sequence_id = await upload(client, python_package(ARGS))
    for _ in range(5):
        await wait_status(client, await start(client, sequence_id), "completed")
    with trio.fail_after(10):
        while hub_process.num_fds() > before + 2:  # the instances stay listed, their pipes do not
            await trio.sleep(0.1)


HUB_CLIENT = """
import json
async def run(context, input, *args):
    hub = context.hub
    version = await hub.get_version()
    load = await hub.get_load_check()
    status = await hub.get_status()
    sequences = await hub.list_sequences()
    instances = await hub.list_instances()
    started = await hub.start_sequence(args[0], app_config={"from": "a sequence"}, args=["Hi"])
    child = await hub.get_instance(started["id"])
    await hub.kill_instance(started["id"])
    try:
        await hub.get_sequence("no-such-sequence")
    except Exception as exc:
        missing = getattr(exc, "status", None)
    yield json.dumps({
        "service": version["service"],
        "load": sorted(load),
        "hub": status["id"],
        "sequences": [s["id"] for s in sequences],
        "instances": [i["id"] for i in instances],
        "child": child["appConfig"],
        "missing": missing,
    }) + "\\n"
"""


async def test_a_sequence_drives_its_own_hub_through_context_hub(
    client: httpx.AsyncClient, runtime: str
) -> None:
    if runtime == "podman":
        pytest.skip("a container on the default network (none) cannot reach the hub; see docs/podman.md")
    target = await upload(client, python_package(KEEP_ALIVE))
    driver = await upload(client, python_package(HUB_CLIENT))
    instance_id = await start(client, driver, args=[target])
    with trio.fail_after(20):
        output = await read_stream(client, f"/instance/{instance_id}/output")
    seen = json.loads(output.decode().splitlines()[0])
    status = (await client.get("/status")).json()
    assert seen["service"] == "@scramjet/host" and seen["hub"] == status["id"]
    assert {"avgLoad", "memFree"} <= set(seen["load"])
    assert {target, driver} <= set(seen["sequences"]) and instance_id in seen["instances"]
    assert seen["child"] == {"from": "a sequence"} and seen["missing"] == 404
