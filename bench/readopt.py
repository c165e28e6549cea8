"""Taking instances back after `kill -9` of the hub (#17).

.venv/bin/python -m bench.readopt
BENCH_INSTANCES=20 BENCH_RUNS=5 .venv/bin/python -m bench.readopt

Twenty instances print a counter every 50 ms while a reader follows each one's
/output (resuming with ?offset= after every cut). The hub is killed with -9
BENCH_RUNS times and started again on the same directory; each time we measure
from the new `sth` process's start until `GET /instances` lists all of them as
running. Baseline: the same hub started with no instance to take back. Then the
counters read across every seam are checked: numbers missing (bytes lost) and
numbers read twice. Also the memory of the holders (one per instance).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import trio

from bench.common import ROOT, report, summary
from harness.daemons import stop_instances
from harness.packages import python_package

INSTANCES = int(os.environ.get("BENCH_INSTANCES", "20"))
RUNS = max(3, int(os.environ.get("BENCH_RUNS", "5")))
COUNTER_PY = """
import asyncio
async def run(context, input, *args):
    n = 0
    while True:
        yield f"{n}\\n"
        n += 1
        await asyncio.sleep(0.05)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spawn_hub(root: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.main", "-P", str(port), "-D", str(root), "-L", "warn"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )


def seconds_until_listed(process: subprocess.Popen[bytes], url: str, count: int, began: float) -> float:
    """Seconds from ``began`` until the hub lists ``count`` instances, all running."""
    with httpx.Client(timeout=5) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError("sth exited")
            try:
                listed = client.get(f"{url}/instances").json()
            except httpx.TransportError:
                time.sleep(0.002)
                continue
            if len(listed) == count and all(i["status"] == "running" for i in listed):
                return time.perf_counter() - began
            time.sleep(0.002)


class Follower:
    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.data = bytearray()
        self.url = ""

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
            while True:
                if self.url:
                    target = f"{self.url}/instance/{self.instance_id}/output?offset={len(self.data)}"
                    try:
                        async with client.stream("GET", target) as response:
                            if response.status_code == 200:
                                async for chunk in response.aiter_raw():
                                    self.data += chunk
                    except httpx.TransportError:
                        pass
                await trio.sleep(0.02)

    def missing_and_repeated(self) -> tuple[int, int, int]:
        text = self.data.decode()
        numbers = [int(line) for line in text[: text.rfind("\n") + 1].split("\n") if line]
        missing = repeated = 0
        expected = 0
        for number in numbers:
            if number < expected:
                repeated += 1
            else:
                missing += number - expected
                expected = number + 1
        return missing, repeated, len(numbers)


async def run() -> None:
    with tempfile.TemporaryDirectory(prefix="spacehub-bench-") as temporary:
        root = Path(temporary) / "sequences"
        empty = Path(temporary) / "empty"
        port = free_port()
        url = f"http://127.0.0.1:{port}/api/v1"

        baseline: list[float] = []
        for _ in range(RUNS):
            began = time.perf_counter()
            process = spawn_hub(empty, port)
            baseline.append(await trio.to_thread.run_sync(seconds_until_listed, process, url, 0, began))
            process.send_signal(signal.SIGKILL)
            process.wait()

        process = spawn_hub(root, port)
        await trio.to_thread.run_sync(seconds_until_listed, process, url, 0, time.perf_counter())
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            answer = await client.post("/sequence", content=python_package(COUNTER_PY))
            sequence_id = answer.json()["id"]
            for n in range(INSTANCES):
                started = await client.post(f"/sequence/{sequence_id}/start", json={"instanceId": f"r-{n}"})
                started.raise_for_status()
        holders = [
            p for p in psutil.process_iter(["cmdline"]) if "holder.py" in " ".join(p.info["cmdline"] or [])
        ]
        holders = [p for p in holders if str(root) in " ".join(p.info["cmdline"])]
        rss = [p.memory_info().rss / 2**20 for p in holders]
        uss = [p.memory_full_info().uss / 2**20 for p in holders]
        hub_rss = psutil.Process(process.pid).memory_info().rss / 2**20

        followers = [Follower(f"r-{n}") for n in range(INSTANCES)]
        times: list[float] = []
        try:
            async with trio.open_nursery() as nursery:
                for follower in followers:
                    follower.url = url
                    nursery.start_soon(follower.run)
                for _ in range(RUNS):
                    await trio.sleep(1.5)
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    for follower in followers:
                        follower.url = ""
                    await trio.sleep(0.5)
                    began = time.perf_counter()
                    process = spawn_hub(root, port)
                    took = await trio.to_thread.run_sync(seconds_until_listed, process, url, INSTANCES, began)
                    times.append(took)
                    for follower in followers:
                        follower.url = url
                await trio.sleep(1.5)
                nursery.cancel_scope.cancel()
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait()
            stop_instances(root)
        counts = [f.missing_and_repeated() for f in followers]
        missing = sum(c[0] for c in counts)
        repeated = sum(c[1] for c in counts)
        read = sum(c[2] for c in counts)

    report(
        f"readopt: kill -9 with {INSTANCES} instances running",
        [
            (
                f"sth start -> all {INSTANCES} listed running (s)",
                summary(times),
                f"{summary(baseline)['median']} s with none",
                "<= 1 s",
            ),
            ("counter lines lost at the seams", float(missing), f"{read} lines read, {RUNS} seams", "0"),
            ("counter lines repeated at the seams", float(repeated), "", "0"),
            ("holder RSS (MB)", summary(rss), f"hub {hub_rss:.1f} MB", ""),
            ("holder private memory, USS (MB)", summary(uss), "", ""),
        ],
    )


def main() -> None:
    trio.run(run)


if __name__ == "__main__":
    main()
