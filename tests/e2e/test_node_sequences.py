"""End-to-end: Node.js Sequences on the real `sth` (sth-spec §3.1 and the Node scenarios of §10).

Rules as in test_hub_api.py: a real hub over 127.0.0.1, every wait bounded (httpx
timeouts, trio.fail_after), the hub still serving afterwards. Skipped without `node`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.helpers import HubProcess, make_package, run_sth

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")

TIMEOUT = httpx.Timeout(20.0)


def node_package(files: dict[str, str | bytes], main: str = "index.js", **package: Any) -> bytes:
    """A Node.js package: no engines.python3 in its package.json."""
    return make_package(files, package_json={"name": "node-seq", "version": "1.0.0", "main": main, **package})


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


async def start(client: httpx.AsyncClient, package: bytes, **payload: object) -> str:
    sequence_id = await upload(client, package)
    response = await client.post(f"/sequence/{sequence_id}/start", json=payload)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


async def read_stream(client: httpx.AsyncClient, path: str, limit: int | None = None) -> bytes:
    data = b""
    with trio.fail_after(15):
        async with client.stream("GET", path) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                data += chunk
                if limit is not None and len(data) >= limit:
                    break
    return data


async def wait_status(client: httpx.AsyncClient, instance_id: str, *statuses: str) -> dict[str, Any]:
    with trio.fail_after(15):
        while True:
            info = (await client.get(f"/instance/{instance_id}")).json()
            if info["status"] in statuses:
                return dict(info)
            await trio.sleep(0.05)


async def event_reply(
    client: httpx.AsyncClient, instance_id: str, send: str, message: object, reply: str
) -> object:
    """Send event ``send`` and return the message of the next ``reply`` event."""
    answers: list[object] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def wait_once() -> None:
                answers.append((await client.get(f"/instance/{instance_id}/once/{reply}")).json())

            nursery.start_soon(wait_once)
            await trio.sleep(0.3)
            response = await client.post(
                f"/instance/{instance_id}/_event", json={"eventName": send, "message": message}
            )
            assert response.status_code == 200, response.text
    return answers[0]


# --------------------------------------------------------------------- sequences

SIMPLE_STDIO = """
const readline = require("readline");
module.exports = async function (_input, noLinger) {
    for await (const line of readline.createInterface({ input: process.stdin })) {
        console.log(`>>> ${line}`);
    }
};
"""

ARGS_TO_OUTPUT = """
const { PassThrough } = require("stream");
module.exports = function (_input, first, second, third, fourth) {
    const out = new PassThrough();
    out.end(`${first}\\n${second}\\n${third.abc}\\n${fourth[0]}\\n`);
    return out;
};
"""

ARGS_CONFIG = """
module.exports = async function (_input, ...args) {
    const lines = [`config: ${JSON.stringify(this.config)}`];
    for (const arg of args) lines.push(`${typeof arg}, ${JSON.stringify(arg)}`);
    return lines.join("\\n") + "\\n";
};
"""

EVENTS = """
module.exports = function () {
    this.on("test-event", (message) => {
        console.log(`event ${JSON.stringify(message)}`);
        this.emit("test-event-response", "message from sequence");
    });
    this.on("foo", (message) => this.emit("bar", `reply to ${message}`));
};
"""

CAN_KEEP_ALIVE = """
module.exports = function () {
    this.addStopHandler(async (timeout, canCallKeepalive) => {
        console.log(`stop ${timeout} ${canCallKeepalive}`);
        if (canCallKeepalive) this.keepAlive(5000);
    });
    return new Promise(() => {});
};
"""

BUSY_LOOP = """
module.exports = function () {
    setTimeout(() => { for (;;) {} }, 200);
    return new Promise(() => {});
};
"""

BIN_OUT = """
const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
module.exports = function () {
    const file = path.join(__dirname, "data", "random.bin");
    console.log(crypto.createHash("sha256").update(fs.readFileSync(file)).digest("hex"));
    return fs.createReadStream(file);
};
"""

RAISES = """
class TestException extends Error {}
module.exports = async function () {
    await new Promise((resolve) => setTimeout(resolve, 50));
    throw new TestException("This exception should appear on stderr");
};
"""

FLOOD_STDOUT = """
const { once } = require("events");
module.exports = async function () {
    this.on("test-event", () => this.emit("test-event-response", "still answering"));
    const line = "x".repeat(1000) + "\\n";
    for (;;) {
        if (!process.stdout.write(line)) await once(process.stdout, "drain");
        await new Promise((resolve) => setImmediate(resolve));
    }
};
"""


# --------------------------------------------------------------------- tests


async def test_language_and_stdin_echo(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, node_package({"index.js": SIMPLE_STDIO}))
    assert (await client.get(f"/sequence/{sequence_id}")).json()["config"]["language"] == "js"
    response = await client.post(f"/sequence/{sequence_id}/start", json={"args": ["1"]})
    assert response.status_code == 200, response.text
    instance_id = response.json()["id"]
    response = await client.post(f"/instance/{instance_id}/stdin", content=b"Hello Alice!\n")
    assert response.status_code == 200
    assert await read_stream(client, f"/instance/{instance_id}/stdout") == b">>> Hello Alice!\n"
    final = await wait_status(client, instance_id, "completed", "errored")
    assert final["terminated"] == {"exitcode": 0, "reason": "Instance completed"}


async def test_args_to_output(client: httpx.AsyncClient) -> None:
    args = ["Hello", 123, {"abc": 456}, ["789"]]
    instance_id = await start(client, node_package({"index.js": ARGS_TO_OUTPUT}), args=args)
    assert await read_stream(client, f"/instance/{instance_id}/output") == b"Hello\n123\n456\n789\n"
    assert (await client.get(f"/instance/{instance_id}")).json()["args"] == args


async def test_app_config_and_arg_types(client: httpx.AsyncClient) -> None:
    instance_id = await start(
        client,
        node_package({"index.js": ARGS_CONFIG}),
        appConfig={"x": 1},
        args=["123", 4, True, {"a": [1]}],
    )
    output = await read_stream(client, f"/instance/{instance_id}/output")
    assert output.decode() == (
        'config: {"x":1}\nstring, "123"\nnumber, 4\nboolean, true\nobject, {"a":[1]}\n'
    )
    info = (await client.get(f"/instance/{instance_id}")).json()
    assert info["appConfig"] == {"x": 1}


async def test_event_round_trip(client: httpx.AsyncClient) -> None:
    instance_id = await start(client, node_package({"index.js": EVENTS}))
    reply = await event_reply(client, instance_id, "test-event", {"test": 1}, "test-event-response")
    assert reply == "message from sequence"
    assert await event_reply(client, instance_id, "foo", "baz", "bar") == "reply to baz"
    # an event without a message
    response = await client.post(f"/instance/{instance_id}/_event", json={"eventName": "test-event"})
    assert response.status_code == 200
    head = await read_stream(client, f"/instance/{instance_id}/stdout", limit=len(b'event {"test":1}\n'))
    assert head.startswith(b'event {"test":1}\n')
    # handlers and no output: the instance lives on
    assert (await client.get(f"/instance/{instance_id}")).json()["status"] == "running"
    await client.post(f"/instance/{instance_id}/_kill", json={})
    final = await wait_status(client, instance_id, "completed", "errored")
    assert final["status"] == "completed"


async def test_stop_with_keep_alive(client: httpx.AsyncClient) -> None:
    instance_id = await start(client, node_package({"index.js": CAN_KEEP_ALIVE}))
    await trio.sleep(0.2)
    assert (await client.get(f"/instance/{instance_id}/health")).json()["healthy"] is True
    # One round: that the window repeats is the hub's own (tests/unit/test_instance.py).
    for _ in range(1):
        response = await client.post(
            f"/instance/{instance_id}/_stop", json={"timeout": 1000, "canCallKeepalive": True}
        )
        assert response.status_code == 202
        assert (await client.get(f"/instance/{instance_id}")).json()["status"] == "running"
        assert (await client.get(f"/instance/{instance_id}/health")).json()["healthy"] is True
    response = await client.post(
        f"/instance/{instance_id}/_stop", json={"timeout": 0, "canCallKeepalive": False}
    )
    assert response.status_code == 202
    final = await wait_status(client, instance_id, "completed", "errored")
    assert final["status"] == "completed" and final["terminated"]["reason"] == "Instance stopped"
    stdout = await read_stream(client, f"/instance/{instance_id}/stdout")
    assert stdout == b"stop 1000 true\nstop 0 false\n"


async def test_busy_loop_is_killed_on_time(client: httpx.AsyncClient) -> None:
    instance_id = await start(client, node_package({"index.js": BUSY_LOOP}))
    await trio.sleep(0.5)  # now spinning: it reads no control message and no signal
    pid = (await client.get(f"/instance/{instance_id}/health")).json()["processId"]
    started = time.monotonic()
    response = await client.post(f"/instance/{instance_id}/_kill", json={})
    assert response.status_code == 202 and response.json()["status"] == "killing"
    final = await wait_status(client, instance_id, "completed", "errored")
    assert time.monotonic() - started < 5  # the fixture's kill grace is 1 s
    assert final["status"] == "completed" and final["terminated"]["reason"] == "Instance killed"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_binary_output_is_exact(client: httpx.AsyncClient) -> None:
    data = os.urandom(2 * 1024 * 1024 + 3)
    instance_id = await start(client, node_package({"index.js": BIN_OUT, "data/random.bin": data}))
    output = await read_stream(client, f"/instance/{instance_id}/output")
    stdout = await read_stream(client, f"/instance/{instance_id}/stdout")
    digest = hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(output).hexdigest() == digest
    assert stdout.decode().strip() == digest


async def test_binary_input_checksum(client: httpx.AsyncClient) -> None:
    source = """
    const crypto = require("crypto");
    module.exports = async function (input) {
        const hash = crypto.createHash("md5");
        for await (const chunk of input) hash.update(chunk);
        return hash.digest("hex");
    };
    """
    instance_id = await start(client, node_package({"index.js": source}))
    data = os.urandom(1024 * 1024)
    response = await client.post(
        f"/instance/{instance_id}/input", content=data, headers={"content-type": "application/octet-stream"}
    )
    assert response.status_code == 200
    output = await read_stream(client, f"/instance/{instance_id}/output")
    assert output.decode() == hashlib.md5(data).hexdigest()  # a checksum, as in PT-004


async def test_ndjson_input_to_generator_output(client: httpx.AsyncClient) -> None:
    source = """
    module.exports = async function* (input) {
        for await (const item of input) yield `Name is: ${item.name}`;
    };
    """
    instance_id = await start(client, node_package({"index.js": source}))
    response = await client.post(
        f"/instance/{instance_id}/input",
        content=b'{"name":"Hulk"}\n{"name":"Thor"}\n',
        headers={"content-type": "application/x-ndjson"},
    )
    assert response.status_code == 200
    output = await read_stream(client, f"/instance/{instance_id}/output")
    assert [json.loads(line) for line in output.splitlines()] == ["Name is: Hulk", "Name is: Thor"]


async def test_inert_async_function_completes(client: httpx.AsyncClient) -> None:
    instance_id = await start(client, node_package({"index.js": "module.exports = async function () {};\n"}))
    final = await wait_status(client, instance_id, "completed", "errored")
    assert final["terminated"] == {"exitcode": 0, "reason": "Instance completed"}
    assert await read_stream(client, f"/instance/{instance_id}/output") == b""


async def test_main_without_extension(client: httpx.AsyncClient) -> None:
    source = "module.exports = function () { return 'from ./index'; };\n"
    instance_id = await start(client, node_package({"index.js": source}, main="./index"))
    assert await read_stream(client, f"/instance/{instance_id}/output") == b"from ./index"


async def test_missing_main_fails_the_start(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(
        client, node_package({"index.js": "module.exports = () => 1;\n"}, main="app.js")
    )
    response = await client.post(f"/sequence/{sequence_id}/start", json={})
    assert response.status_code == 400
    assert response.json()["error"] == (
        "Sequence entrypoint path app.js is invalid. Check `main` field in Sequence package.json"
    )
    assert (await client.get(f"/sequence/{sequence_id}/instances")).json() == []


async def test_broken_module_fails_the_start(client: httpx.AsyncClient) -> None:
    sequence_id = await upload(client, node_package({"index.js": "module.exports = function ( {\n"}))
    response = await client.post(f"/sequence/{sequence_id}/start", json={})
    assert response.status_code == 400
    assert response.json()["error"].startswith("Sequence failed on start: SyntaxError")


async def test_exception_errors_with_stack_on_stderr(client: httpx.AsyncClient) -> None:
    instance_id = await start(client, node_package({"index.js": RAISES}))
    final = await wait_status(client, instance_id, "errored")
    assert final["terminated"] == {
        "exitcode": 23,
        "reason": "Sequence failed during execution: TestException: This exception should appear on stderr",
    }
    stderr = await read_stream(client, f"/instance/{instance_id}/stderr")
    assert b"This exception should appear on stderr" in stderr
    assert b"    at " in stderr  # the stack


async def test_flooded_stdout_still_answers_events(client: httpx.AsyncClient) -> None:
    instance_id = await start(client, node_package({"index.js": FLOOD_STDOUT}))
    await trio.sleep(1.0)  # let stdout fill every buffer on the way
    assert (
        await event_reply(client, instance_id, "test-event", None, "test-event-response") == "still answering"
    )
    assert (await client.get(f"/instance/{instance_id}/health")).json()["healthy"] is True
    head = await read_stream(client, f"/instance/{instance_id}/stdout", limit=4096)
    assert head.startswith(b"x" * 1000 + b"\n")
    await client.post(f"/instance/{instance_id}/_kill", json={})
    final = await wait_status(client, instance_id, "completed", "errored")
    assert final["status"] == "completed"


async def test_topic_from_node_producer_to_node_consumer(client: httpx.AsyncClient) -> None:
    producer = """
    const { Readable } = require("stream");
    module.exports = function () {
        const out = Readable.from(["Bonnie\\n", "Rosa\\n", "Fahume\\n"]);
        out.topic = "node-names";
        out.contentType = "text/plain";
        return out;
    };
    """
    consumer = """
    module.exports = [
        { requires: "node-names", contentType: "text/plain" },
        async function* (input) {
            let rest = "";  // text/plain comes in chunks, not lines; a topic does not end
            for await (const chunk of input) {
                const lines = (rest + chunk).split("\\n");
                rest = lines.pop();
                for (const name of lines) yield `consumer got: ${name}`;
            }
        },
    ];
    """
    consumer_id = await start(client, node_package({"index.js": consumer}))
    producer_id = await start(client, node_package({"index.js": producer}))
    expected = b'"consumer got: Bonnie"\n"consumer got: Rosa"\n"consumer got: Fahume"\n'
    assert await read_stream(client, f"/instance/{consumer_id}/output", limit=len(expected)) == expected
    assert (await client.get(f"/instance/{producer_id}")).json()["provides"] == "node-names"
    assert (await client.get(f"/instance/{consumer_id}")).json()["requires"] == "node-names"
    refused = await client.post(
        f"/instance/{consumer_id}/input", content=b"x", headers={"content-type": "text/plain"}
    )
    assert refused.status_code == 405
    await client.post(f"/instance/{consumer_id}/_kill", json={})


NATURAL = """
module.exports = function () {
    this.on('ping', (message) => this.emit('pong', message));
    return 'all done';
};
"""


async def test_natural_completion_lingers_10_s_as_the_original(tmp_path: Path) -> None:
    """A hub with the default --node-exit-timeout: once the output ended the instance stays
    running 10 s, events answered, then completes with "Instance completed"."""
    with run_sth(tmp_path / "sequences", "--instance-lifetime", "30") as hub:
        async with httpx.AsyncClient(base_url=hub.url, timeout=TIMEOUT) as client:
            assert (await client.get("/config")).json()["timings"]["nodeExitTimeout"] == 10
            instance_id = await start(client, node_package({"index.js": NATURAL}))
            assert await read_stream(client, f"/instance/{instance_id}/output") == b"all done"
            ended_output = trio.current_time()
            assert (await client.get(f"/instance/{instance_id}")).json()["status"] == "running"
            assert await event_reply(client, instance_id, "ping", "still here", "pong") == "still here"
            with trio.fail_after(20):
                final = await wait_status_long(client, instance_id, "completed", "errored")
            assert final["status"] == "completed" and final["terminated"]["reason"] == "Instance completed"
            assert 8 < trio.current_time() - ended_output < 15


async def wait_status_long(client: httpx.AsyncClient, instance_id: str, *statuses: str) -> dict[str, Any]:
    while True:
        info = (await client.get(f"/instance/{instance_id}")).json()
        if info["status"] in statuses:
            return dict(info)
        await trio.sleep(0.2)


BUSY_WITH_HEALTH_CHECK = """
module.exports = function () {
    this.addMonitoringHandler(async () => {
        await new Promise((resolve) => setTimeout(resolve, 50));
        return { healthy: true };
    });
    setTimeout(() => { const end = Date.now() + 3000; while (Date.now() < end) {} }, 1200);
    return new Promise(() => {});
};
"""


async def test_a_busy_instance_reports_its_last_known_health(client: httpx.AsyncClient) -> None:
    """While its event loop is blocked the runner sends no health; the hub answers with the
    last it had (healthy), not unhealthy at once, and the loop's return changes nothing."""
    instance_id = await start(client, node_package({"index.js": BUSY_WITH_HEALTH_CHECK}))
    seen: list[bool] = []
    with trio.fail_after(30):
        began = trio.current_time()
        while trio.current_time() - began < 5.5:  # before, during and after the busy 3 s
            seen.append((await client.get(f"/instance/{instance_id}/health")).json()["healthy"])
            await trio.sleep(0.25)
    assert seen and all(seen), seen
    await client.post(f"/instance/{instance_id}/_kill", json={})


HOST_CLIENT = """
module.exports = async function (_input, sequenceId) {
    const version = await this.hub.getVersion();
    const load = await this.hub.getLoadCheck();
    const config = await this.hub.getConfig();
    const status = await this.hub.getStatus();
    const sequences = await this.hub.listSequences();
    const instances = await this.hub.listInstances();
    const started = await this.hub.getSequenceClient(sequenceId).start({ appConfig: { from: 'node' } });
    const info = await started.getInfo();
    await started.kill();
    let missing = null;
    try { await this.hub.getSequenceClient('nope').getInfo(); } catch (err) { missing = err.code; }
    return JSON.stringify({
        service: version.service, load: Object.keys(load).sort(), hasConfig: !!config.host,
        hub: status.id, sequences: sequences.length, instances: instances.length,
        childId: started._id, child: info.appConfig, missing,
    }) + '\\n';
};
"""


async def test_this_hub_is_the_original_host_client(client: httpx.AsyncClient, runtime: str) -> None:
    """What the original's js-hostclient apps do: version, load, config, status, lists, and
    starting another sequence, through `this.hub` against the hub the instance runs on."""
    if runtime == "podman":
        pytest.skip("a container on the default network (none) cannot reach the hub; see docs/podman.md")
    target = await upload(client, node_package({"index.js": BUSY_LOOP}))
    instance_id = await start(client, node_package({"index.js": HOST_CLIENT}), args=[target])
    seen = json.loads(await read_stream(client, f"/instance/{instance_id}/output"))
    assert seen["service"] == "@scramjet/host" and seen["hasConfig"] is True
    assert seen["hub"] == (await client.get("/status")).json()["id"]
    assert {"avgLoad", "fsSize"} <= set(seen["load"]) and seen["sequences"] >= 2 and seen["instances"] >= 1
    assert seen["child"] == {"from": "node"} and seen["childId"] and seen["missing"] == 404
