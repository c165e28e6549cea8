"""A start's limits on the process runtime: memory, CPU and pids enforced by a cgroup per
instance (cgroup v1 controllers on hybrid hosts like CI, v2 where delegated), the real `sth`.

Each test is skipped where this hub cannot enforce that limit (``/config`` says so), e.g.
as a user without a writable cgroup.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import trio

from tests.helpers import HubProcess, python_package, run_sth

HOG = """
import asyncio
async def run(context, input, *args):
    blocks = []
    for _ in range(40):
        blocks.append(bytearray(20 * 1024 * 1024))  # touched: zero-filled
        await asyncio.sleep(0.01)
    yield "survived 800 MB\\n"
"""

SPIN = """
import json, time
async def run(context, input, *args):
    began_wall, began_cpu = time.monotonic(), time.process_time()
    while time.monotonic() - began_wall < 2.0:
        pass
    yield json.dumps({"cpu": time.process_time() - began_cpu}) + "\\n"
"""

FORKS = """
import json, subprocess
async def run(context, input, *args):
    children, refused = [], 0
    for _ in range(20):
        try:
            children.append(subprocess.Popen(["sleep", "5"]))
        except OSError:
            refused += 1
    for child in children:
        child.kill()
        child.wait()
    yield json.dumps({"started": len(children), "refused": refused}) + "\\n"
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    with run_sth(tmp_path_factory.mktemp("sequences"), "--instance-lifetime", "30") as process:
        yield process


@pytest.fixture
async def client(hub: HubProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=hub.url, timeout=30) as http:
        yield http
    assert hub.alive()


async def require(client: httpx.AsyncClient, limit: str) -> dict[str, Any]:
    shown: dict[str, Any] = (await client.get("/config")).json()["processLimits"]
    if not shown["enforced"][limit]:
        pytest.skip(f"this hub cannot enforce {limit} limits here ({shown['how']})")
    return shown


async def run_to_end(client: httpx.AsyncClient, source: str, limits: dict[str, Any]) -> dict[str, Any]:
    sequence_id = (await client.post("/sequence", content=python_package(source))).json()["id"]
    started = await client.post(f"/sequence/{sequence_id}/start", json={"limits": limits})
    assert started.status_code == 200, started.text
    instance_id = started.json()["id"]
    output = b""
    with trio.fail_after(30):
        async with client.stream("GET", f"/instance/{instance_id}/output") as response:
            async for chunk in response.aiter_bytes():
                output += chunk
        while (info := (await client.get(f"/instance/{instance_id}")).json())["status"] in (
            "running",
            "stopping",
        ):
            await trio.sleep(0.1)
    return {**info, "output": output.decode()}


async def test_over_its_memory_limit_an_instance_errors_with_that_reason(client: httpx.AsyncClient) -> None:
    shown = await require(client, "memory")
    assert shown["how"].startswith("cgroup")
    ended = await run_to_end(client, HOG, {"memory": 100})
    assert ended["status"] == "errored"
    assert ended["terminated"]["reason"] == "Runner killed: memory limit exceeded"
    assert "survived" not in ended["output"]
    unlimited = await run_to_end(client, HOG, {})  # the same without a limit runs through
    assert unlimited["status"] == "completed" and "survived" in unlimited["output"]


async def test_a_cpu_limit_holds_a_busy_loop_to_its_share(client: httpx.AsyncClient) -> None:
    await require(client, "cpu")
    ended = await run_to_end(client, SPIN, {"cpu": 0.2})
    used = json.loads(ended["output"])["cpu"]
    assert used < 0.2 * 2.0 * 2  # a fifth of a core for 2 s, with room for scheduling


async def test_a_pids_limit_refuses_more_processes(client: httpx.AsyncClient) -> None:
    await require(client, "pids")
    ended = await run_to_end(client, FORKS, {"pids": 8})
    seen = json.loads(ended["output"])
    assert seen["refused"] > 0 and seen["started"] < 20
