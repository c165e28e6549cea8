"""Instances outlive the hub (#17): kill -9 and SIGTERM loops, a reboot, restart policies.

Three instances print a counter every 50 ms. The hub is ended ten times in a row
(``kill -9``, then the same with SIGTERM) and started again on the same directory
each time; a reader follows each instance's ``/output`` across every seam,
resuming with ``?offset=`` the byte count it had. Afterwards every instance still
runs with its id and its pid, and what each reader got is 0, 1, 2, ... with no gap
and no repeat.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import trio

from harness.daemons import ROOT, HubProcess, read_until, stop_instances
from tests.e2e.test_hub_api import start, upload
from tests.helpers import python_package

COUNTER_PY = """
import asyncio
async def run(context, input, *args):
    n = 0
    while True:
        yield f"{n}\\n"
        n += 1
        await asyncio.sleep(0.05)
"""

EXIT_PY = """
import asyncio, os
async def run(context, input, *args):
    yield f"started {os.getpid()}\\n"
    await asyncio.sleep(float(args[0]) if args else 0.3)
    raise SystemExit(int(args[1]) if len(args) > 1 else 3)
"""

SEAMS = 10


def start_hub(root: Path, runtime: str, *args: str, timeout: float = 30.0) -> HubProcess:
    """A real `sth` that leaves its instances running when it ends (as under systemd)."""
    command = [
        sys.executable,
        "-m",
        "agent.main",
        "-P",
        "0",
        "-D",
        str(root),
        "--kill-grace",
        "1",
        "--runtime",
        runtime,
        *args,
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    lines = read_until(process, b"Running", time.monotonic() + timeout)
    address = next(line for line in lines if line.startswith(b"API on ")).split()[-1].decode()
    return HubProcess(process, address, root)


def end_hub(hub: HubProcess, how: signal.Signals) -> None:
    hub.process.send_signal(how)
    hub.process.wait(timeout=20)
    if hub.process.stdout is not None:
        hub.process.stdout.close()


class Follower:
    """Reads one instance's /output across hub restarts, resuming at its byte count."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.data = bytearray()
        self.url = ""
        self.resumed = 0
        self.received = 0
        self.seams: list[int] = []

    def take(self, chunk: bytes) -> None:
        self.data += chunk

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
            while True:
                url = self.url
                if not url:
                    await trio.sleep(0.05)
                    continue
                try:
                    target = f"{url}/instance/{self.instance_id}/output?offset={self.received}"
                    async with client.stream("GET", target) as response:
                        if response.status_code != 200:
                            raise AssertionError(f"{response.status_code}: {await response.aread()!r}")
                        self.resumed += 1
                        self.seams.append(self.received)
                        async for chunk in response.aiter_raw():
                            self.received += len(chunk)
                            self.take(chunk)
                except (httpx.TransportError, httpx.RemoteProtocolError):
                    pass
                await trio.sleep(0.05)

    def numbers(self) -> list[int]:
        text = self.data.decode()
        complete = text[: text.rfind("\n") + 1]
        return [int(line) for line in complete.split("\n") if line]


def check_counter(numbers: list[int]) -> None:
    assert numbers, "nothing read"
    assert numbers[0] == 0
    gaps = [(a, b) for a, b in itertools.pairwise(numbers) if b != a + 1]
    assert not gaps, f"gap or repeat at {gaps[:5]}"


def runner_pids(url: str, ids: list[str]) -> dict[str, int]:
    pids = {}
    for instance_id in ids:
        health = httpx.get(f"{url}/instance/{instance_id}/health", timeout=10).json()
        pids[instance_id] = health["processId"]
    return pids


async def survive(tmp_path: Path, how: signal.Signals, runtime: str) -> None:
    root = tmp_path / "sequences"
    hub = start_hub(root, runtime)
    try:
        async with httpx.AsyncClient(base_url=hub.url, timeout=30) as client:
            sequence_id = await upload(client, python_package(COUNTER_PY))
            ids = [await start(client, sequence_id, instanceId=f"counter-{n}") for n in range(3)]
        # Under Podman the pid shown is the container client's, kept by the holder too.
        pids = await trio.to_thread.run_sync(runner_pids, hub.url, ids)
        followers = [Follower(i) for i in ids]
        with trio.fail_after(150):
            async with trio.open_nursery() as nursery:
                for follower in followers:
                    follower.url = hub.url
                    nursery.start_soon(follower.run)
                for _seam in range(SEAMS):
                    await trio.sleep(0.7)
                    await trio.to_thread.run_sync(end_hub, hub, how)
                    for follower in followers:
                        follower.url = ""
                    await trio.sleep(0.3)  # the counters go on with no hub at all
                    hub = await trio.to_thread.run_sync(start_hub, root, runtime)
                    for follower in followers:
                        follower.url = hub.url
                await trio.sleep(1.0)
                nursery.cancel_scope.cancel()
        listed = httpx.get(f"{hub.url}/instances", timeout=10).json()
        assert {i["id"]: i["status"] for i in listed} == dict.fromkeys(ids, "running")
        assert await trio.to_thread.run_sync(runner_pids, hub.url, ids) == pids
        for follower in followers:
            numbers = follower.numbers()
            check_counter(numbers)
            # ~10 s of counting at 20 a second, across every seam
            assert len(numbers) > 100, len(numbers)
            assert follower.resumed > SEAMS, follower.resumed
    finally:
        end_hub(hub, signal.SIGTERM)
        stop_instances(root)


@pytest.mark.trio
async def test_kill_9_ten_times_loses_and_repeats_nothing(tmp_path: Path, runtime: str) -> None:
    await survive(tmp_path, signal.SIGKILL, runtime)


@pytest.mark.trio
async def test_sigterm_ten_times_loses_and_repeats_nothing(tmp_path: Path, runtime: str) -> None:
    await survive(tmp_path, signal.SIGTERM, runtime)


def holders_and_runners(root: Path) -> list[psutil.Process]:
    """Every holder under ``root`` and its runner (what a power loss ends)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(str(root) in part for part in cmdline) and "holder.py" in " ".join(cmdline):
            found.append(process)
            found.extend(process.children(recursive=True))
    return found


@pytest.mark.trio
async def test_reboot_restarts_always_and_lists_never_as_ended(tmp_path: Path) -> None:
    """Hub, holders and runners all killed (a power loss); the hub started again with
    its manager unreachable: `always` instances run again, `never` ones are listed ended."""
    root = tmp_path / "sequences"
    unreachable = ("--cpm-url", "wss://127.0.0.1:9", "--space", "nowhere", "--cpm-insecure")
    hub = start_hub(root, "process")
    try:
        async with httpx.AsyncClient(base_url=hub.url, timeout=30) as client:
            sequence_id = await upload(client, python_package(COUNTER_PY))
            await start(client, sequence_id, instanceId="always-1", restart="always")
            await start(client, sequence_id, instanceId="never-1")
            await start(client, sequence_id, instanceId="on-failure-1", restart="on-failure")
        end_hub(hub, signal.SIGKILL)
        doomed = holders_and_runners(root)
        assert len(doomed) == 6, doomed
        for process in doomed:
            process.kill()
        psutil.wait_procs(doomed, timeout=10)

        hub = start_hub(root, "process", *unreachable)
        async with httpx.AsyncClient(base_url=hub.url, timeout=30) as client:
            with trio.fail_after(30):
                while True:
                    listed = {i["id"]: i for i in (await client.get("/instances")).json()}
                    if (
                        listed.get("always-1", {}).get("status") == "running"
                        and listed.get("on-failure-1", {}).get("status") == "running"
                    ):
                        break
                    await trio.sleep(0.1)
            never = listed["never-1"]
            assert never["status"] == "errored"
            assert "no hub ran" in never["terminated"]["reason"]
            always = listed["always-1"]
            assert always["restart"] == "always" and always["restarts"] == 1
            # it counts again from the start, and its output is served
            async with client.stream("GET", "/instance/always-1/output") as response:
                async for chunk in response.aiter_raw():
                    assert chunk.startswith(b"0\n")
                    break
    finally:
        end_hub(hub, signal.SIGTERM)
        stop_instances(root)


@pytest.mark.trio
async def test_restart_policies_with_backoff(tmp_path: Path) -> None:
    root = tmp_path / "sequences"
    hub = start_hub(root, "process")
    try:
        async with httpx.AsyncClient(base_url=hub.url, timeout=30) as client:
            sequence_id = await upload(client, python_package(EXIT_PY))
            bad = await client.post(f"/sequence/{sequence_id}/start", json={"restart": "sometimes"})
            assert bad.status_code == 400 and "restart" in bad.json()["error"]
            await start(client, sequence_id, instanceId="fails", restart="on-failure", args=[0.3, 3])
            await start(client, sequence_id, instanceId="succeeds", restart="on-failure", args=[0.3, 0])
            await start(client, sequence_id, instanceId="always", restart="always", args=[0.3, 0])
            with trio.fail_after(30):
                while True:
                    listed = {i["id"]: i for i in (await client.get("/instances")).json()}
                    if listed["fails"]["restarts"] >= 2 and listed["always"]["restarts"] >= 2:
                        break
                    await trio.sleep(0.2)
            assert listed["succeeds"]["restarts"] == 0
            assert listed["succeeds"]["status"] == "completed"
            # A kill while it waits for its next start ends it for good.
            await trio.sleep(0.5)
            answer = await client.post("/instance/always/_kill")
            assert answer.status_code in (200, 202), answer.text
            restarts = (await client.get("/instance/always")).json()["restarts"]
            await trio.sleep(3)
            info = (await client.get("/instance/always")).json()
            assert info["restarts"] == restarts and info["status"] not in ("running", "starting")
            state = json.loads((root / ".state" / "always" / "state.json").read_text())
            assert state["desired"] == "stopped"
    finally:
        end_hub(hub, signal.SIGTERM)
        stop_instances(root)


@pytest.mark.trio
async def test_the_space_learns_what_ran_while_the_link_was_down(tmp_path: Path) -> None:
    """An instance that starts and ends while the manager is unreachable (and the hub is
    restarted meanwhile) is in the Space's history at the first heartbeat after."""
    from tests.cpm_helpers import run_cpm
    from tests.e2e.test_link_e2e import FAST, free_port, setup_space, space_client, wait_hub

    data = tmp_path / "cpm"
    token, join = setup_space(data)
    port = free_port()
    root = tmp_path / "hub" / "sequences"
    root.parent.mkdir()
    with run_cpm(data, *FAST, port=port) as manager:
        link = ("--data-dir", str(root.parent), "--cpm-url", manager.link_url, "--space", "demo")
        link += ("--cpm-ca", str(manager.ca_file), "--link-backoff-cap", "1")
        hub = start_hub(root, "process", *link, "--join-token", join)
        async with space_client(manager, token) as space:
            hub_id = (await wait_hub(space))["id"]
        link_only = link
    try:
        # The manager is down: the hub runs an instance to its end, and is itself restarted.
        async with httpx.AsyncClient(base_url=hub.url, timeout=30) as client:
            sequence_id = await upload(client, python_package(EXIT_PY))
            await start(client, sequence_id, instanceId="offline-run", args=[0.2, 3])
            with trio.fail_after(20):
                while (await client.get("/instance/offline-run")).json()["status"] != "errored":
                    await trio.sleep(0.1)
        end_hub(hub, signal.SIGKILL)
        hub = start_hub(root, "process", *link_only)
        with run_cpm(data, *FAST, port=port) as manager:
            async with space_client(manager, token) as space:
                await wait_hub(space, hub_id=hub_id)
                history = (await space.get("/instances/history")).json()
                ran = [item for item in history if item["id"] == "offline-run"]
                assert len(ran) == 1, history
                assert ran[0]["hub"] == hub_id and ran[0]["status"] == "errored"
                assert ran[0]["terminated"]["exitcode"] == 23
    finally:
        end_hub(hub, signal.SIGTERM)
        stop_instances(root)


GREETER_PY = """
async def run(context, input, *args):
    count = 0
    context.on("ping", lambda message: context.emit("pong", {"got": message, "lines": count}))
    async for line in input:
        count += 1
        yield f"Hello, {line.strip()}!\\n"
"""

TICKS_PY = """
import asyncio
provides = {"provides": "ticks", "contentType": "text/plain"}
async def run(context, input, *args):
    n = 0
    while True:
        yield f"tick {n}\\n"
        n += 1
        await asyncio.sleep(0.05)
"""

TICK_CONSUMER_PY = """
requires = {"requires": "ticks", "contentType": "text/plain"}
async def run(context, input, *args):
    async for line in input:
        yield f"got {line.strip()}\\n"
"""


async def read_some(client: httpx.AsyncClient, path: str, want: bytes) -> bytes:
    data = b""
    with trio.fail_after(15):
        async with client.stream("GET", path) as response:
            assert response.status_code == 200, path
            async for chunk in response.aiter_raw():
                data += chunk
                if want in data:
                    return data
    raise AssertionError(f"{path} ended without {want!r}: {data!r}")


@pytest.mark.trio
async def test_everything_works_again_after_the_seam(tmp_path: Path) -> None:
    """Input (its preamble sent once), events, topic bindings both ways, the topic API
    and kill all work on instances taken back after kill -9."""
    root = tmp_path / "sequences"
    hub = start_hub(root, "process")
    try:
        async with httpx.AsyncClient(base_url=hub.url, timeout=30) as client:
            greeter = await upload(client, python_package(GREETER_PY))
            ticks = await upload(client, python_package(TICKS_PY))
            consumer = await upload(client, python_package(TICK_CONSUMER_PY))
            await start(client, greeter, instanceId="greeter")
            await start(client, ticks, instanceId="ticks")
            await start(client, consumer, instanceId="consumer")
            sent = await client.post(
                "/instance/greeter/input",
                content=b"Alice\n",
                headers={"content-type": "text/plain", "x-end-stream": "false"},
            )
            assert sent.status_code == 202, sent.text
            await read_some(client, "/instance/greeter/output", b"Hello, Alice!\n")
            await read_some(client, "/instance/consumer/output", b"got tick 3\n")
        end_hub(hub, signal.SIGKILL)
        hub = start_hub(root, "process")
        async with httpx.AsyncClient(base_url=hub.url, timeout=30) as client:
            info = (await client.get("/instance/consumer")).json()
            assert (info["status"], info["requires"]) == ("running", "ticks")
            assert (await client.get("/instance/ticks")).json()["provides"] == "ticks"
            sent = await client.post(
                "/instance/greeter/input",
                content=b"Bob\n",
                headers={"content-type": "text/plain", "x-end-stream": "false"},
            )
            assert sent.status_code == 202, sent.text
            both = await read_some(client, "/instance/greeter/output?offset=0", b"Hello, Bob!\n")
            assert both == b"Hello, Alice!\nHello, Bob!\n"

            def resume_with_the_client() -> bytes:
                from spacehub import HubClient

                with HubClient(hub.url) as hub_client:
                    stream = hub_client.instance("greeter").output(offset=len(b"Hello, Alice!\n"))
                    with stream:
                        return next(iter(stream.iter_bytes()))

            assert await trio.to_thread.run_sync(resume_with_the_client) == b"Hello, Bob!\n"
            far = await client.get("/instance/greeter/output?offset=999999")
            assert far.status_code == 416 and "past the end" in far.json()["error"]
            bad = await client.get("/instance/greeter/output?offset=-1")
            assert bad.status_code == 400 and "offset" in bad.json()["error"]
            event = await client.post("/instance/greeter/_event", json={"eventName": "ping", "message": 7})
            assert event.status_code in (200, 202), event.text
            pong = (await client.get("/instance/greeter/event/pong")).json()
            assert pong["got"] == 7
            # The consumer is fed again through the rebound topic, and the topic API serves it.
            live = await read_some(client, "/instance/consumer/output", b"\n")
            assert live.startswith(b"got tick ")
            topic = await read_some(client, "/topic/ticks", b"\n")
            assert b"tick " in topic
            killed = await client.post("/instance/ticks/_kill")
            assert killed.status_code in (200, 202), killed.text
            with trio.fail_after(10):
                while (await client.get("/instance/ticks")).json()["status"] != "completed":
                    await trio.sleep(0.1)
    finally:
        end_hub(hub, signal.SIGTERM)
        stop_instances(root)


BIG_PY = """
import asyncio
async def run(context, input, *args):
    for n in range(48):
        yield bytes([65 + n % 26]) * 65536
    await asyncio.sleep(3600)
"""


@pytest.mark.trio
async def test_an_offset_no_longer_kept_is_410(tmp_path: Path) -> None:
    """3 MiB through /output; the spool keeps the last 1 MiB or so: offset 0 is gone,
    an offset in the kept range is served from disk, exactly."""
    root = tmp_path / "sequences"
    hub = start_hub(root, "process")
    try:
        async with httpx.AsyncClient(base_url=hub.url, timeout=30) as client:
            sequence_id = await upload(client, python_package(BIG_PY, contentType="application/octet-stream"))
            await start(client, sequence_id, instanceId="big")
            total = 48 * 65536
            got = 0
            with trio.fail_after(30):
                async with client.stream("GET", "/instance/big/output") as response:
                    async for chunk in response.aiter_raw():
                        got += len(chunk)
                        if got >= total:
                            break
            gone = await client.get("/instance/big/output?offset=0")
            assert gone.status_code == 410 and "no longer kept" in gone.json()["error"]
            offset = total - 300_000
            with trio.fail_after(10):
                async with client.stream("GET", f"/instance/big/output?offset={offset}") as response:
                    data = b""
                    async for chunk in response.aiter_raw():
                        data += chunk
                        if len(data) >= total - offset:
                            break
            expected = b"".join(bytes([65 + n % 26]) * 65536 for n in range(48))[offset:]
            assert data == expected
    finally:
        end_hub(hub, signal.SIGTERM)
        stop_instances(root)


FLOOD_PY = """
import hashlib
async def run(context, input, *args):
    # Numbered 4 KiB records as fast as the reader takes them.
    n = 0
    while True:
        head = f"{n:012d}".encode()
        yield head + hashlib.sha256(head).digest() * 127 + b"\\n" * 4052
        n += 1
"""


FLOOD_RECORD = 12 + 32 * 127 + 4052


def flood_record(n: int) -> bytes:
    head = f"{n:012d}".encode()
    return head + hashlib.sha256(head).digest() * 127 + b"\n" * 4052


class FloodChecker(Follower):
    """Checks each record as it comes (gigabytes pass: none is kept)."""

    def __init__(self, instance_id: str) -> None:
        super().__init__(instance_id)
        self.pending = bytearray()
        self.records = 0
        self.bad: int | None = None

    def take(self, chunk: bytes) -> None:
        self.pending += chunk
        while len(self.pending) >= FLOOD_RECORD:
            if self.bad is None and self.pending[:FLOOD_RECORD] != flood_record(self.records):
                self.bad = self.records
            del self.pending[:FLOOD_RECORD]
            self.records += 1


@pytest.mark.trio
async def test_a_flooding_instance_loses_nothing_across_kill_9(tmp_path: Path) -> None:
    """Output as fast as it is read (the pipe full, the spool turning over) while the hub
    is killed five times: the bytes read across the seams are exactly the records, in order."""
    root = tmp_path / "sequences"
    hub = start_hub(root, "process")
    try:
        async with httpx.AsyncClient(base_url=hub.url, timeout=30) as client:
            sequence_id = await upload(
                client, python_package(FLOOD_PY, contentType="application/octet-stream")
            )
            await start(client, sequence_id, instanceId="flood")
        follower = FloodChecker("flood")
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                follower.url = hub.url
                nursery.start_soon(follower.run)
                for _seam in range(5):
                    await trio.sleep(1.0)
                    await trio.to_thread.run_sync(end_hub, hub, signal.SIGKILL)
                    follower.url = ""
                    hub = await trio.to_thread.run_sync(start_hub, root, "process")
                    follower.url = hub.url
                await trio.sleep(1.0)
                nursery.cancel_scope.cancel()
        assert follower.bad is None, f"record {follower.bad} differs (seams at {follower.seams})"
        assert follower.records > 100, follower.records
        assert follower.resumed > 5
    finally:
        end_hub(hub, signal.SIGTERM)
        stop_instances(root)
