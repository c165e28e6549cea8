"""Chaos through the fault hook, no root needed: for two minutes a hub's link is cut,
partitioned, slowed, and the registry refuses writes, every few seconds, while three
instances are fed through the Space. Every acknowledged byte arrives (the writers retry
what was not acknowledged; each instance counts gaps and repeats), and afterwards neither
daemon holds more descriptors, tasks or memory than before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.console_helpers import package_bytes
from tests.cpm_helpers import run_cpm
from tests.e2e.test_link_e2e import run_linked_sth, setup_space, space_client, ssl_context, wait_hub

SECONDS = float(os.environ.get("CHAOS_SECONDS", "120"))
INSTANCES = 3
#: Heartbeats every second, unhealthy after 2 missed, a silent link closed after 1 + 3 s,
#: and the manager pings every second, so the hub notices a dead link as fast.
MANAGER = (
    "--heartbeat-interval",
    "1",
    "--missed-heartbeats",
    "2",
    "--pong-timeout",
    "3",
    "--ping-interval",
    "1",
)
#: The faults, in turn, one every 4 s.
FAULTS: list[dict[str, Any]] = [
    {"cut": True},
    {"partition": 2},
    {"delay": 0.2, "for": 3},
    {"registryWrites": 3, "cut": True},
    {"partition": 6},  # past the silence limits: both ends close the link
]

COUNTING_PY = """
async def run(context, input, *args):
    last = gaps = repeats = 0
    pending = ""
    async for chunk in input:
        pending += chunk if isinstance(chunk, str) else chunk.decode()
        *lines, pending = pending.split("\\n")
        for line in lines:
            if line == "end":
                yield f"tally last={last} gaps={gaps} repeats={repeats}\\n"
                return
            if not line:
                continue
            number = int(line)
            if number <= last:
                repeats += 1
            else:
                gaps += number - last - 1
                last = number
"""


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


async def footprint(hub_pid: int, cpm_pid: int, hub_url: str) -> dict[str, float]:
    """What both daemons hold now."""
    return {
        "hub fds": fds(hub_pid),
        "cpm fds": fds(cpm_pid),
        "hub tasks": await hub_tasks(hub_url),
        "cpm rss": rss_mb(cpm_pid),
        "hub rss": rss_mb(hub_pid),
    }


async def retry(call: Any, what: str, seconds: float = 60.0) -> httpx.Response:
    """``call()`` until it answers 2xx (a link down or cut mid-call answers 5xx or fails)."""
    with trio.fail_after(seconds):
        while True:
            try:
                answer: httpx.Response = await call()
                if answer.status_code < 300:
                    return answer
            except httpx.HTTPError:
                pass
            await trio.sleep(0.2)
    raise AssertionError(what)  # pragma: no cover - fail_after raises first


async def hub_tasks(hub_url: str) -> int:
    """The hub's Trio tasks, the least of three probes (a heartbeat going out is no leak)."""
    async with httpx.AsyncClient(timeout=10) as client:
        counts = []
        for _ in range(3):
            counts.append((await client.get(f"{hub_url}/status")).json()["tasks"])
            await trio.sleep(0.5)
    return min(counts)


async def test_link_flaps_for_two_minutes_nothing_acknowledged_is_lost(tmp_path: Path) -> None:
    data = tmp_path / "cpm"
    token, join = setup_space(data)
    with (
        run_cpm(data, *MANAGER, "--fault-injection", "-L", "warn") as manager,
        run_linked_sth(
            tmp_path, manager, "--join-token", join, "--link-backoff-cap", "1", "-L", "warn"
        ) as hub,
    ):
        async with (
            space_client(manager, token) as space,
            httpx.AsyncClient(base_url=manager.base, verify=ssl_context(manager), timeout=10) as admin,
        ):
            hub_id = (await wait_hub(space))["id"]
            api = f"/sth/{hub_id}/api/v1"
            sequence = (
                await space.post(f"{api}/sequence", content=package_bytes(COUNTING_PY, name="counting"))
            ).json()["id"]
            # What the daemons hold, linked and warmed up, before any instance or fault.
            assert (await space.get(f"{api}/instances")).status_code == 200
            await trio.sleep(2)
            before = await footprint(hub.process.pid, manager.process.pid, hub.url)

            instances = [
                (await space.post(f"{api}/sequence/{sequence}/start", json={})).json()["id"]
                for _ in range(INSTANCES)
            ]
            # Each instance's input is open.
            for instance in instances:
                await retry(
                    lambda i=instance: space.post(f"{api}/instance/{i}/input", content=b"", headers=_TEXT),
                    "warm-up",
                )
            acknowledged = dict.fromkeys(instances, 0)
            failed_posts = 0
            injected: list[dict[str, Any]] = []

            async def feed(instance: str, until: float) -> None:
                nonlocal failed_posts
                number = 0
                while trio.current_time() < until:
                    batch = range(number + 1, number + 21)
                    body = "".join(f"{n}\n" for n in batch).encode()
                    while True:  # the same batch until it is acknowledged
                        try:
                            answer = await space.post(
                                f"{api}/instance/{instance}/input", content=body, headers=_TEXT
                            )
                            if answer.status_code < 300:
                                break
                        except httpx.HTTPError:
                            pass
                        failed_posts += 1
                        await trio.sleep(0.2)
                    number = batch[-1]
                    acknowledged[instance] = number
                    await trio.sleep(0.05)

            async def chaos(until: float) -> None:
                turn = 0
                while trio.current_time() < until:
                    fault = FAULTS[turn % len(FAULTS)]
                    answer = await admin.post("/api/v1/faults", json={"hub": hub_id, **fault})
                    assert answer.status_code == 200, answer.text
                    injected.append(answer.json())
                    turn += 1
                    await trio.sleep(4)

            until = trio.current_time() + SECONDS
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chaos, until)
                for instance in instances:
                    nursery.start_soon(feed, instance, until)
            assert (await admin.delete("/api/v1/faults")).status_code == 200
            assert len(injected) >= SECONDS / 4 - 1 and failed_posts > 0  # the faults did bite

            # Calm again: the hub is back, and each instance tells what it got.
            await wait_hub(space, hub_id=hub_id)
            for instance in instances:
                await retry(
                    lambda i=instance: space.post(
                        f"{api}/instance/{i}/input", content=b"end\n", headers=_TEXT
                    ),
                    "the end line",
                )
            for instance in instances:
                tally = await _read_tally(space, f"{api}/instance/{instance}/output")
                assert tally["gaps"] == 0, (instance, tally, acknowledged[instance])
                assert tally["last"] >= acknowledged[instance] > 0, (instance, tally, acknowledged[instance])

            # Nothing left behind: with the instances ended (each returned after its tally) and
            # the link settled, the daemons hold what they held before.
            for instance in instances:
                with trio.fail_after(30):
                    while True:
                        got = await retry(lambda i=instance: space.get(f"{api}/instance/{i}"), "info")
                        if got.json()["status"] not in ("running", "stopping"):
                            break
                        await trio.sleep(0.2)
                assert got.json()["status"] == "completed", got.json()
            # Ended instances stay listed for the hub's instance lifetime (30 s here); then gone.
            with trio.fail_after(60):
                while (await retry(lambda: space.get(f"{api}/instances"), "instances")).json():
                    await trio.sleep(1)
            await trio.sleep(3)
            after = await footprint(hub.process.pid, manager.process.pid, hub.url)
            print(
                f"chaos: {len(injected)} faults, {failed_posts} failed posts, {acknowledged};"
                f" {before} -> {after}"
            )
            assert after["hub fds"] <= before["hub fds"] + 2, (before, after)
            assert after["cpm fds"] <= before["cpm fds"] + 2, (before, after)
            assert after["hub tasks"] <= before["hub tasks"] + 2, (before, after)
            assert after["cpm rss"] <= before["cpm rss"] + 25, (before, after)
            assert after["hub rss"] <= before["hub rss"] + 25, (before, after)
            assert manager.process.poll() is None and hub.alive()


_TEXT = {"content-type": "text/plain", "x-end-stream": "false"}


async def _read_tally(space: httpx.AsyncClient, path: str) -> dict[str, int]:
    with trio.fail_after(60):
        while True:
            try:
                async with space.stream("GET", path) as output:
                    text = ""
                    async for chunk in output.aiter_text():
                        text += chunk
                        if "tally" in text and text.endswith("\n"):
                            fields = dict(part.split("=") for part in text.split("tally", 1)[1].split())
                            return {k: int(v) for k, v in fields.items()}
            except httpx.HTTPError:
                await trio.sleep(0.5)
