"""End-to-end: topics on the real `sth` — API and instances as writers and readers."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator

import httpx
import psutil
import pytest
import trio

from tests.helpers import HubProcess, python_package

TIMEOUT = httpx.Timeout(30.0)

PRODUCER = """
async def run(context, input, *args):
    async for line in input:
        yield f"producer got: {line}"
"""

CONSUMER = """
async def run(context, input, *args):
    async for line in input:
        yield f"consumer got: {line}"
"""

NAMES = """
provides = {"provides": "names", "contentType": "application/x-ndjson"}
async def run(context, input, *args):
    for name in ["Bonnie", "Rosa", "Fahume"]:
        yield {"name": name}
"""

DECLARED_CONSUMER = """
requires = {"requires": "avengers", "contentType": "application/x-ndjson"}
async def run(context, input, *args):
    async for item in input:
        yield f"Name is: {item['name']}\\n"
"""


TEXT_CONSUMER = """
requires = {"requires": "mixed", "contentType": "text/plain"}
async def run(context, input, *args):
    async for line in input:
        yield f"line: {line}"
"""


@pytest.fixture
async def client(hub: HubProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=hub.url, timeout=TIMEOUT) as http:
        yield http
    assert hub.alive()


async def upload(client: httpx.AsyncClient, source: str) -> str:
    response = await client.post("/sequence", content=python_package(source))
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def start(client: httpx.AsyncClient, sequence_id: str, **payload: object) -> str:
    response = await client.post(f"/sequence/{sequence_id}/start", json=payload)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


async def read_until(
    client: httpx.AsyncClient, path: str, size: int, headers: dict[str, str] | None = None
) -> bytes:
    data = b""
    async with client.stream("GET", path, headers=headers or {}) as response:
        assert response.status_code == 200, await response.aread()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) >= size:
                break
    return data


@pytest.mark.parametrize(
    "content_type", ["application/x-ndjson", "text/x-ndjson", "text/plain", "application/octet-stream"]
)
async def test_api_to_api_each_content_type(client: httpx.AsyncClient, content_type: str) -> None:
    name = "city-" + content_type.replace("/", "-")
    body = b'{ "city": "New York" }\n'
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            received: list[bytes] = []

            async def reader() -> None:
                received.append(
                    await read_until(client, f"/topic/{name}", len(body), {"content-type": content_type})
                )

            nursery.start_soon(reader)
            await trio.sleep(0.3)
            response = await client.post(
                f"/topic/{name}", content=body, headers={"content-type": content_type}
            )
            assert response.status_code == 202
    assert received == [body]
    listed = {t["topic"]: t for t in (await client.get("/topics")).json()}
    assert listed[name]["contentType"] == content_type


async def test_a_topic_outlives_its_producers_and_mismatch_is_refused(client: httpx.AsyncClient) -> None:
    """x-end-stream ends that request's data (200), not the topic: what is posted before any
    reader is kept for the first one, and a reader that stays gets one producer after another."""
    response = await client.post(
        "/topic/names",
        content=b'{"a":1}',
        headers={"content-type": "application/x-ndjson", "x-end-stream": "true"},
    )
    assert response.status_code == 200  # nobody reads yet: kept, not thrown away
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def reader() -> None:
                got.append(await read_until(client, "/topic/names", 24))

            nursery.start_soon(reader)
            await trio.sleep(0.3)
            for record, end in ((b'{"b":2}\n', "true"), (b'{"c":3}', "false")):
                response = await client.post(
                    "/topic/names",
                    content=record,
                    headers={"content-type": "application/x-ndjson", "x-end-stream": end},
                )
                assert response.status_code == (200 if end == "true" else 202)
    assert got == [b'{"a":1}\n{"b":2}\n{"c":3}\n']  # a missing final newline is added for NDJSON
    bad = await client.post("/topic/names", content=b"x", headers={"content-type": "text/plain"})
    assert bad.status_code == 415 and bad.json()["error"]
    bad = await client.post("/topic/names", content=b"x", headers={"content-type": "image/png"})
    assert bad.status_code == 415
    bad = await client.post("/topic/bad name!", content=b"x")
    assert bad.status_code in (400, 404)


async def test_create_list_delete(client: httpx.AsyncClient) -> None:
    response = await client.post("/topics", json={"id": "RegularTopic", "content-type": "text/plain"})
    assert response.status_code == 200 and response.json()["contentType"] == "text/plain"
    assert (
        await client.post("/topics", json={"id": "RegularTopic", "content-type": "text/plain"})
    ).status_code == 409
    assert (await client.post("/topics", json={"id": "no spaces"})).status_code == 400
    assert (await client.post("/topics", json={"content-type": "text/plain"})).status_code == 400
    assert "RegularTopic" in [t["topicName"] for t in (await client.get("/topics")).json()]
    assert (await client.delete("/topics/RegularTopic")).status_code == 200
    assert "RegularTopic" not in [t["topic"] for t in (await client.get("/topics")).json()]
    assert (await client.delete("/topics/RegularTopic")).status_code == 404


async def test_declared_producer_to_api_reader(client: httpx.AsyncClient) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def reader() -> None:
                got.append(
                    await read_until(
                        client,
                        "/topic/names",
                        len(b'{"name": "Bonnie"}\n{"name": "Rosa"}\n{"name": "Fahume"}\n'),
                    )
                )

            nursery.start_soon(reader)
            await trio.sleep(0.3)
            instance_id = await start(client, await upload(client, NAMES))
    lines = [json.loads(line) for line in b"".join(got).splitlines()]
    assert lines == [{"name": "Bonnie"}, {"name": "Rosa"}, {"name": "Fahume"}]
    info = (await client.get(f"/instance/{instance_id}")).json()
    assert info["provides"] == "names"


async def test_api_writer_to_declared_consumer_and_input_is_refused(client: httpx.AsyncClient) -> None:
    await client.post(
        "/topic/avengers", content=b'{"name":"Hulk"}\n', headers={"content-type": "application/x-ndjson"}
    )
    instance_id = await start(client, await upload(client, DECLARED_CONSUMER))
    with trio.fail_after(15):
        assert await read_until(client, f"/instance/{instance_id}/output", 14) == b"Name is: Hulk\n"
    refused = await client.post(
        f"/instance/{instance_id}/input", content=b"x", headers={"content-type": "text/plain"}
    )
    assert refused.status_code == 405 and refused.json()["error"] == "Input provided in other way"
    await client.post(f"/instance/{instance_id}/_kill", json={})


async def test_a_consumer_declaring_another_type_is_connected_with_a_warning(
    client: httpx.AsyncClient,
) -> None:
    """As on the original: the bytes pass through, and the instance's log says why they may
    not be what the sequence expects. A start never succeeds while connecting nothing."""
    created = await client.post("/topics", json={"id": "mixed", "content-type": "application/x-ndjson"})
    assert created.status_code == 200, created.text
    instance_id = await start(client, await upload(client, TEXT_CONSUMER))
    await client.post("/topic/mixed", content=b'{"n":1}\n', headers={"content-type": "application/x-ndjson"})
    with trio.fail_after(15):
        assert await read_until(client, f"/instance/{instance_id}/output", 14) == b'line: {"n":1}\n'
        async with client.stream("GET", f"/instance/{instance_id}/log") as response:
            async for line in response.aiter_lines():
                if "carries application/x-ndjson" in line:
                    assert "text/plain" in line and "connected anyway" in line
                    break
    listed = {t["topic"]: t for t in (await client.get("/topics")).json()}
    assert instance_id in listed["mixed"]["consumers"]
    await client.post(f"/instance/{instance_id}/_kill", json={})
    bad = await client.post(f"/sequence/{await upload(client, CONSUMER)}/start", json={"inputTopic": "no/t"})
    assert bad.status_code == 400 and "Topic name" in bad.json()["error"]


async def test_producer_instance_to_consumer_instance(client: httpx.AsyncClient) -> None:
    producer_seq = await upload(client, PRODUCER)
    consumer_seq = await upload(client, CONSUMER)
    consumer = await start(client, consumer_seq, inputTopic="names3")
    producer = await start(client, producer_seq, outputTopic="names3")
    response = await client.post(
        f"/instance/{producer}/input", content=b"topic test input\n", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 200
    expected = b"consumer got: producer got: topic test input\n"
    with trio.fail_after(15):
        assert await read_until(client, f"/instance/{consumer}/output", len(expected)) == expected
    topics = {t["topic"]: t for t in (await client.get("/topics")).json()}
    assert consumer in topics["names3"]["consumers"]
    for instance_id in (producer, consumer):
        await client.post(f"/instance/{instance_id}/_kill", json={})


async def test_killed_consumer_does_not_steal_from_the_next(client: httpx.AsyncClient) -> None:
    consumer_seq = await upload(client, CONSUMER)
    first = await start(client, consumer_seq, inputTopic="relay")
    await client.post(f"/instance/{first}/_kill", json={})
    with trio.fail_after(15):
        while (await client.get(f"/instance/{first}")).json()["status"] not in ("completed", "errored"):
            await trio.sleep(0.05)
    second = await start(client, consumer_seq, inputTopic="relay")
    await client.post("/topic/relay", content=b"after\n", headers={"content-type": "text/plain"})
    with trio.fail_after(15):
        assert await read_until(client, f"/instance/{second}/output", 20) == b"consumer got: after\n"
    await client.post(f"/instance/{second}/_kill", json={})


async def test_concurrent_writers_records_arrive_whole(client: httpx.AsyncClient) -> None:
    record_a = json.dumps({"who": "a", "pad": "a" * (1024 * 1024)}).encode() + b"\n"
    record_b = json.dumps({"who": "b", "pad": "b" * (1024 * 1024)}).encode() + b"\n"

    async def body(record: bytes) -> AsyncIterator[bytes]:
        for offset in range(0, len(record), 1000):  # many small pieces: interleaving would show
            yield record[offset : offset + 1000]
            await trio.sleep(0)

    got: list[bytes] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                got.append(await read_until(client, "/topic/whole", len(record_a) + len(record_b)))

            nursery.start_soon(reader)
            await trio.sleep(0.3)
            for record in (record_a, record_b):
                nursery.start_soon(
                    lambda r=record: client.post(
                        "/topic/whole", content=body(r), headers={"content-type": "application/x-ndjson"}
                    )
                )
    lines = b"".join(got).splitlines(keepends=True)
    assert sorted(lines) == sorted([record_a, record_b])


async def test_reader_disconnecting_mid_stream(client: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/octet-stream"}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: read_until(client, "/topic/midway", 10, headers))
            await trio.sleep(0.3)
            await client.post("/topic/midway", content=b"0123456789abcdef", headers=headers)
        # That reader is gone; the next one gets what is written from now on.
        got: list[bytes] = []

        async def reader() -> None:
            got.append(await read_until(client, "/topic/midway", 5, headers))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.3)
            await client.post("/topic/midway", content=b"fresh", headers=headers)
    assert got == [b"fresh"]
    # The hub learns of the second reader's disconnect asynchronously (the server's
    # receive task sees the closed socket), so the listing converges rather than flips.
    consumers: list[str] = ["unchecked"]
    with trio.move_on_after(10):
        while consumers:
            topic = {t["topic"]: t for t in (await client.get("/topics")).json()}["midway"]
            consumers = topic["consumers"]
            if consumers:
                await trio.sleep(0.05)
    assert consumers == []


async def test_slow_reader_back_pressures_and_memory_stays_bounded(
    client: httpx.AsyncClient, hub: HubProcess
) -> None:
    headers = {"content-type": "application/octet-stream"}
    total = 200 * 1024 * 1024
    process = psutil.Process(hub.process.pid)
    rss_before = process.memory_info().rss
    peak = rss_before
    chunk = os.urandom(64 * 1024)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(total // len(chunk)):
            yield chunk

    received = 0
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:

            async def slow_reader() -> None:
                nonlocal received, peak
                async with client.stream("GET", "/topic/slow", headers=headers) as response:
                    async for piece in response.aiter_bytes():
                        received += len(piece)
                        if received % (8 * 1024 * 1024) < len(piece):
                            peak = max(peak, process.memory_info().rss)
                            await trio.sleep(0.01)  # slower than the writer
                        if received >= total:
                            break

            nursery.start_soon(slow_reader)
            await trio.sleep(0.3)
            await client.post("/topic/slow", content=body(), headers=headers)
    assert received == total
    assert peak - rss_before < 40 * 1024 * 1024, f"hub RSS grew {(peak - rss_before) / 1e6:.1f} MB"


async def test_one_gigabyte_through_a_topic(client: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/octet-stream"}
    block = os.urandom(1024 * 1024)
    total_blocks = 1024
    sent_digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for n in range(total_blocks):
            piece = block[n % 7 :] + block[: n % 7]
            sent_digest.update(piece)
            yield piece

    got_digest = hashlib.sha256()
    received = 0
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                nonlocal received
                async with client.stream("GET", "/topic/gigabyte", headers=headers) as response:
                    async for piece in response.aiter_bytes():
                        got_digest.update(piece)
                        received += len(piece)
                        if received >= total_blocks * len(block):
                            break

            nursery.start_soon(reader)
            await trio.sleep(0.3)
            await client.post("/topic/gigabyte", content=body(), headers=headers)
    assert received == total_blocks * len(block)
    assert got_digest.hexdigest() == sent_digest.hexdigest()
